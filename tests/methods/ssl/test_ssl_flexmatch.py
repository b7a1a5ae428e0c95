"""FlexMatch's class-wise thresholds after a given label history, against a Counter-based reference."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm
from mics.methods.ssl.flexmatch import convex_mapping, learning_status


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_thresholds_after_a_label_history_with_warmup() -> None:
    algo = build_algorithm("flexmatch", 3, 6, SSLConfig())
    # step 1: samples 0, 1, 2 confidently predicted as classes 0, 0, 1; all thresholds start at 0
    first = algo.unlabelled_loss(
        _log([[0.97, 0.02, 0.01], [0.96, 0.03, 0.01], [0.02, 0.97, 0.01]]),
        torch.zeros(3, 3),
        torch.arange(3),
        0,
        10,
    )
    assert first.mask.tolist() == [1.0, 1.0, 1.0]
    assert algo.selected_label.tolist() == [0, 0, 1, -1, -1, -1]
    # sigma = (2, 1, 0), 3 unused: beta = sigma / max(2, 3); M(beta) = beta / (2 - beta)
    assert algo.classwise_acc.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert algo.class_thresholds().tolist() == pytest.approx([0.95 * 0.5, 0.95 * 0.2, 0.0])

    # step 2: thresholds (0.475, 0.19, 0): 0.6 -> in, 0.45 -> out, 0.4 (class 2) -> in
    second = algo.unlabelled_loss(
        _log([[0.6, 0.3, 0.1], [0.45, 0.3, 0.25], [0.3, 0.3, 0.4]]),
        torch.zeros(3, 3),
        torch.tensor([3, 4, 5]),
        1,
        10,
    )
    assert second.mask.tolist() == [1.0, 0.0, 1.0]
    assert algo.selected_label.tolist() == [0, 0, 1, -1, -1, -1]


def test_thresholds_without_warmup_normalise_by_the_largest_class() -> None:
    beta, update = learning_status(torch.tensor([0, 0, 1, -1, -1, -1]), 3, warmup=False)
    assert beta.tolist() == pytest.approx([1.0, 0.5, 0.0]) and bool(update)
    assert (0.95 * convex_mapping(beta)).tolist() == pytest.approx([0.95, 0.95 / 3, 0.0])


def test_status_is_frozen_while_every_sample_holds_the_same_value() -> None:
    _, update = learning_status(torch.full((4,), -1), 3, warmup=True)
    assert not bool(update)
    _, update = learning_status(torch.full((4,), 2), 3, warmup=True)
    assert not bool(update)
    algo = build_algorithm("flexmatch", 2, 2, SSLConfig())
    algo.unlabelled_loss(_log([[0.99, 0.01], [0.98, 0.02]]), torch.zeros(2, 2), torch.arange(2), 0, 5)
    assert algo.classwise_acc.tolist() == [0.0, 0.0]  # all samples class 0: USB skips the update


def test_repeated_index_keeps_its_last_prediction() -> None:
    algo = build_algorithm("flexmatch", 3, 4, SSLConfig())
    algo.unlabelled_loss(
        _log([[0.97, 0.02, 0.01], [0.01, 0.02, 0.97]]), torch.zeros(2, 3), torch.tensor([1, 1]), 0, 5
    )
    assert algo.selected_label.tolist() == [-1, 2, -1, -1]


def _reference_flexmatch(batches, num_classes: int, num_unlabelled: int, tau: float, warmup: bool):
    """USB's hook with a Counter and Python loops."""
    selected = [-1] * num_unlabelled
    acc = [0.0] * num_classes
    masks = []
    for probs, idx in batches:
        mask = []
        for row in probs:
            c = int(np.argmax(row))
            mask.append(float(row[c] >= tau * acc[c] / (2 - acc[c])))
        for row, i in zip(probs, idx, strict=True):
            if row.max() >= tau:
                selected[i] = int(np.argmax(row))
        counter = Counter(selected)
        if max(counter.values()) < num_unlabelled:
            denom = max(counter.values()) if warmup else max(v for k, v in counter.items() if k != -1)
            acc = [counter[c] / denom for c in range(num_classes)]
        masks.append(mask)
    return masks, selected, acc


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_counter_reference_over_a_random_run(warmup: bool) -> None:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(12):
        logits = rng.normal(size=(5, 4)) * rng.uniform(1, 6)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        batches.append((probs, rng.choice(15, size=5, replace=False)))
    masks, selected, acc = _reference_flexmatch(batches, 4, 15, 0.8, warmup)
    algo = build_algorithm(
        "flexmatch", 4, 15, SSLConfig(threshold=0.8, params={"thresh_warmup": float(warmup)})
    )
    for (probs, idx), expected in zip(batches, masks, strict=True):
        logits = torch.tensor(np.log(probs), dtype=torch.float64).float()
        out = algo.unlabelled_loss(logits, torch.zeros_like(logits), torch.tensor(idx), 0, 1)
        assert out.mask.tolist() == expected
    assert algo.selected_label.tolist() == selected
    assert algo.classwise_acc.tolist() == pytest.approx(acc)
