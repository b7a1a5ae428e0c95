"""Dirichlet opinions, Dempster-Shafer combination and TMC's loss (Eq. 16-22): hand-computed examples,
a loop over class pairs, and scipy references for digamma / lgamma / Dirichlet entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from mics.losses import (
    EvidentialLoss,
    annealing_coefficient,
    combine_opinions,
    ds_combine,
    evidential_loss,
    kl_dirichlet_uniform,
    opinion_from_alpha,
    opinion_from_evidence,
)


def _alpha(batch: int = 4, classes: int = 3, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1 + scale * torch.rand(batch, classes, generator=gen, dtype=torch.float64)


def _naive_ds(alpha1: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
    """Dempster's rule sample by sample, the conflict summed over every pair of different classes."""
    out = []
    for a1, a2 in zip(alpha1.tolist(), alpha2.tolist(), strict=True):
        c = len(a1)
        s1, s2 = sum(a1), sum(a2)
        b1 = [(x - 1) / s1 for x in a1]
        b2 = [(x - 1) / s2 for x in a2]
        u1, u2 = c / s1, c / s2
        conflict = sum(b1[i] * b2[j] for i in range(c) for j in range(c) if i != j)
        b = [(b1[k] * b2[k] + b1[k] * u2 + b2[k] * u1) / (1 - conflict) for k in range(c)]
        u = u1 * u2 / (1 - conflict)
        out.append([bk * c / u + 1 for bk in b])
    return torch.tensor(out, dtype=torch.float64)


def test_opinion_from_evidence_hand_computed() -> None:
    # e = [2, 0] -> alpha = [3, 1], S = 4, b = [1/2, 0], u = 2/4
    op = opinion_from_evidence(torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(op.alpha, torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(op.strength, torch.tensor([[4.0]]))
    torch.testing.assert_close(op.belief, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(op.uncertainty, torch.tensor([[0.5]]))
    same = opinion_from_alpha(torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(same.belief, op.belief)


def test_ds_combine_hand_computed_two_classes() -> None:
    # view 1: alpha [3, 1]: S1 = 4, b1 = [1/2, 0],   u1 = 1/2
    # view 2: alpha [2, 2]: S2 = 4, b2 = [1/4, 1/4], u2 = 1/2
    # K = b1_0 b2_1 + b1_1 b2_0 = 1/8 + 0 = 1/8 ; 1 - K = 7/8
    # b_0 = (1/8 + 1/4 + 1/8) / (7/8) = 4/7 ; b_1 = (0 + 0 + 1/8) / (7/8) = 1/7 ; u = (1/4) / (7/8) = 2/7
    # S = C / u = 2 / (2/7) = 7 ; alpha = b S + 1 = [5, 2]
    combined = ds_combine(torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(combined, torch.tensor([[5.0, 2.0]]))
    op = opinion_from_alpha(combined)
    torch.testing.assert_close(op.belief, torch.tensor([[4 / 7, 1 / 7]]))
    torch.testing.assert_close(op.uncertainty, torch.tensor([[2 / 7]]))


def test_ds_combine_hand_computed_three_classes() -> None:
    # view 1: alpha [5, 2, 1]: S1 = 8, b1 = [1/2, 1/8, 0],   u1 = 3/8
    # view 2: alpha [1, 3, 2]: S2 = 6, b2 = [0, 1/3, 1/6],   u2 = 1/2
    # K = b1_0 (b2_1 + b2_2) + b1_1 (b2_0 + b2_2) + b1_2 (b2_0 + b2_1) = 1/4 + 1/48 + 0 = 13/48
    # 1 - K = 35/48
    # b_0 = (0 + 1/4 + 0) * 48/35 = 12/35
    # b_1 = (1/24 + 1/16 + 1/8) * 48/35 = (11/48) * 48/35 = 11/35
    # b_2 = (0 + 0 + 1/16) * 48/35 = 3/35
    # u = (3/16) * 48/35 = 9/35  (check: 12 + 11 + 3 + 9 = 35)
    # S = 3 / u = 35/3 ; alpha = b S + 1 = [4 + 1, 11/3 + 1, 1 + 1] = [5, 14/3, 2]
    combined = ds_combine(torch.tensor([[5.0, 2.0, 1.0]]), torch.tensor([[1.0, 3.0, 2.0]]))
    torch.testing.assert_close(combined, torch.tensor([[5.0, 14 / 3, 2.0]]))
    op = opinion_from_alpha(combined)
    torch.testing.assert_close(op.belief, torch.tensor([[12 / 35, 11 / 35, 3 / 35]]))
    torch.testing.assert_close(op.uncertainty, torch.tensor([[9 / 35]]))


@pytest.mark.parametrize("scale", [0.5, 3.0, 50.0])
def test_ds_combine_matches_pairwise_loop(scale: float) -> None:
    a1, a2 = _alpha(seed=1, scale=scale, classes=4), _alpha(seed=2, scale=scale, classes=4)
    torch.testing.assert_close(ds_combine(a1, a2), _naive_ds(a1, a2), rtol=1e-10, atol=1e-10)


def test_ds_combine_properties() -> None:
    a1, a2, a3 = _alpha(seed=1), _alpha(seed=2), _alpha(seed=3)
    vacuous = torch.ones_like(a1)
    torch.testing.assert_close(ds_combine(vacuous, a2), a2)
    torch.testing.assert_close(ds_combine(a1, vacuous), a1)
    torch.testing.assert_close(ds_combine(a1, a2), ds_combine(a2, a1))
    torch.testing.assert_close(ds_combine(ds_combine(a1, a2), a3), ds_combine(a1, ds_combine(a2, a3)))
    # in evidence terms the rule is e = e1 + e2 + e1 e2 / C
    e1, e2 = a1 - 1, a2 - 1
    torch.testing.assert_close(ds_combine(a1, a2) - 1, e1 + e2 + e1 * e2 / 3)
    op = opinion_from_alpha(ds_combine(a1, a2))
    torch.testing.assert_close(
        op.belief.sum(1, keepdim=True) + op.uncertainty, torch.ones(4, 1, dtype=a1.dtype)
    )
    u1, u2 = opinion_from_alpha(a1).uncertainty, opinion_from_alpha(a2).uncertainty
    assert (op.uncertainty <= torch.minimum(u1, u2)).all()


def test_ds_combine_agreeing_opinions_reduce_uncertainty() -> None:
    # both views put all their evidence on class 1: no conflict, u = u1 u2 < min(u1, u2)
    a1 = torch.tensor([[1.0, 5.0, 1.0]])
    a2 = torch.tensor([[1.0, 2.0, 1.0]])
    u1, u2 = 3 / 7, 3 / 4
    u = opinion_from_alpha(ds_combine(a1, a2)).uncertainty
    torch.testing.assert_close(u, torch.tensor([[u1 * u2]]))
    assert u.item() < min(u1, u2)


def test_ds_combine_stays_finite_for_confident_conflicting_views() -> None:
    # in float32, 1 - K computed as 1 minus the conflict is exactly 0 here (0 / 0 = nan);
    # the combined evidence is e1 + e2 + e1 e2 / C = [1e9, 1e9]
    a1 = torch.tensor([[1e9 + 1, 1.0]])
    a2 = torch.tensor([[1.0, 1e9 + 1]])
    combined = ds_combine(a1, a2)
    torch.testing.assert_close(combined, torch.tensor([[1e9, 1e9]]), rtol=1e-6, atol=0)
    op = opinion_from_alpha(combined)
    torch.testing.assert_close(op.belief, torch.tensor([[0.5, 0.5]]))


def test_combine_opinions_folds_left_to_right() -> None:
    a1, a2, a3 = _alpha(seed=1), _alpha(seed=2), _alpha(seed=3)
    torch.testing.assert_close(combine_opinions([a1, a2, a3]), ds_combine(ds_combine(a1, a2), a3))
    torch.testing.assert_close(combine_opinions([a1]), a1)
    with pytest.raises(ValueError, match="at least one"):
        combine_opinions([])


def _scipy_kl_uniform(alpha: np.ndarray) -> float:
    s = alpha.sum()
    c = len(alpha)
    return float(
        special.gammaln(s)
        - special.gammaln(alpha).sum()
        - special.gammaln(c)
        + ((alpha - 1) * (special.digamma(alpha) - special.digamma(s))).sum()
    )


def test_kl_dirichlet_uniform_closed_form_and_entropy() -> None:
    alpha = _alpha(classes=5, scale=4.0)
    kl = kl_dirichlet_uniform(alpha)
    assert kl.shape == (4,)
    for row, value in zip(alpha.numpy(), kl.tolist(), strict=True):
        assert value == pytest.approx(_scipy_kl_uniform(row), rel=1e-10)
        # KL(p || Dir(1)) = -H(p) - log(density of Dir(1)) = -H(p) - log Gamma(C)
        assert value == pytest.approx(-stats.dirichlet(row).entropy() - special.gammaln(5), rel=1e-8)
    torch.testing.assert_close(kl_dirichlet_uniform(torch.ones(2, 3)), torch.zeros(2))


def _scipy_loss(alpha: np.ndarray, target: np.ndarray, lambda_t: float) -> float:
    total = 0.0
    for a, y in zip(alpha, target, strict=True):
        fit = special.digamma(a.sum()) - special.digamma(a[y])
        a_tilde = a.copy()
        a_tilde[y] = 1.0
        total += fit + lambda_t * _scipy_kl_uniform(a_tilde)
    return total / len(alpha)


@pytest.mark.parametrize("lambda_t", [0.0, 0.3, 1.0])
def test_evidential_loss_matches_scipy(lambda_t: float) -> None:
    alpha = _alpha(batch=6, classes=4)
    target = torch.tensor([0, 3, 1, 1, 2, 0])
    loss = evidential_loss(alpha, target, lambda_t)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_scipy_loss(alpha.numpy(), target.numpy(), lambda_t), rel=1e-10)
    assert EvidentialLoss()(alpha, target, lambda_t).item() == pytest.approx(loss.item())


def test_evidential_loss_hand_computed() -> None:
    # alpha [2, 3], y = 0: S = 5, fit = digamma(5) - digamma(2) = 1/2 + 1/3 + 1/4 = 13/12
    # alpha~ = [1, 3]: KL(Beta(1, 3) || U) = lgamma(4) - lgamma(3) + 2 (digamma(3) - digamma(4)) = log 3 - 2/3
    alpha = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0])
    assert evidential_loss(alpha, target, 0.0).item() == pytest.approx(13 / 12, rel=1e-12)
    assert evidential_loss(alpha, target, 1.0).item() == pytest.approx(
        13 / 12 + math.log(3) - 2 / 3, rel=1e-12
    )
    # all evidence on the true class: alpha~ is uniform, the KL term vanishes: digamma(3) - digamma(2) = 1/2
    right = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    assert evidential_loss(right, target, 1.0).item() == pytest.approx(0.5, rel=1e-12)


def test_evidential_loss_gradient_through_softplus_evidence() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    alpha = opinion_from_evidence(torch.nn.functional.softplus(logits)).alpha
    evidential_loss(alpha, torch.tensor([0, 1, 2, 0, 1]), 0.5).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bf16_autocast_computes_in_float32() -> None:
    layer = torch.nn.Linear(8, 3)
    x = torch.randn(6, 8)
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        evidence = torch.nn.functional.softplus(layer(x))
        assert evidence.dtype == torch.bfloat16
        views = [opinion_from_evidence(evidence).alpha, opinion_from_evidence(evidence.flip(0)).alpha]
        fused = combine_opinions(views)
        loss = evidential_loss(fused, target, 1.0)
        kl = kl_dirichlet_uniform(evidence + 1)
    assert fused.dtype == loss.dtype == kl.dtype == torch.float32
    exact_views = [evidence.float() + 1, evidence.float().flip(0) + 1]
    torch.testing.assert_close(loss, evidential_loss(combine_opinions(exact_views), target, 1.0))
    torch.testing.assert_close(kl, kl_dirichlet_uniform((evidence + 1).float()))
    rounded = (evidence + 1).detach()
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(
        evidential_loss(rounded, target, 0.5), evidential_loss(rounded.float(), target, 0.5)
    )


def test_annealing_coefficient() -> None:
    assert annealing_coefficient(0, 10) == 0.0
    assert annealing_coefficient(5, 10) == 0.5
    assert annealing_coefficient(10, 10) == 1.0
    assert annealing_coefficient(50, 10) == 1.0
    assert annealing_coefficient(3, 0) == 1.0
    with pytest.raises(ValueError, match="epoch"):
        annealing_coefficient(-1, 10)
    with pytest.raises(ValueError, match="annealing_epochs"):
        annealing_coefficient(1, -5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: opinion_from_evidence(torch.tensor([[1.0, -0.5]])), "non-negative"),
        (lambda: opinion_from_evidence(torch.tensor([1.0, 2.0])), "2-D"),
        (lambda: opinion_from_evidence(torch.tensor([[1.0], [2.0]])), "2 classes"),
        (lambda: opinion_from_alpha(torch.tensor([[0.5, 2.0]])), ">= 1"),
        (lambda: opinion_from_alpha(torch.tensor([[1, 2]])), "floating"),
        (lambda: ds_combine(torch.ones(2, 3), torch.ones(2, 4)), "differ"),
        (lambda: ds_combine(torch.ones(2, 3), torch.zeros(2, 3)), "alpha2"),
        (lambda: combine_opinions([torch.ones(2, 3), torch.ones(3, 3)]), "differ"),
        (lambda: kl_dirichlet_uniform(torch.tensor([[0.0, 1.0]])), "positive"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([0, 3]), 1.0), r"\[0, 3\)"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([0, -1]), 1.0), r"\[0, 3\)"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([0.0, 1.0]), 1.0), "integer"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([[0], [1]]), 1.0), "shape"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([0, 1, 2]), 1.0), "shape"),
        (lambda: evidential_loss(torch.ones(2, 3), torch.tensor([0, 1]), -0.1), "lambda_t"),
        (lambda: evidential_loss(torch.ones(0, 3), torch.tensor([], dtype=torch.long), 1.0), "empty"),
    ],
)
def test_rejects_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
