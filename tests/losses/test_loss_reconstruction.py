"""Masked patch MSE (Eq. 5-6) against a per-patch loop with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.losses import MaskedReconstructionLoss, masked_reconstruction


def _batch(batch: int = 3, length: int = 6, patch: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, length, patch, generator=gen, dtype=torch.float64)
    pred = torch.randn(batch, length, patch, generator=gen, dtype=torch.float64)
    mask = (torch.rand(batch, length, generator=gen) < 0.6).double()
    mask[0, 0] = 1.0
    return target, pred, mask


def _naive(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    t, p, m = target.numpy(), pred.numpy(), mask.numpy()
    total, count = 0.0, 0
    for b in range(t.shape[0]):
        for l in range(t.shape[1]):
            if m[b, l] == 0:
                continue
            patch = t[b, l]
            if norm_pix:
                patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
            total += float(np.mean((p[b, l] - patch) ** 2))
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_matches_naive_reference(norm_pix: bool) -> None:
    target, pred, mask = _batch()
    loss = masked_reconstruction(target, pred, mask, norm_pix=norm_pix)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_naive(target, pred, mask, norm_pix), rel=1e-10)


def test_hand_computed() -> None:
    # two patches of two values, target 0: per-patch errors are 1 and 4
    target = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert masked_reconstruction(target, pred, torch.tensor([[1, 0]])).item() == pytest.approx(1.0)
    assert masked_reconstruction(target, pred, torch.tensor([[0, 1]])).item() == pytest.approx(4.0)
    assert masked_reconstruction(target, pred, torch.tensor([[1, 1]])).item() == pytest.approx(2.5)
    # norm_pix: [1, 3] -> mean 2, unbiased var 2 -> [-1, 1] / sqrt(2 + 1e-6); prediction 0
    normed = masked_reconstruction(torch.tensor([[[1.0, 3.0]]]), torch.zeros(1, 1, 2), torch.ones(1, 1), True)
    assert normed.item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)


def test_unmasked_patches_do_not_matter() -> None:
    target, pred, mask = _batch()
    pred = pred.clone().requires_grad_(True)
    loss = masked_reconstruction(target, pred, mask)
    loss.backward()
    kept = mask == 0
    assert pred.grad[kept].abs().max() == 0
    assert pred.grad[~kept].abs().sum() > 0
    changed = pred.detach().clone()
    changed[kept] += 100.0
    assert masked_reconstruction(target, changed, mask).item() == pytest.approx(loss.item(), rel=1e-12)


def test_bool_mask_and_module() -> None:
    target, pred, mask = _batch()
    expected = masked_reconstruction(target, pred, mask, norm_pix=True)
    assert MaskedReconstructionLoss(norm_pix=True)(target, pred, mask.bool()).item() == pytest.approx(
        expected.item()
    )


def test_bf16_autocast_computes_in_float32() -> None:
    target, pred, mask = _batch()
    target, pred = target.bfloat16(), pred.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = masked_reconstruction(target, pred, mask, norm_pix=True)
    assert loss.dtype == torch.float32
    reference = _naive(target.double(), pred.double(), mask, norm_pix=True)
    assert loss.item() == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(
    ("target", "pred", "mask", "norm_pix", "message"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3), False, "no masked patch"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3), False, "differs"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4), False, "mask must be"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.full((2, 3), 0.5), False, "only 0"),
        (torch.zeros(2, 12), torch.zeros(2, 12), torch.ones(2), False, "B, L, P"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.ones(2, 3), True, "norm_pix"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), torch.ones(2, 3), False, "floating"),
    ],
)
def test_rejects_bad_arguments(target, pred, mask, norm_pix: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        masked_reconstruction(target, pred, mask, norm_pix=norm_pix)
