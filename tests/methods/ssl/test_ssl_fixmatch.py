"""FixMatch's fixed-threshold mask and loss on hand-computed probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm


def _log(rows: list[list[float]]) -> torch.Tensor:
    # log-probabilities as logits: softmax gives the rows back exactly
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_mask_pseudo_labels_and_loss_on_hand_computed_batch() -> None:
    algo = build_algorithm("fixmatch", 3, 10, SSLConfig(lambda_u=2.0))
    logits_w = _log([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.02, 0.029, 0.951], [0.1, 0.949, 0.051]])
    logits_s = _log([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    out = algo.unlabelled_loss(logits_w, logits_s, torch.arange(4), 0, 100)
    # confidences 0.96, 0.5, 0.951, 0.949 against tau = 0.95
    assert out.mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out.pseudo_labels.tolist() == [0, 0, 2, 1]
    # lambda_u * (-log 0.5 - log 0.8) / 4 = 2 * (0.693147 + 0.223144) / 4
    assert out.loss.item() == pytest.approx(0.4581454, rel=1e-5)
    assert out.logs["mask_rate"] == 0.5


def test_threshold_comes_from_config() -> None:
    algo = build_algorithm("fixmatch", 3, 10, SSLConfig(threshold=0.5))
    out = algo.unlabelled_loss(
        _log([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]]), torch.zeros(2, 3), torch.arange(2), 0, 1
    )
    assert out.mask.tolist() == [1.0, 0.0]


def test_soft_labels_are_sharpened_with_temperature() -> None:
    algo = build_algorithm("fixmatch", 3, 10, SSLConfig(temperature=0.5, params={"hard_label": 0.0}))
    logits_w = torch.tensor([[6.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    logits_s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0]])
    out = algo.unlabelled_loss(logits_w, logits_s, torch.arange(2), 0, 1)
    assert out.mask.tolist() == [1.0, 0.0]
    sharp = np.exp(np.array([12.0, 2.0, 0.0]))
    sharp /= sharp.sum()
    log_p = np.array([1.0, 2.0, 0.5]) - math.log(math.exp(1) + math.exp(2) + math.exp(0.5))
    assert out.loss.item() == pytest.approx(-(sharp * log_p).sum() / 2, rel=1e-5)
