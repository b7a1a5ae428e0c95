"""Virtual narrow-band imaging: a fixed colour/spectral transform of a white-light (WLI) RGB image.

Narrow-band imaging (Gono et al., J Biomed Opt 9(3):568-577, 2004) lights the mucosa with two narrow
bands: 415 nm, at haemoglobin's Soret absorption peak, which barely penetrates and makes superficial
capillaries dark; and 540 nm, haemoglobin's second peak, which reaches deeper vessels. The processor
shows the 540 nm image in the red channel and the 415 nm image in green and blue, so superficial
vessels look brown and deeper ones cyan/teal.

This module imitates that from an ordinary RGB frame (see docs/nbi.md for the formula and its limits):

1. undo the sRGB gamma -> linear reflectance ``rgb`` [H, W, 3];
2. estimate the narrow-band reflectances with a fixed linear model ``[r415, r540] = BANDS @ rgb``
   (415 nm sits at the short end of the camera's blue sensitivity, 540 nm near its green peak);
3. go to optical density ``o = log(r)``, white-balance each band on the median of the tissue pixels;
4. amplify the haemoglobin contrast ``d = o540 - o415`` by ``HB_GAIN`` around the mean density;
5. back to reflectance, stretch jointly to the 99th tissue percentile, apply a display gamma;
6. display: R <- 540, G and B <- 415, with the processor's colour-conversion ``DISPLAY`` matrix,
   faded to black where the input is darker than the tissue level, then re-apply the sRGB gamma.

It is a stand-in for the learned WLI->NBI translator of the paper (WtNGAN, unreleased), not a
physical model: three broad RGB channels cannot recover narrow-band spectra.
"""

from __future__ import annotations

import numpy as np

from mics.nbi.base import check_batch

# rows: estimated reflectance at 415 nm and 540 nm from linear (R, G, B)
BANDS = np.array([[0.05, 0.15, 0.80], [0.10, 0.80, 0.10]], dtype=np.float32)
# rows: displayed (R, G, B) from stretched (s415, s540); G takes part of the 540 band (colour
# conversion), which turns haemoglobin-rich areas brown instead of magenta
DISPLAY = np.array([[0.0, 0.90], [0.60, 0.35], [0.80, 0.0]], dtype=np.float32)
HB_GAIN = 3.0  # amplification of the 540/415 optical-density difference
GAMMA = 1.4  # display gamma on the stretched bands (NBI frames are darker than WLI)
STRETCH_PERCENTILE = 99.0
TISSUE_LEVEL = 0.02  # linear level below which a pixel is border/background, not tissue
MIN_TISSUE_FRACTION = 0.01
EPS = 1e-4


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light, same shape."""
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] -> sRGB-encoded values, same shape."""
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def _tissue(pixels: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """Rows of ``pixels`` [H, W, C] -> [P, C] that are tissue (all pixels if too few are)."""
    mask = linear.max(axis=-1) > TISSUE_LEVEL
    if mask.sum() < MIN_TISSUE_FRACTION * mask.size:
        return pixels.reshape(-1, pixels.shape[-1])
    return pixels[mask]


def virtual_nbi_image(image: np.ndarray) -> np.ndarray:
    """One WLI image uint8 [H, W, 3] -> virtual NBI uint8 [H, W, 3]."""
    linear = srgb_to_linear(image.astype(np.float32) / 255.0)
    density = np.log(np.maximum(linear @ BANDS.T, EPS))  # [H, W, 2]: (o415, o540)
    density -= np.median(_tissue(density, linear), axis=0)
    mean = density.mean(axis=-1, keepdims=True)
    half_diff = 0.5 * HB_GAIN * (density[..., 1:2] - density[..., 0:1])
    bands = np.exp(np.concatenate([mean - half_diff, mean + half_diff], axis=-1))
    top = max(float(np.percentile(_tissue(bands, linear), STRETCH_PERCENTILE)), EPS)
    stretched = np.clip(bands / top, 0.0, 1.0) ** GAMMA
    # fade out below the tissue level: black borders and black frames carry no signal to stretch
    fade = np.clip(linear.max(axis=-1, keepdims=True) / TISSUE_LEVEL, 0.0, 1.0)
    display = np.clip(stretched @ DISPLAY.T, 0.0, 1.0) * fade
    return np.round(linear_to_srgb(display) * 255.0).astype(np.uint8)


class VirtualNBI:
    """Deterministic WLI -> virtual NBI: uint8 [N, H, W, 3] -> uint8 [N, H, W, 3].

    Each image is processed on its own, so the result does not depend on the batch it came in.
    """

    name = "virtual-nbi-v1"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        check_batch(images)
        out = np.empty_like(images)
        for i, image in enumerate(images):
            out[i] = virtual_nbi_image(image)
        return out

    def __repr__(self) -> str:
        return f"VirtualNBI(name={self.name!r})"
