"""Reconstructive learning (MICS Eq. 5-6): MAE's mean squared error on the masked patches only.

The mask is applied once and the sum is divided by the number of masked patches (MAE form), so the
visible patches, which the encoder saw, neither add to the loss nor dilute it.
"""

from __future__ import annotations

from torch import Tensor, nn

from mics.losses._validation import check_values, upcast

__all__ = ["MaskedReconstructionLoss", "masked_reconstruction", "normalize_patches"]

_NORM_PIX_EPS = 1e-6


def _check_inputs(target: Tensor, pred: Tensor, mask: Tensor, norm_pix: bool) -> None:
    for name, x in (("target", target), ("pred", pred)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be [B, L, P] (patchified), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mask must be [B, L] = {tuple(target.shape[:2])}, got shape {tuple(mask.shape)}")
    if norm_pix and target.shape[2] < 2:
        raise ValueError("norm_pix needs at least 2 values per patch to compute a variance")
    if not check_values():
        return
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (kept) and 1 (removed, reconstructed)")
    if not mask.any():
        raise ValueError("mask has no masked patch: the reconstruction loss is undefined")


def normalize_patches(patches: Tensor, eps: float = _NORM_PIX_EPS) -> Tensor:
    """Per-patch standardisation of MAE's norm_pix_loss: patches [B, L, P] -> [B, L, P] with zero mean
    and (unbiased) unit variance over P."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_reconstruction(target: Tensor, pred: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    target: [B, L, P] patchified image; pred: [B, L, P] decoder output; mask: [B, L], 1 = removed
    (reconstructed) patch, bool or float. Returns a scalar. Raises ValueError if nothing is masked.
    """
    _check_inputs(target, pred, mask, norm_pix)
    target, pred = upcast(target), upcast(pred)
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


class MaskedReconstructionLoss(nn.Module):
    """Module form of :func:`masked_reconstruction` with a fixed ``norm_pix`` choice."""

    def __init__(self, norm_pix: bool = False) -> None:
        super().__init__()
        self.norm_pix = bool(norm_pix)

    def forward(self, target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return masked_reconstruction(target, pred, mask, self.norm_pix)

    def extra_repr(self) -> str:
        return f"norm_pix={self.norm_pix}"
