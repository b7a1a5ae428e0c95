"""Batched augmentation of uint8 image tensors [B, 3, H, W] on any device, and normalisation.

``weak``: FixMatch's weak view (random horizontal flip + random crop with 12.5 % reflect padding),
done as one gather for the whole batch. ``strong``: weak + RandAugment (torchvision v2, per sample)
+ Cutout. In the multimodal baselines the strong view is the weakly augmented partner image
instead, which is just ``weak(partner)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torchvision.transforms import v2

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PAD_FRACTION = 0.125  # FixMatch: 4 px on 32 px images
CUTOUT_FRACTION = 0.5  # FixMatch's CutoutAbs(img, 16) on 32 px: a square half the image side
CUTOUT_FILL = 127


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a uint8 image batch [B, 3, H, W], got {desc}")


def _uniform(n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """[n] uniform [0, 1) floats on x's device, drawn from ``generator`` (on its own device) if given."""
    if generator is None:
        return torch.rand(n, device=x.device)
    return torch.rand(n, generator=generator, device=generator.device).to(x.device)


def to_float(x: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] normalised with the ImageNet mean and std."""
    _check_images(x)
    mean = torch.tensor(MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _reflect(index: Tensor, size: int) -> Tensor:
    """Map coordinates in [-size+1, 2*size-2] back into [0, size-1] by mirror reflection (no edge repeat)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _crop_indices(n: int, size: int, pad: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """[n, size] source coordinates of a random crop of the reflect-padded axis."""
    offset = torch.floor(_uniform(n, x, generator) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    coords = torch.arange(size, device=x.device).unsqueeze(0) + offset.unsqueeze(1) - pad
    return _reflect(coords, size)


def _flip_crop(xs: tuple[Tensor, ...], generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """One random horizontal flip + crop (12.5 % reflect padding) per sample, applied to every tensor in
    ``xs`` (uint8 [B,3,H,W] of one shape), done as one gather per tensor."""
    x = xs[0]
    b, _, h, w = x.shape
    if b == 0:
        return tuple(t.clone() for t in xs)
    flip = _uniform(b, x, generator) < 0.5
    pad_h = min(round(PAD_FRACTION * h), h - 1)
    pad_w = min(round(PAD_FRACTION * w), w - 1)
    rows = _crop_indices(b, h, pad_h, x, generator)  # [B, H]
    cols = _crop_indices(b, w, pad_w, x, generator)  # [B, W]
    cols = torch.where(flip.unsqueeze(1), w - 1 - cols, cols)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    outs = []
    for t in xs:
        out = t.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)]  # [B, H, W, 3]
        outs.append(out.permute(0, 3, 1, 2).contiguous())
    return tuple(outs)


def weak(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random horizontal flip + random crop after 12.5 % reflect padding: uint8 [B,3,H,W] -> same."""
    _check_images(x)
    return _flip_crop((x,), generator)[0]


def weak_pair(
    a: Tensor, b: Tensor, generator: torch.Generator | None = None, shared: bool = False
) -> tuple[Tensor, Tensor]:
    """Weak views of both images of each pair: uint8 [B,3,H,W] x 2 -> same. ``shared`` applies one flip and
    crop to both, so co-registered pairs (virtual NBI) stay pixel-aligned; otherwise each gets its own."""
    if not shared:
        return weak(a, generator), weak(b, generator)
    _check_images(a)
    _check_images(b)
    if a.shape != b.shape:
        raise ValueError(f"shared augmentation needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    out_a, out_b = _flip_crop((a, b), generator)
    return out_a, out_b


def cutout(x: Tensor, generator: torch.Generator | None = None, fraction: float = CUTOUT_FRACTION) -> Tensor:
    """Grey out one square of side ``fraction * min(H, W)`` per image: uint8 [B,3,H,W] -> same.

    The centre is uniform over the image, so the square may be clipped at the borders (FixMatch's Cutout).
    """
    _check_images(x)
    b, _, h, w = x.shape
    half = fraction * min(h, w) / 2
    cy = _uniform(b, x, generator) * h
    cx = _uniform(b, x, generator) * w
    ys = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
    inside_y = (ys.unsqueeze(0) - cy.unsqueeze(1)).abs() <= half  # [B, H]
    inside_x = (xs.unsqueeze(0) - cx.unsqueeze(1)).abs() <= half  # [B, W]
    hole = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).unsqueeze(1)  # [B, 1, H, W]
    return x.masked_fill(hole, CUTOUT_FILL)


@contextmanager
def _one_cpu_thread(x: Tensor) -> Iterator[None]:
    """Run per-image CPU work on one thread: an image is too small for torch's thread pool to pay, and with
    two threads on a busy 2-core machine each tiny parallel region waits for the other core (the strong
    view of 96 images at 64 px took 2.4 s with two threads, 35 ms with one; benchmarks/README.md)."""
    if x.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def strong(
    x: Tensor, num_ops: int = 2, magnitude: int = 10, generator: torch.Generator | None = None
) -> Tensor:
    """FixMatch's strong view: weak + RandAugment(num_ops, magnitude) per sample + Cutout.

    uint8 [B, 3, H, W] -> same. RandAugment draws from torch's global CPU generator; when
    ``generator`` is given, it is run under a forked RNG seeded from ``generator``, so the whole view
    is reproducible from ``generator`` and the global RNG state is left untouched.
    """
    _check_images(x)
    x = weak(x, generator)
    augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    if generator is None:
        with _one_cpu_thread(x):
            mixed = torch.stack([augment(img) for img in x]) if len(x) else x
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _one_cpu_thread(x):
                mixed = torch.stack([augment(img) for img in x]) if len(x) else x
    return cutout(mixed, generator)
