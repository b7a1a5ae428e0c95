"""Dash's warm-up, rho schedule and loss-threshold mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm


def _dash(total_steps_period: float = 0.01, warmup: float = 4.0):
    cfg = SSLConfig(temperature=0.5, params={"warmup_steps": warmup, "rho_period_frac": total_steps_period})
    algo = build_algorithm("dash", 3, 10, cfg)
    for step, loss in enumerate([2.0, 1.0, 1.5, 1.5]):  # rho_hat = 1.5
        algo.observe_supervised(loss, step)
    return algo


def _rho_at(algo, step: int, total: int = 1000) -> float:
    out = algo.unlabelled_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.arange(1), step, total)
    return out.logs["threshold"]


def test_warmup_returns_zero_loss_and_empty_mask() -> None:
    algo = _dash()
    logits_s = torch.randn(2, 3, requires_grad=True)
    out = algo.unlabelled_loss(torch.tensor([[9.0, 0, 0]] * 2), logits_s, torch.arange(2), 3, 1000)
    assert out.loss.item() == 0.0 and out.mask.tolist() == [0.0, 0.0] and out.logs["warmup"] == 1.0
    out.loss.backward()
    assert logits_s.grad is not None


def test_rho_follows_the_geometric_schedule_with_floor() -> None:
    algo = _dash()  # warm-up 4 steps, period round(0.01 * 1000) = 10 steps
    # rho_k = max(1.0001 * 1.27^-k * 1.5, 0.05), k = (step - 4) // 10
    assert _rho_at(algo, 4) == pytest.approx(1.50015)
    assert _rho_at(algo, 13) == pytest.approx(1.50015)
    assert _rho_at(algo, 14) == pytest.approx(1.1812204724)
    assert _rho_at(algo, 24) == pytest.approx(0.9300948602)
    assert _rho_at(algo, 4 + 140) == pytest.approx(0.0528302411)
    assert _rho_at(algo, 4 + 150) == 0.05  # 0.0416 floored
    assert algo.rho_hat() == 1.5


def test_losses_after_the_warmup_do_not_move_rho_hat() -> None:
    algo = _dash()
    _rho_at(algo, 4)
    algo.observe_supervised(100.0, 4)
    algo.observe_supervised(100.0, 50)
    assert algo.rho_hat() == 1.5


def test_mask_compares_weak_view_loss_with_rho_and_switches_to_hard_labels() -> None:
    algo = _dash()
    logits_w = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    logits_s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    # uniform row: CE against its own (uniform) soft label = log 3 = 1.0986
    early = algo.unlabelled_loss(logits_w, logits_s, torch.arange(2), 4, 1000)  # rho 1.50015
    assert early.mask.tolist() == [1.0, 1.0] and early.logs["hard_label"] == 0.0
    later = algo.unlabelled_loss(logits_w, logits_s, torch.arange(2), 24, 1000)  # rho 0.930
    assert later.mask.tolist() == [0.0, 1.0]
    # soft target softmax(logits_w / 0.5) for the confident row, reference with numpy
    target = np.exp([8.0, 0.0, 0.0]) / np.exp([8.0, 0.0, 0.0]).sum()
    log_p_s = np.array([0.0, 2.0, 0.0]) - math.log(2 + math.exp(2))
    assert later.loss.item() == pytest.approx(-(target * log_p_s).sum() / 2, rel=1e-5)
    floor = algo.unlabelled_loss(logits_w, logits_s, torch.arange(2), 200, 1000)
    assert floor.logs["hard_label"] == 1.0
    # hard label 0 for row 2: CE(logits_w) = -log(e^4 / (e^4 + 2)) = 0.0360 < 0.05
    assert floor.mask.tolist() == [0.0, 1.0]
    assert floor.loss.item() == pytest.approx((math.log(2 + math.exp(2)) - 0.0) / 2, rel=1e-5)


def test_warmup_length_defaults_to_a_fraction_of_the_run() -> None:
    algo = build_algorithm("dash", 3, 10, SSLConfig())
    assert algo.warmup_steps(1000) == 100 and algo.warmup_steps(3) == 1
    assert algo.rho_period(1024) == 10


def test_missing_warmup_losses_are_an_error() -> None:
    algo = build_algorithm("dash", 3, 10, SSLConfig(params={"warmup_steps": 2.0}))
    with pytest.raises(RuntimeError, match="observe_supervised"):
        algo.unlabelled_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.arange(1), 5, 10)


def test_rho_hat_comes_from_the_end_of_the_warmup_as_the_loop_calls_it() -> None:
    # the loop alternates observe_supervised and unlabelled_loss; warm-up 20 steps, window 10 % = 2 steps
    cfg = SSLConfig(params={"warmup_steps": 20.0, "rho_window_frac": 0.1})
    algo = build_algorithm("dash", 3, 10, cfg)
    losses = [math.log(3) + 5.0] + [2.0] * 17 + [0.4, 0.6]
    for step, loss in enumerate(losses):
        algo.observe_supervised(loss, step)
        algo.unlabelled_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.arange(1), step, 1000)
    assert algo.rho_hat() == pytest.approx(0.5)  # the initial loss no longer counts


def test_rho_window_one_is_the_mean_over_the_whole_warmup() -> None:
    algo = build_algorithm("dash", 3, 10, SSLConfig(params={"warmup_steps": 4.0, "rho_window_frac": 1.0}))
    for step, loss in enumerate([4.0, 1.0, 1.0, 2.0]):
        algo.observe_supervised(loss, step)
        algo.unlabelled_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.arange(1), step, 1000)
    assert algo.rho_hat() == pytest.approx(2.0)


def test_rho_window_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="rho_window_frac"):
        build_algorithm("dash", 3, 10, SSLConfig(params={"rho_window_frac": 0.0}))


def test_warmup_from_the_fraction_of_the_run_when_no_fixed_length_is_set() -> None:
    algo = build_algorithm("dash", 3, 10, SSLConfig(params={"warmup_frac": 0.25}))
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    warm = []
    for step in range(8):
        algo.observe_supervised(1.0, step)
        out = algo.unlabelled_loss(logits, logits, torch.arange(2), step, 8)
        warm.append(out.logs["warmup"])
    assert algo.warmup_steps(8) == 2 and warm == [1.0, 1.0] + [0.0] * 6
