"""Aligned learning (MICS Eq. 7-8): symmetric InfoNCE between the high-dimensional global embeddings
(GloE) of the two modalities; the positive of each sample is its own partner (the diagonal)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mics.losses._validation import check_float_matrix, check_temperature, upcast

__all__ = ["InfoNCELoss", "info_nce"]


def info_nce(g_a: Tensor, g_b: Tensor, temp: Tensor | float) -> Tensor:
    """Symmetric InfoNCE with cosine similarity.

    g_a, g_b: [B, d] embeddings of the two modalities, row i of each from the same sample (normalised
    here, so raw projections are fine); temp: positive scalar, may be a learnable tensor.
    Returns the scalar (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2, logits = cos(g_a, g_b) / temp.
    """
    check_float_matrix("g_a", g_a)
    check_float_matrix("g_b", g_b, *g_a.shape)
    if g_a.shape[0] == 0:
        raise ValueError("g_a is empty: the batch needs at least one pair")
    check_temperature(temp)
    a = F.normalize(upcast(g_a), dim=1)
    b = F.normalize(upcast(g_b), dim=1)
    # cross-entropy of bf16 logits is too coarse once temp is small
    logits = upcast(a @ b.T) / temp
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce` that owns its temperature.

    learnable=True makes the temperature a parameter, clamped to ``temp_range`` in the forward pass
    (METHOD.md: tau learnable, init 0.07, clamped to [0.001, 0.5]); otherwise it is a fixed,
    non-persistent buffer that follows the module's device.
    """

    temp: Tensor

    def __init__(
        self, temp: float = 0.07, learnable: bool = False, temp_range: tuple[float, float] = (0.001, 0.5)
    ) -> None:
        super().__init__()
        low, high = temp_range
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"temp_range must satisfy 0 < low <= high, got {temp_range}")
        check_temperature(temp)
        if learnable and not low <= temp <= high:
            raise ValueError(f"initial temp {temp} is outside temp_range {temp_range}")
        self.learnable = bool(learnable)
        self.temp_range = (float(low), float(high))
        value = torch.tensor(float(temp))
        if learnable:
            self.temp = nn.Parameter(value)
        else:
            self.register_buffer("temp", value, persistent=False)

    def current_temp(self) -> Tensor:
        """The temperature used by forward: clamped to temp_range when learnable (0-dim tensor)."""
        return self.temp.clamp(*self.temp_range) if self.learnable else self.temp

    def forward(self, g_a: Tensor, g_b: Tensor) -> Tensor:
        return info_nce(g_a, g_b, self.current_temp())

    def extra_repr(self) -> str:
        return f"temp={float(self.temp):.4g}, learnable={self.learnable}, temp_range={self.temp_range}"
