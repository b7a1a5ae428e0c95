"""Class-balanced options that every method gets alike (data.class_balance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.losses.evidential import evidential_loss
from mics.methods.finetune import labelled_batches
from mics.methods.pretrain import balanced_order, class_weights, cycled_order, labelled_order
from mics.methods.ssl import build_algorithm

LABELS = np.array([0] * 40 + [1] * 8 + [2] * 2)
INDICES = np.arange(50)


def test_balanced_draws_give_each_class_about_the_same_share() -> None:
    order = balanced_order(INDICES, LABELS, seed=0, tag="0", needed=6000)
    assert len(order) == 6000
    shares = np.bincount(LABELS[order.numpy()], minlength=3) / 6000
    assert np.allclose(shares, 1 / 3, atol=0.03)
    # plain permutations keep the data's imbalance
    plain = cycled_order(INDICES, seed=0, tag="0", needed=500)
    assert np.bincount(LABELS[plain.numpy()], minlength=3)[2] < 30


def test_balanced_draws_are_seeded_and_stay_inside_the_labelled_set() -> None:
    subset = np.array([1, 3, 41, 42, 48, 49])
    a = labelled_order(subset, LABELS, 0, "1", 100, "sampler")
    b = labelled_order(subset, LABELS, 0, "1", 100, "sampler")
    assert torch.equal(a, b)
    assert set(a.tolist()) <= set(subset.tolist())
    assert not torch.equal(a, labelled_order(subset, LABELS, 0, "2", 100, "sampler"))
    assert torch.equal(labelled_order(subset, LABELS, 0, "1", 100, "none"), cycled_order(subset, 0, "1", 100))
    # indices given as int32 (e.g. read from a split file) still come back as int64 index tensors
    assert balanced_order(subset.astype(np.int32), LABELS, 0, "1", 10).dtype == torch.long


def test_class_weights_are_inverse_frequencies() -> None:
    w = class_weights(LABELS, INDICES, num_classes=4)
    # n / (present classes * n_c): 50 / (3 * 40), 50 / (3 * 8), 50 / (3 * 2); an absent class gets 0
    assert w.tolist() == pytest.approx([50 / 120, 50 / 24, 50 / 6, 0.0])
    assert torch.allclose(class_weights(np.array([0, 1, 2]), np.arange(3), 3), torch.ones(3))


def test_labelled_batches_draw_balanced_and_carry_indices() -> None:
    arrays = np.zeros((50, 3, 8, 8), dtype=np.uint8)
    batches = labelled_batches(
        arrays, arrays, LABELS, INDICES, 32, 20, torch.device("cpu"), 0, balance="sampler"
    )
    ys = torch.cat([b["y"] for b in batches(0, torch.Generator().manual_seed(0))])
    counts = torch.bincount(ys, minlength=3).float() / len(ys)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.06)
    first = next(iter(batches(0, torch.Generator().manual_seed(0))))
    assert torch.equal(torch.as_tensor(LABELS[first["index"].numpy()]), first["y"])


def test_reweighted_losses_are_weighted_means() -> None:
    algo = build_algorithm("fixmatch", 3, 10, SSLConfig())
    logits, y = torch.randn(5, 3), torch.tensor([0, 0, 1, 2, 2])
    algo.class_weights = torch.tensor([1.0, 3.0, 0.5])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = algo.class_weights[y]
    assert algo.supervised_loss(logits, y).item() == pytest.approx(((w * per).sum() / w.sum()).item())
    alpha = torch.rand(5, 3) * 4 + 1
    per_ev = torch.stack([evidential_loss(alpha[i : i + 1], y[i : i + 1], 0.5) for i in range(5)])
    assert evidential_loss(alpha, y, 0.5, w).item() == pytest.approx(((w * per_ev).sum() / w.sum()).item())
    assert evidential_loss(alpha, y, 0.5, torch.ones(5)).item() == pytest.approx(
        evidential_loss(alpha, y, 0.5).item()
    )


def test_orders_depend_on_the_seed_and_take_any_integer_labels() -> None:
    from mics.methods.pretrain import epoch_order

    subset = np.array([1, 3, 41, 42, 48, 49])
    assert not torch.equal(epoch_order(INDICES, 0, 1), epoch_order(INDICES, 1, 1))
    assert epoch_order(INDICES.astype(np.int32), 0, 1).dtype == torch.long
    assert not torch.equal(
        balanced_order(subset, LABELS, 0, "1", 50), balanced_order(subset, LABELS, 1, "1", 50)
    )
    for dtype in (np.int32, np.uint8):  # a uint8 tensor would index as a mask if it were not made long
        assert torch.equal(
            balanced_order(subset, LABELS.astype(dtype), 0, "1", 50),
            balanced_order(subset, LABELS, 0, "1", 50),
        )
    assert balanced_order(np.array([7]), LABELS, 0, "1", 3).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="^no samples to draw from$"):
        balanced_order(np.array([], dtype=np.int64), LABELS, 0, "1", 3)
