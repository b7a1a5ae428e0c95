"""FreeMatch's self-adaptive thresholds after two updates and its (negative) fairness term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm
from mics.methods.ssl.freematch import FairnessLoss, fairness_loss, self_adaptive_mask


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


BATCH_1 = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]
BATCH_2 = [[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.36, 0.30, 0.34]]


def test_tau_local_estimate_and_histogram_after_two_updates() -> None:
    algo = build_algorithm("freematch", 3, 10, SSLConfig(params={"ema_p": 0.9}))
    algo.unlabelled_loss(_log(BATCH_1), torch.zeros(2, 3), torch.arange(2), 0, 10)
    # tau = 0.9 / 3 + 0.1 * mean(0.7, 0.6); p~ = 0.9 / 3 + 0.1 * (0.4, 0.4, 0.2)
    assert algo.tau.item() == pytest.approx(0.365, abs=1e-6)
    assert algo.p_tilde.tolist() == pytest.approx([0.34, 0.34, 0.32], abs=1e-6)
    assert algo.label_hist.tolist() == pytest.approx([0.35, 0.35, 0.30], abs=1e-6)

    out = algo.unlabelled_loss(_log(BATCH_2), torch.zeros(3, 3), torch.arange(3), 1, 10)
    # tau = 0.9 * 0.365 + 0.1 * mean(0.8, 0.6, 0.36)
    assert algo.tau.item() == pytest.approx(0.3871667, abs=1e-6)
    assert algo.p_tilde.tolist() == pytest.approx([0.3513333, 0.326, 0.3226667], abs=1e-6)
    assert algo.label_hist.tolist() == pytest.approx([0.3816667, 0.315, 0.3033333], abs=1e-6)
    # class thresholds tau * p~ / max p~ = (0.38717, 0.35925, 0.35558): 0.36 (class 0) is out
    assert out.mask.tolist() == [1.0, 1.0, 0.0]
    assert out.logs["threshold"] == pytest.approx(0.3871667, abs=1e-6)
    assert out.logs["class_threshold_min"] == pytest.approx(0.3555762, abs=1e-6)


def test_fairness_term_on_hand_computed_examples() -> None:
    logits = _log([[0.8, 0.2], [0.3, 0.7]])
    # hist_s = (0.5, 0.5), mean p_s = (0.55, 0.45); target SumNorm((0.6, 0.4) / (0.5, 0.5)) = (0.6, 0.4)
    value = fairness_loss(logits, torch.ones(2), torch.tensor([0.6, 0.4]), torch.tensor([0.5, 0.5]))
    assert value.item() == pytest.approx(0.6 * math.log(0.55) + 0.4 * math.log(0.45), rel=1e-5)
    assert value.item() < 0
    # both predicted as class 0: class 1 gets weight 1/0 := 0, so its log-term is log(1e-12)
    one_class = fairness_loss(
        _log([[0.8, 0.2], [0.6, 0.4]]), torch.ones(2), torch.ones(2) / 2, torch.ones(2) / 2
    )
    assert one_class.item() == pytest.approx(0.5 * math.log(1e-12), rel=1e-5)
    nothing = fairness_loss(logits.requires_grad_(True), torch.zeros(2), torch.ones(2) / 2, torch.ones(2) / 2)
    assert nothing.item() == 0.0 and nothing.requires_grad


def _reference_fairness(logits_s, mask, p_model, label_hist) -> float:
    rows = [r for r, m in zip(logits_s, mask, strict=True) if m > 0]
    probs = [np.exp(r) / np.exp(r).sum() for r in rows]
    c = len(p_model)
    hist = np.zeros(c)
    for p in probs:
        hist[int(np.argmax(p))] += 1
    hist /= hist.sum()
    u = np.array([p_model[k] / label_hist[k] for k in range(c)])
    u /= u.sum()
    mean = np.mean(probs, axis=0)
    v = np.array([mean[k] / hist[k] if hist[k] > 0 else 0.0 for k in range(c)])
    v /= v.sum()
    return float(sum(u[k] * math.log(v[k] + 1e-12) for k in range(c)))


def test_fairness_term_matches_loop_reference_and_module_validates() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        logits = rng.normal(size=(7, 4)) * 2
        mask = (rng.uniform(size=7) > 0.3).astype(float)
        mask[0] = 1.0
        p_model = rng.dirichlet(np.ones(4))
        hist = rng.dirichlet(np.ones(4))
        got = FairnessLoss()(
            torch.tensor(logits), torch.tensor(mask), torch.tensor(p_model), torch.tensor(hist)
        ).item()
        assert got == pytest.approx(_reference_fairness(logits, mask, p_model, hist), rel=1e-9)
    with pytest.raises(ValueError, match="p_tilde and label_hist"):
        FairnessLoss()(torch.zeros(2, 3), torch.ones(2), torch.ones(2), torch.ones(3))


def test_loss_combines_consistency_and_weighted_fairness() -> None:
    cfg = SSLConfig(lambda_u=2.0, params={"ema_p": 0.9, "lambda_f": 0.5})
    algo = build_algorithm("freematch", 3, 10, cfg)
    logits_s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    out = algo.unlabelled_loss(_log(BATCH_1), logits_s, torch.arange(2), 0, 10)
    assert out.mask.tolist() == [1.0, 1.0]
    expected = 2.0 * out.logs["unsup_loss"] + 0.5 * out.logs["fairness_loss"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.logs["fairness_loss"] < 0


def test_self_adaptive_mask_keeps_a_confidence_equal_to_its_threshold() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]])
    mask, thresholds = self_adaptive_mask(probs, torch.tensor(0.5), torch.tensor([0.5, 1.0, 0.25]))
    # tau * MaxNorm(p_tilde) = (0.25, 0.5, 0.125): row 1 sits exactly on its class's threshold
    assert thresholds.tolist() == [0.25, 0.5, 0.125]
    assert mask.tolist() == [1.0, 1.0, 1.0]
    mask, _ = self_adaptive_mask(probs, torch.tensor(0.52), torch.tensor([0.5, 1.0, 0.25]))
    # thresholds (0.26, 0.52, 0.13): the second row now falls just short
    assert mask.tolist() == [1.0, 0.0, 1.0]
