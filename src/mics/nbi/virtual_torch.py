"""The virtual NBI transform of :mod:`mics.nbi.virtual` in torch operations, batched, for exported graphs.

Same steps, constants and rounding as :func:`mics.nbi.virtual.virtual_nbi_image`; the masked median and
the masked 99th percentile become sorts of the batch with non-tissue pixels pushed to the end, so the
whole transform traces into an ONNX graph with a dynamic batch size. Each image is still processed on
its own. The result equals the NumPy transform up to float rounding of single pixels (a few 1/255 steps
on a handful of pixels; tests/nbi/test_virtual_torch.py measures it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mics.nbi.virtual import (
    BANDS,
    DISPLAY,
    EPS,
    GAMMA,
    HB_GAIN,
    MIN_TISSUE_FRACTION,
    STRETCH_PERCENTILE,
    TISSUE_LEVEL,
)

__all__ = ["virtual_nbi_torch"]


def _srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: Tensor) -> Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * torch.pow(x, 1 / 2.4) - 0.055)


def _sorted_tissue(values: Tensor, mask: Tensor) -> Tensor:
    """values [N, P], mask [N, P] -> each row sorted ascending with the masked-out entries last (+inf)."""
    inf = torch.full_like(values, float("inf"))
    return torch.sort(torch.where(mask, values, inf), dim=1).values


def _masked_median(values: Tensor, mask: Tensor) -> Tensor:
    """Median of the masked entries of each row (NumPy's: the mean of the two middle values when even)."""
    count = mask.sum(dim=1, keepdim=True)
    ordered = _sorted_tissue(values, mask)
    lower = torch.gather(ordered, 1, torch.div(count - 1, 2, rounding_mode="floor"))
    upper = torch.gather(ordered, 1, torch.div(count, 2, rounding_mode="floor"))
    return (lower + upper) / 2


def _masked_percentile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """``np.percentile(row[mask], q)`` per row (linear method), in float64 like NumPy's interpolation."""
    count = mask.sum(dim=1, keepdim=True)
    ordered = _sorted_tissue(values, mask)
    position = (q / 100.0) * (count - 1).double()
    below = torch.floor(position)
    gamma = position - below
    lo = below.long()
    hi = torch.minimum(lo + 1, count - 1)
    a, b = torch.gather(ordered, 1, lo), torch.gather(ordered, 1, hi)
    diff = (b - a).double()
    # NumPy's _lerp: the nearer end is the base, so gamma = 1 gives b exactly
    return torch.where(gamma >= 0.5, b.double() - diff * (1 - gamma), a.double() + diff * gamma)


def virtual_nbi_torch(images: Tensor) -> Tensor:
    """WLI uint8 [N, H, W, 3] -> virtual NBI uint8 [N, H, W, 3], each image on its own."""
    n, h, w, _ = images.shape
    bands_m = torch.tensor(BANDS.T, dtype=torch.float32, device=images.device)
    display_m = torch.tensor(DISPLAY.T, dtype=torch.float32, device=images.device)
    linear = _srgb_to_linear(images.float() / 255.0)  # [N, H, W, 3]
    brightest = linear.amax(dim=-1)  # [N, H, W]
    tissue = (brightest > TISSUE_LEVEL).reshape(n, h * w)
    # too little tissue: every pixel counts, as in the NumPy transform
    enough = tissue.sum(dim=1, keepdim=True) >= MIN_TISSUE_FRACTION * (h * w)
    tissue = tissue | ~enough
    density = torch.log(torch.clamp(linear @ bands_m, min=EPS)).reshape(n, h * w, 2)
    median = torch.stack(
        [_masked_median(density[..., 0], tissue), _masked_median(density[..., 1], tissue)], dim=-1
    )  # [N, 1, 2]
    density = density - median
    mean = density.mean(dim=-1, keepdim=True)
    half_diff = (0.5 * HB_GAIN) * (density[..., 1:2] - density[..., 0:1])
    bands = torch.exp(torch.cat([mean - half_diff, mean + half_diff], dim=-1))  # [N, P, 2]
    tissue2 = tissue.unsqueeze(-1).expand(n, h * w, 2).reshape(n, 2 * h * w)
    top = _masked_percentile(bands.reshape(n, 2 * h * w), tissue2, STRETCH_PERCENTILE)
    top = torch.clamp(top, min=EPS).float().reshape(n, 1, 1)
    stretched = torch.clamp(bands / top, 0.0, 1.0) ** GAMMA
    fade = torch.clamp(brightest.reshape(n, h * w, 1) / TISSUE_LEVEL, 0.0, 1.0)
    display = torch.clamp(stretched @ display_m, 0.0, 1.0) * fade  # [N, P, 3]
    out = torch.round(_linear_to_srgb(display) * 255.0)
    return out.reshape(n, h, w, 3).to(torch.uint8)
