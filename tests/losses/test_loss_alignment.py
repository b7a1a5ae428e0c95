"""High-dimensional InfoNCE (Eq. 7-8) against a loop over pairs with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.losses import InfoNCELoss, info_nce


def _embeddings(batch: int = 5, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g_a = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return g_a, g_a + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)


def _naive(g_a: torch.Tensor, g_b: torch.Tensor, temp: float) -> float:
    a, b = g_a.numpy(), g_b.numpy()
    n = len(a)
    cos = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            cos[i, j] = a[i] @ b[j] / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))
    logits = cos / temp
    a_to_b = -sum(logits[i, i] - math.log(np.exp(logits[i]).sum()) for i in range(n)) / n
    b_to_a = -sum(logits[i, i] - math.log(np.exp(logits[:, i]).sum()) for i in range(n)) / n
    return (a_to_b + b_to_a) / 2


@pytest.mark.parametrize("temp", [0.07, 0.5])
def test_matches_naive_reference(temp: float) -> None:
    g_a, g_b = _embeddings()
    loss = info_nce(g_a, g_b, temp)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_naive(g_a, g_b, temp), rel=1e-10)


def test_scale_invariant_and_symmetric() -> None:
    g_a, g_b = _embeddings()
    loss = info_nce(g_a, g_b, 0.1)
    assert info_nce(3.0 * g_a, 0.2 * g_b, 0.1).item() == pytest.approx(loss.item(), rel=1e-12)
    assert info_nce(g_b, g_a, 0.1).item() == pytest.approx(loss.item(), rel=1e-12)


def test_perfect_alignment_with_low_temperature_is_near_zero() -> None:
    g = torch.eye(4, 32)
    assert info_nce(g, g, 0.01).item() < 1e-6
    # the same embeddings paired with the wrong partner are heavily penalised
    assert info_nce(g, g[[1, 0, 3, 2]], 0.01).item() > 10


def test_learnable_module_gets_gradient_and_is_clamped() -> None:
    g_a, g_b = (x.float().requires_grad_(True) for x in _embeddings())
    module = InfoNCELoss(temp=0.07, learnable=True)
    assert [name for name, _ in module.named_parameters()] == ["temp"]
    module(g_a, g_b).backward()
    assert module.temp.grad is not None and module.temp.grad.abs().item() > 0
    assert g_a.grad is not None and g_b.grad is not None
    with torch.no_grad():
        module.temp.fill_(10.0)
    assert module.current_temp().item() == pytest.approx(0.5)
    assert module(g_a, g_b).item() == pytest.approx(info_nce(g_a, g_b, 0.5).item(), rel=1e-6)


def test_fixed_module_has_no_parameters_or_state() -> None:
    module = InfoNCELoss(temp=0.2)
    assert list(module.parameters()) == []
    assert module.state_dict() == {}
    g_a, g_b = _embeddings()
    assert module(g_a, g_b).item() == pytest.approx(_naive(g_a, g_b, 0.2), rel=1e-6)


def test_bf16_autocast_computes_in_float32() -> None:
    g_a, g_b = (x.float() for x in _embeddings())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = info_nce(g_a, g_b, 0.07)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, info_nce(g_a, g_b, 0.07), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    ("g_a", "g_b", "temp", "message"),
    [
        (torch.zeros(4, 8), torch.zeros(3, 8), 0.1, "g_b"),
        (torch.zeros(4, 8), torch.zeros(4, 9), 0.1, "g_b"),
        (torch.zeros(8), torch.zeros(8), 0.1, "2-D"),
        (torch.zeros(0, 8), torch.zeros(0, 8), 0.1, "empty"),
        (torch.ones(4, 8), torch.ones(4, 8), 0.0, "temp"),
        (torch.ones(4, 8), torch.ones(4, 8), torch.tensor(-1.0), "temp"),
        (torch.ones(4, 8), torch.ones(4, 8), float("nan"), "temp"),
    ],
)
def test_rejects_bad_arguments(g_a, g_b, temp, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        info_nce(g_a, g_b, temp)


def test_module_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temp"):
        InfoNCELoss(temp=-0.1)
    with pytest.raises(ValueError, match="outside"):
        InfoNCELoss(temp=0.9, learnable=True)
    with pytest.raises(ValueError, match="temp_range"):
        InfoNCELoss(temp_range=(0.5, 0.1))
