"""SoftMatch's truncated-Gaussian weights, EMA statistics and uniform alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm
from mics.methods.ssl.softmatch import truncated_gaussian_weights, uniform_alignment


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_weights_formula_on_hand_computed_values() -> None:
    weights = truncated_gaussian_weights(
        torch.tensor([0.2, 0.5, 0.9]), torch.tensor(0.6), torch.tensor(0.04), 2.0
    )
    # 2 var / n^2 = 0.02: exp(-0.16 / 0.02), exp(-0.01 / 0.02), 1
    assert weights.tolist() == pytest.approx([math.exp(-8.0), math.exp(-0.5), 1.0], rel=1e-5)


def test_statistics_and_weights_after_one_update_without_alignment() -> None:
    algo = build_algorithm("softmatch", 2, 10, SSLConfig(params={"ema_p": 0.5, "dist_align": 0.0}))
    out = algo.unlabelled_loss(
        _log([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]), torch.zeros(3, 2), torch.arange(3), 0, 1
    )
    # max p = (0.9, 0.6, 0.7): mean 0.73333, unbiased var 0.023333; mu = 0.5 / 2 + 0.5 * 0.73333
    assert algo.mu.item() == pytest.approx(0.6166667, abs=1e-6)
    assert algo.var.item() == pytest.approx(0.5116667, abs=1e-6)
    assert out.mask.tolist() == pytest.approx([1.0, 0.9989148, 1.0], abs=1e-6)
    assert out.pseudo_labels.tolist() == [0, 0, 1]


def test_uniform_alignment_sets_weights_but_not_pseudo_labels() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    aligned = uniform_alignment(probs, probs.mean(dim=0))
    assert aligned.flatten().tolist() == pytest.approx([6 / 7, 1 / 7, 0.5, 0.5, 2 / 9, 7 / 9], abs=1e-5)

    algo = build_algorithm("softmatch", 2, 10, SSLConfig(params={"ema_p": 0.5}))
    rows = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]
    out = algo.unlabelled_loss(_log(rows), torch.zeros(4, 2), torch.arange(4), 0, 1)
    p = np.array(rows)
    p_model = p.mean(0)  # the first batch initialises the running mean
    q = p * (0.5 + 1e-6) / (p_model + 1e-6)
    q /= q.sum(1, keepdims=True)
    mx = q.max(1)
    mu = 0.5 * 0.5 + 0.5 * mx.mean()
    var = 0.5 * 1.0 + 0.5 * mx.var(ddof=1)
    assert algo.p_model.tolist() == pytest.approx(p_model.tolist(), abs=1e-6)
    assert algo.mu.item() == pytest.approx(mu, abs=1e-6) and algo.var.item() == pytest.approx(var, abs=1e-6)
    expected = [math.exp(-(min(m - mu, 0.0) ** 2) / (2 * var / 4)) for m in mx]
    assert out.mask.tolist() == pytest.approx(expected, abs=1e-6)
    # aligned, the last row prefers class 1; its pseudo-label stays the unaligned argmax 0 (USB)
    assert q[3].argmax() == 1 and out.pseudo_labels.tolist() == [0, 0, 1, 0]


def test_running_mean_prediction_is_an_ema_after_the_first_batch() -> None:
    algo = build_algorithm("softmatch", 2, 10, SSLConfig(params={"ema_p": 0.9}))
    algo.unlabelled_loss(_log([[0.8, 0.2]]), torch.zeros(1, 2), torch.arange(1), 0, 1)
    assert algo.p_model.tolist() == pytest.approx([0.8, 0.2], abs=1e-6)
    assert algo.var.item() == 1.0  # a single sample has no variance: kept
    algo.unlabelled_loss(_log([[0.4, 0.6]]), torch.zeros(1, 2), torch.arange(1), 1, 2)
    assert algo.p_model.tolist() == pytest.approx([0.76, 0.24], abs=1e-6)


def test_uniform_alignment_offsets_both_terms_by_one_millionth() -> None:
    # a class the model almost never predicts: the offset in the denominator decides the weight
    probs = torch.tensor([[0.5, 0.49999, 0.00001]], dtype=torch.float64)
    p_model = torch.tensor([0.6, 0.39999, 0.00001], dtype=torch.float64)
    raw = probs.numpy() * (1 / 3 + 1e-6) / (p_model.numpy() + 1e-6)
    expected = raw / raw.sum(axis=1, keepdims=True)
    assert uniform_alignment(probs, p_model).numpy() == pytest.approx(expected, rel=1e-9)
