"""Consistency learning (MICS Eq. 1-4): ALBEF's image-text contrastive loss with momentum distillation.

The "text" of ALBEF is the NBI image here: modality A = WLI, modality B = NBI. Each online feature is
contrasted with the momentum features of the other modality, the current batch first (the positive of
row i is column i) followed by a queue of momentum features of earlier batches. The hard one-hot target
is softened with the momentum model's own similarity distribution (weight ``alpha``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mics.losses._validation import check_float_matrix, check_temperature, check_unit_interval, upcast

__all__ = ["MomentumDistilledContrastiveLoss", "momentum_distilled_contrastive"]


def _check_inputs(
    z_a: Tensor,
    z_b: Tensor,
    z_a_m: Tensor,
    z_b_m: Tensor,
    queue_a: Tensor,
    queue_b: Tensor,
    temp: Tensor | float,
    alpha: float,
) -> None:
    check_float_matrix("z_a", z_a)
    batch, dim = z_a.shape
    if batch == 0:
        raise ValueError("z_a is empty: the batch needs at least one pair")
    check_float_matrix("z_b", z_b, batch, dim)
    check_float_matrix("z_a_m", z_a_m, batch, dim)
    check_float_matrix("z_b_m", z_b_m, batch, dim)
    check_float_matrix("queue_a", queue_a, cols=dim)
    check_float_matrix("queue_b", queue_b, queue_a.shape[0], dim)
    check_temperature(temp)
    check_unit_interval("alpha", alpha)


def _distilled_direction(
    query: Tensor, query_m: Tensor, keys: Tensor, temp: Tensor | float, alpha: float
) -> Tensor:
    """Soft-target cross-entropy of one direction (e.g. WLI -> NBI).

    query: [B, d] online features; query_m: [B, d] their momentum counterparts;
    keys: [B + K, d] momentum features of the other modality, current batch first.
    Returns a scalar: -mean_i sum_j target[i, j] * log_softmax(query @ keys.T / temp)[i, j].
    """
    batch = query.shape[0]
    # log_softmax of bf16 logits loses the small probabilities the queue negatives carry
    logits = upcast(query @ keys.T) / temp
    with torch.no_grad():
        logits_m = upcast(query_m @ keys.T) / temp
        positives = torch.eye(batch, keys.shape[0], dtype=logits_m.dtype, device=logits_m.device)
        targets = alpha * logits_m.softmax(dim=1) + (1.0 - alpha) * positives
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def momentum_distilled_contrastive(
    z_a: Tensor,
    z_b: Tensor,
    z_a_m: Tensor,
    z_b_m: Tensor,
    queue_a: Tensor,
    queue_b: Tensor,
    temp: Tensor | float,
    alpha: float,
) -> Tensor:
    """Momentum-distilled contrastive loss between modalities A and B (MICS Eq. 1-4).

    z_a, z_b: [B, d] L2-normalised online features; z_a_m, z_b_m: [B, d] momentum features;
    queue_a, queue_b: [K, d] momentum features of earlier batches (K may be 0), excluding the current one;
    temp: positive scalar, may be a learnable tensor (the caller clamps it); alpha in [0, 1].
    Returns the scalar (L_ab + L_ba) / 2.

    Momentum features and queues are detached: the momentum encoders are updated by EMA only.
    """
    _check_inputs(z_a, z_b, z_a_m, z_b_m, queue_a, queue_b, temp, alpha)
    z_a_m, z_b_m = z_a_m.detach(), z_b_m.detach()
    all_a = torch.cat([z_a_m, queue_a.detach().to(z_a_m.dtype)])
    all_b = torch.cat([z_b_m, queue_b.detach().to(z_b_m.dtype)])
    loss_ab = _distilled_direction(z_a, z_a_m, all_b, temp, alpha)
    loss_ba = _distilled_direction(z_b, z_b_m, all_a, temp, alpha)
    return (loss_ab + loss_ba) / 2


class MomentumDistilledContrastiveLoss(nn.Module):
    """Module form of :func:`momentum_distilled_contrastive`; holds no parameters (the temperature is
    owned by the model so that it is optimised and clamped with it)."""

    def forward(
        self,
        z_a: Tensor,
        z_b: Tensor,
        z_a_m: Tensor,
        z_b_m: Tensor,
        queue_a: Tensor,
        queue_b: Tensor,
        temp: Tensor | float,
        alpha: float,
    ) -> Tensor:
        return momentum_distilled_contrastive(z_a, z_b, z_a_m, z_b_m, queue_a, queue_b, temp, alpha)
