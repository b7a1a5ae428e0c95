"""VirtualNBI and the generator registry: a pixel-loop reference, determinism, NBI-like colours."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mics.config import ConfigError
from mics.nbi import GENERATORS, PartnerGenerator, VirtualNBI, get_generator, register_generator

GI = Path(__file__).resolve().parents[2] / "data" / "sample" / "hyperkvasir-2class"


def _frames(n: int, size: int = 48) -> np.ndarray:
    files = sorted((GI / "polyps").glob("*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile by sorting (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median(values: list[float]) -> float:
    return _percentile(values, 50)


def _reference(image: np.ndarray) -> np.ndarray:
    """The documented formula (docs/nbi.md), pixel by pixel in float64 Python."""

    def lin(v: float) -> float:
        v /= 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    def enc(v: float) -> float:
        return 12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055

    h, w, _ = image.shape
    pix = [[tuple(lin(float(c)) for c in image[y, x]) for x in range(w)] for y in range(h)]
    dens, tissue = {}, []
    for y in range(h):
        for x in range(w):
            r, g, b = pix[y][x]
            r415 = 0.05 * r + 0.15 * g + 0.80 * b
            r540 = 0.10 * r + 0.80 * g + 0.10 * b
            dens[y, x] = (math.log(max(r415, 1e-4)), math.log(max(r540, 1e-4)))
            if max(r, g, b) > 0.02:
                tissue.append((y, x))
    if len(tissue) < 0.01 * h * w:
        tissue = list(dens)
    med = [_median([dens[p][k] for p in tissue]) for k in range(2)]
    bands = {}
    for p, (o415, o540) in dens.items():
        o415, o540 = o415 - med[0], o540 - med[1]
        m, d = (o415 + o540) / 2, o540 - o415
        bands[p] = (math.exp(m - 1.5 * d), math.exp(m + 1.5 * d))
    top = max(_percentile([v for p in tissue for v in bands[p]], 99), 1e-4)
    out = np.zeros_like(image)
    for (y, x), (b415, b540) in bands.items():
        s415 = min(max(b415 / top, 0), 1) ** 1.4
        s540 = min(max(b540 / top, 0), 1) ** 1.4
        fade = min(max(pix[y][x]) / 0.02, 1.0)
        rgb = (0.90 * s540 * fade, (0.60 * s415 + 0.35 * s540) * fade, 0.80 * s415 * fade)
        out[y, x] = [round(enc(min(max(v, 0), 1)) * 255) for v in rgb]
    return out


def test_matches_pixel_loop_reference() -> None:
    frames = _frames(2, size=12)
    frames[1, :3] = 0  # a black border row block: not tissue
    got = VirtualNBI()(frames)
    for i in range(2):
        diff = np.abs(got[i].astype(int) - _reference(frames[i]).astype(int))
        assert diff.max() <= 1, diff.max()


def test_shape_dtype_determinism_and_batch_independence() -> None:
    frames = _frames(4)
    gen = VirtualNBI()
    out = gen(frames)
    assert out.shape == frames.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, gen(frames.copy()))
    alone = np.concatenate([gen(frames[i : i + 1]) for i in range(4)])
    np.testing.assert_array_equal(out, alone)
    assert not np.array_equal(out, frames)


def test_real_frames_lose_the_red_cast() -> None:
    frames = _frames(6).astype(float)
    out = VirtualNBI()(frames.astype(np.uint8)).astype(float)
    tissue = frames.max(-1) > 40
    wli = frames[tissue].mean(0)
    nbi = out[tissue].mean(0)
    assert wli[0] > 1.5 * wli[2]  # white light: red mucosa
    assert nbi[2] / nbi[0] > 2 * wli[2] / wli[0]  # NBI: blue-green (teal) gains on red


def _patch_image(
    patch: tuple[int, int, int], background: tuple[int, int, int] = (190, 120, 110)
) -> np.ndarray:
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, :, :] = background
    image[0, 12:20, 12:20] = patch
    return image


def test_haemoglobin_absorbing_415_looks_brown() -> None:
    # less blue reflectance (superficial capillary) -> brown: R > G > B, darker blue than the background
    out = VirtualNBI()(_patch_image((190, 120, 45)))[0].astype(int)
    r, g, b = out[16, 16]
    assert r > g > b
    assert b < out[2, 2, 2]


def test_absorbing_540_looks_cyan() -> None:
    # less green reflectance (deeper vessel) -> cyan / teal: blue and green above red
    out = VirtualNBI()(_patch_image((190, 60, 110)))[0].astype(int)
    r, g, b = out[16, 16]
    assert g > r and b > r


def test_black_and_flat_images_are_safe() -> None:
    gen = VirtualNBI()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        black = gen(np.zeros((1, 8, 8, 3), dtype=np.uint8))
        flat = gen(np.full((1, 8, 8, 3), (180, 100, 90), dtype=np.uint8))
    assert (black == 0).all()
    assert (flat == flat[0, 0, 0]).all()


def test_border_stays_black() -> None:
    frame = _frames(1)
    frame[0, :, :6] = 0
    assert (VirtualNBI()(frame)[0, :, :6] == 0).all()


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 4), np.uint8)],
)
def test_rejects_wrong_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        VirtualNBI()(bad)


def test_registry() -> None:
    gen = get_generator("virtual-nbi")
    assert isinstance(gen, VirtualNBI) and gen.name == "virtual-nbi-v1"
    assert isinstance(gen, PartnerGenerator)
    with pytest.raises(ConfigError, match="unknown partner generator 'wtngan'.*virtual-nbi"):
        get_generator("wtngan")


def test_register_custom_generator() -> None:
    class Grey:
        name = "grey-test-v1"

        def __call__(self, images: np.ndarray) -> np.ndarray:
            return images.mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8)

    register_generator("grey-test", Grey)
    try:
        assert isinstance(get_generator("grey-test"), Grey)
        with pytest.raises(ValueError, match="already registered"):
            register_generator("grey-test", Grey)
    finally:
        GENERATORS.pop("grey-test")
