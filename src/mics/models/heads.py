"""Small heads on top of encoder features: projection, global embedding (GloE), classifier, evidence.

The normalised / evidence outputs are computed in float32 so that, under bf16 autocast, similarities with
the float32 feature queues and the digamma terms of the evidential loss keep full precision.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Classifier", "EvidentialHead", "GlobalEmbedding", "Projection"]


def _check_dims(in_dim: int, out_dim: int) -> None:
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")


def _check_features(x: Tensor, in_dim: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ValueError(f"expected features [B, {in_dim}], got {list(x.shape)}")


class Projection(nn.Module):
    """Low-dimensional projection p for consistency learning: x [B, in] -> unit vectors [B, out]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim)
        self.in_dim = in_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in] -> [B, out], L2-normalised (float32)."""
        _check_features(x, self.in_dim)
        return F.normalize(self.proj(x).float(), dim=-1)


class GlobalEmbedding(nn.Module):
    """GloE: lifts CLS features into a space wider than the encoder (aligned learning, Eq. 7-8).

    Linear -> GELU -> Linear, both of width ``out_dim``, then L2-normalised. ``out_dim`` must exceed
    ``in_dim``: the paper's point is a *higher*-dimensional space than the encoder features.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim)
        if out_dim <= in_dim:
            raise ValueError(
                f"GlobalEmbedding must map to a higher dimension: out_dim={out_dim} <= in_dim={in_dim} "
                "(set model.gloe_mult > 1)"
            )
        self.in_dim = in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in] -> [B, out], L2-normalised (float32)."""
        _check_features(x, self.in_dim)
        return F.normalize(self.net(x).float(), dim=-1)


class Classifier(nn.Module):
    """Linear classifier: x [B, in] -> logits [B, C].

    No LayerNorm by default: the fused feature is already normalised by the fusion encoder, and a second
    norm would rescale the SVD shift added to it before classification (Eq. 15).
    """

    def __init__(self, in_dim: int, num_classes: int, norm: bool = False) -> None:
        super().__init__()
        _check_dims(in_dim, num_classes)
        self.in_dim = in_dim
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in] -> logits [B, C]."""
        _check_features(x, self.in_dim)
        return self.fc(self.norm(x))


class EvidentialHead(nn.Module):
    """TMC evidence head: x [B, in] -> evidence e = softplus(Linear(x)) >= 0, [B, C] (float32)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        _check_dims(in_dim, num_classes)
        self.in_dim = in_dim
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in] -> evidence [B, C], non-negative."""
        _check_features(x, self.in_dim)
        return F.softplus(self.fc(x).float())
