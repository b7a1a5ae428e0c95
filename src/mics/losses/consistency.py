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

__all__ = ["MomentumDistilledContrastiveLoss", "momentum_distilled_contrastive", "positive_targets"]


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


def positive_targets(
    batch: int, num_keys: int, idx: Tensor | None, idx_keys: Tensor | None, device: torch.device
) -> Tensor:
    """Hard targets [B, B + K] whose rows sum to 1: the diagonal of the current batch, or, given sample
    indices, every key holding the same sample (its queued earlier features too), spread uniformly.

    idx: [B] sample indices of the batch; idx_keys: [B + K] indices of the keys (-1 = no sample).
    """
    # float64 where the device has it: 1/n is rounded once, when the targets meet the logits' dtype
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if idx is None or idx_keys is None:
        return torch.eye(batch, num_keys, device=device, dtype=dtype)
    same = (idx.view(-1, 1) == idx_keys.view(1, -1)).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def _distilled_direction(
    query: Tensor, query_m: Tensor, keys: Tensor, temp: Tensor | float, alpha: float, positives: Tensor
) -> Tensor:
    """Soft-target cross-entropy of one direction (e.g. WLI -> NBI).

    query: [B, d] online features; query_m: [B, d] their momentum counterparts;
    keys: [B + K, d] momentum features of the other modality, current batch first;
    positives: [B, B + K] hard targets (see :func:`positive_targets`).
    Returns a scalar: -mean_i sum_j target[i, j] * log_softmax(query @ keys.T / temp)[i, j].
    """
    # log_softmax of bf16 logits loses the small probabilities the queue negatives carry
    logits = upcast(query @ keys.T) / temp
    with torch.no_grad():
        logits_m = upcast(query_m @ keys.T) / temp
        positives = positives.to(logits_m.dtype)
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
    idx: Tensor | None = None,
    idx_queue: Tensor | None = None,
) -> Tensor:
    """Momentum-distilled contrastive loss between modalities A and B (MICS Eq. 1-4).

    z_a, z_b: [B, d] L2-normalised online features; z_a_m, z_b_m: [B, d] momentum features;
    queue_a, queue_b: [K, d] momentum features of earlier batches (K may be 0), excluding the current one;
    temp: positive scalar, may be a learnable tensor (the caller clamps it); alpha in [0, 1].
    idx: [B] sample indices and idx_queue: [K] the queued features' sample indices (-1 = empty): when both
    are given, a queued feature of the same sample is a positive (ALBEF's idx_queue), not a negative.
    Returns the scalar (L_ab + L_ba) / 2.

    Momentum features and queues are detached: the momentum encoders are updated by EMA only.
    """
    _check_inputs(z_a, z_b, z_a_m, z_b_m, queue_a, queue_b, temp, alpha)
    if (idx is None) != (idx_queue is None):
        raise ValueError("give both idx and idx_queue, or neither")
    idx_keys = None
    if idx is not None and idx_queue is not None:
        if idx.shape != (z_a.shape[0],) or idx_queue.shape != (queue_a.shape[0],):
            raise ValueError(
                f"idx must be [{z_a.shape[0]}] and idx_queue [{queue_a.shape[0]}], "
                f"got {tuple(idx.shape)} and {tuple(idx_queue.shape)}"
            )
        idx_keys = torch.cat([idx, idx_queue.to(idx.device, idx.dtype)])
    z_a_m, z_b_m = z_a_m.detach(), z_b_m.detach()
    all_a = torch.cat([z_a_m, queue_a.detach().to(z_a_m.dtype)])
    all_b = torch.cat([z_b_m, queue_b.detach().to(z_b_m.dtype)])
    positives = positive_targets(z_a.shape[0], all_a.shape[0], idx, idx_keys, z_a.device)
    loss_ab = _distilled_direction(z_a, z_a_m, all_b, temp, alpha, positives)
    loss_ba = _distilled_direction(z_b, z_b_m, all_a, temp, alpha, positives)
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
        idx: Tensor | None = None,
        idx_queue: Tensor | None = None,
    ) -> Tensor:
        return momentum_distilled_contrastive(
            z_a, z_b, z_a_m, z_b_m, queue_a, queue_b, temp, alpha, idx, idx_queue
        )
