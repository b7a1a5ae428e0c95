"""Momentum (EMA) copies of modules and the feature queues of consistency learning (ALBEF style)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureQueue", "all_gather_nograd", "momentum_copy", "momentum_update"]


def momentum_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with every parameter frozen, to be driven by :func:`momentum_update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def _paired(online: list[Tensor], target: list[Tensor], kind: str) -> None:
    if len(online) != len(target):
        raise ValueError(
            f"online and target modules have different numbers of {kind}: {len(online)} vs {len(target)}"
        )
    for i, (o, t) in enumerate(zip(online, target, strict=True)):
        if o.shape != t.shape:
            raise ValueError(
                f"{kind} #{i} differs in shape: online {list(o.shape)} vs target {list(t.shape)}"
            )


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online for every parameter; buffers are copied from ``online``.

    Both modules must have the same structure (as made by :func:`momentum_copy`). The parameter update is a
    single fused ``torch._foreach_lerp_`` call where PyTorch provides it, since a Python loop launches two
    small kernels per tensor, which dominates the step time of a ViT-B on a GPU.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    src = [p.detach() for p in online.parameters()]
    dst = [p.detach() for p in target.parameters()]
    _paired(src, dst, "parameters")
    # lerp(t, o, w) = t + w * (o - t) = (1 - w) * t + w * o, so w = 1 - m.
    weight = 1.0 - m
    if dst:
        if hasattr(torch, "_foreach_lerp_"):
            torch._foreach_lerp_(dst, src, weight)
        else:
            for t, o in zip(dst, src, strict=True):
                t.lerp_(o, weight)
    src_buffers = list(online.buffers())
    dst_buffers = list(target.buffers())
    _paired(src_buffers, dst_buffers, "buffers")
    for t, o in zip(dst_buffers, src_buffers, strict=True):
        t.copy_(o)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_gather_nograd(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0, in rank order -> [world*B, ...].

    The identity when torch.distributed is not initialised or has a single rank. Every rank must pass a
    tensor of the same shape. No gradient flows back through the gather.
    """
    world = _world_size()
    if world == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class FeatureQueue(nn.Module):
    """Ring buffer of the ``size`` most recent momentum features (ALBEF's image / text queues).

    Buffers (checkpointed with the module): ``queue`` [size, dim] float32, started with random unit vectors,
    ``ptr`` [1] long, the next row to write, and with ``track_index`` ``index`` [size] long, the sample
    index of each row (-1 while a row holds no sample's feature).
    """

    queue: Tensor
    ptr: Tensor
    index: Tensor

    def __init__(self, dim: int, size: int, track_index: bool = False) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"queue dim and size must be positive, got dim={dim}, size={size}")
        self.dim = dim
        self.size = size
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.track_index = track_index
        if track_index:
            self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, feats: Tensor, index: Tensor | None = None) -> None:
        """Write feats [B, dim] (all-gathered across ranks first) over the oldest rows, wrapping around;
        with ``track_index`` also their sample indices ``index`` [B]."""
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {list(feats.shape)}")
        if self.track_index and (index is None or index.shape != feats.shape[:1]):
            raise ValueError(f"this queue tracks sample indices: give index [{feats.shape[0]}] with feats")
        feats = all_gather_nograd(feats.detach())
        batch = feats.shape[0]
        if batch == 0 or self.size % batch != 0:
            raise ValueError(
                f"queue size {self.size} must be a multiple of the global batch {batch} "
                f"(per-rank batch {batch // _world_size()} x {_world_size()} ranks); "
                "use drop_last batches and set the queue size to a multiple of the global batch"
            )
        # Indices are computed on the device from the tensor pointer, so no host synchronisation is needed.
        rows = (self.ptr + torch.arange(batch, device=self.ptr.device)) % self.size
        self.queue.index_copy_(0, rows, feats.to(self.queue.dtype))
        if self.track_index and index is not None:
            gathered = all_gather_nograd(index.to(self.index.device, torch.long))
            self.index.index_copy_(0, rows, gathered)
        self.ptr.copy_((self.ptr + batch) % self.size)

    @property
    def features(self) -> Tensor:
        """The stored features [size, dim], detached; a view, so clone it if you enqueue before backward."""
        return self.queue.detach()

    @property
    def indices(self) -> Tensor:
        """Sample index of each stored row [size] (-1 = empty); needs ``track_index``."""
        if not self.track_index:
            raise RuntimeError("this queue does not track sample indices (track_index=False)")
        return self.index.detach()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, track_index={self.track_index}"
