"""Momentum-distilled contrastive loss (Eq. 1-4) against a per-row pure-python reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mics.losses import MomentumDistilledContrastiveLoss, momentum_distilled_contrastive


def _unit_rows(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _features(batch: int = 4, queue: int = 6, dim: int = 8) -> dict[str, torch.Tensor]:
    return {
        "z_a": _unit_rows(batch, dim, seed=1),
        "z_b": _unit_rows(batch, dim, seed=2),
        "z_a_m": _unit_rows(batch, dim, seed=3),
        "z_b_m": _unit_rows(batch, dim, seed=4),
        "queue_a": _unit_rows(queue, dim, seed=5),
        "queue_b": _unit_rows(queue, dim, seed=6),
    }


def _naive_direction(query, query_m, keys, temp: float, alpha: float) -> float:
    """One direction, row by row with python floats: soft-target cross-entropy over [batch keys, queue]."""
    total = 0.0
    for i, (q, q_m) in enumerate(zip(query, query_m, strict=True)):
        sims = [sum(x * y for x, y in zip(q, k, strict=True)) / temp for k in keys]
        sims_m = [sum(x * y for x, y in zip(q_m, k, strict=True)) / temp for k in keys]
        top = max(sims)
        log_z = top + math.log(sum(math.exp(s - top) for s in sims))
        top_m = max(sims_m)
        z_m = sum(math.exp(s - top_m) for s in sims_m)
        for j, (s, s_m) in enumerate(zip(sims, sims_m, strict=True)):
            target = alpha * math.exp(s_m - top_m) / z_m + (1 - alpha) * (1.0 if j == i else 0.0)
            total -= target * (s - log_z)
    return total / len(query)


def _naive_loss(f: dict[str, torch.Tensor], temp: float, alpha: float) -> float:
    keys_b = f["z_b_m"].tolist() + f["queue_b"].tolist()
    keys_a = f["z_a_m"].tolist() + f["queue_a"].tolist()
    ab = _naive_direction(f["z_a"].tolist(), f["z_a_m"].tolist(), keys_b, temp, alpha)
    ba = _naive_direction(f["z_b"].tolist(), f["z_b_m"].tolist(), keys_a, temp, alpha)
    return (ab + ba) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("queue", [0, 6])
def test_matches_naive_reference(alpha: float, queue: int) -> None:
    f = _features(queue=queue)
    loss = momentum_distilled_contrastive(**f, temp=0.1, alpha=alpha)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_naive_loss(f, 0.1, alpha), rel=1e-10)


def test_alpha_zero_is_cross_entropy_with_queue_negatives() -> None:
    f = _features()
    temp = 0.07
    labels = torch.arange(4)
    ce_ab = F.cross_entropy(f["z_a"] @ torch.cat([f["z_b_m"], f["queue_b"]]).T / temp, labels)
    ce_ba = F.cross_entropy(f["z_b"] @ torch.cat([f["z_a_m"], f["queue_a"]]).T / temp, labels)
    loss = momentum_distilled_contrastive(**f, temp=temp, alpha=0.0)
    torch.testing.assert_close(loss, (ce_ab + ce_ba) / 2)


def test_hand_computed_two_keys() -> None:
    # one pair, one queue entry: sims are [1, 0] / temp in both directions (temp = 1), so with
    # p = e / (e + 1) the hard loss is -log p and, with momentum = online, alpha = 0.5 gives targets
    # [(p + 1) / 2, (1 - p) / 2].
    x = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    p = math.e / (math.e + 1)
    hard = momentum_distilled_contrastive(x, x, x, x, q, q, temp=1.0, alpha=0.0)
    assert hard.item() == pytest.approx(-math.log(p), rel=1e-6)
    soft = momentum_distilled_contrastive(x, x, x, x, q, q, temp=1.0, alpha=0.5)
    expected = -(p + 1) / 2 * math.log(p) - (1 - p) / 2 * math.log(1 - p)
    assert soft.item() == pytest.approx(expected, rel=1e-6)


def test_positive_is_the_diagonal_of_the_batch_block() -> None:
    eye = torch.eye(4, 8, dtype=torch.float64)
    queue = torch.eye(8, dtype=torch.float64)[4:]
    aligned = momentum_distilled_contrastive(eye, eye, eye, eye, queue, queue, temp=0.01, alpha=0.0)
    assert aligned.item() < 1e-6
    shuffled = eye[[1, 0, 2, 3]]
    wrong = momentum_distilled_contrastive(eye, eye, shuffled, shuffled, queue, queue, temp=0.01, alpha=0.0)
    assert wrong.item() > 10


def test_gradient_reaches_online_features_and_temperature_only() -> None:
    f = {k: v.clone().requires_grad_(True) for k, v in _features().items()}
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    momentum_distilled_contrastive(**f, temp=temp, alpha=0.4).backward()
    assert temp.grad is not None and temp.grad.abs().item() > 0
    for name in ("z_a", "z_b"):
        assert f[name].grad is not None and f[name].grad.abs().sum() > 0
    for name in ("z_a_m", "z_b_m", "queue_a", "queue_b"):
        assert f[name].grad is None


def test_module_matches_function() -> None:
    f = _features()
    assert MomentumDistilledContrastiveLoss()(**f, temp=0.2, alpha=0.3).item() == pytest.approx(
        momentum_distilled_contrastive(**f, temp=0.2, alpha=0.3).item()
    )


def test_bf16_autocast_computes_in_float32() -> None:
    f = {k: v.float() for k, v in _features().items()}
    temp, alpha = 0.07, 0.4
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = momentum_distilled_contrastive(**f, temp=temp, alpha=alpha)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, momentum_distilled_contrastive(**f, temp=temp, alpha=alpha), rtol=3e-2, atol=0
    )

    # only the products may be rounded to bf16: scaling, softmax and log-softmax stay in float32
    def direction(query, query_m, keys):
        keys = keys.bfloat16()
        logits = (query.bfloat16() @ keys.T).float() / temp
        soft = ((query_m.bfloat16() @ keys.T).float() / temp).softmax(dim=1)
        targets = alpha * soft + (1 - alpha) * torch.eye(*logits.shape)
        return F.cross_entropy(logits, targets)

    keys_a = torch.cat([f["z_a_m"], f["queue_a"]])
    keys_b = torch.cat([f["z_b_m"], f["queue_b"]])
    expected = (direction(f["z_a"], f["z_a_m"], keys_b) + direction(f["z_b"], f["z_b_m"], keys_a)) / 2
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"z_b": torch.zeros(3, 8)}, "z_b"),
        ({"z_a_m": torch.zeros(4, 7)}, "z_a_m"),
        ({"z_a": torch.zeros(4)}, "2-D"),
        ({"queue_a": torch.zeros(6, 5)}, "queue_a"),
        ({"queue_b": torch.zeros(5, 8)}, "queue_b"),
        ({"z_b_m": torch.zeros(4, 8, dtype=torch.long)}, "floating"),
        ({"temp": 0.0}, "temp"),
        ({"temp": -0.1}, "temp"),
        ({"temp": torch.tensor(-0.1)}, "temp"),
        ({"temp": torch.tensor([0.1, 0.2])}, "scalar"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
    ],
)
def test_rejects_bad_arguments(change: dict, message: str) -> None:
    args = {k: v.float() for k, v in _features().items()} | {"temp": 0.07, "alpha": 0.4}
    with pytest.raises(ValueError, match=message):
        momentum_distilled_contrastive(**(args | change))


def _naive_indexed_direction(query, query_m, keys, idx, key_idx, temp: float, alpha: float) -> float:
    """As :func:`_naive_direction`, with every key of the same sample index a positive (spread uniformly)."""
    total = 0.0
    for i, (q, q_m) in enumerate(zip(query, query_m, strict=True)):
        sims = [sum(x * y for x, y in zip(q, k, strict=True)) / temp for k in keys]
        sims_m = [sum(x * y for x, y in zip(q_m, k, strict=True)) / temp for k in keys]
        log_z = math.log(sum(math.exp(s) for s in sims))
        z_m = sum(math.exp(s) for s in sims_m)
        n_pos = sum(1 for k in key_idx if k == idx[i])
        for j, (s, s_m) in enumerate(zip(sims, sims_m, strict=True)):
            hard = (1.0 / n_pos) if key_idx[j] == idx[i] else 0.0
            total -= (alpha * math.exp(s_m) / z_m + (1 - alpha) * hard) * (s - log_z)
    return total / len(query)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_queued_features_of_the_same_sample_are_positives(alpha: float) -> None:
    f = _features(batch=4, queue=6)
    idx = torch.tensor([10, 11, 12, 13])
    idx_queue = torch.tensor([12, -1, 10, 10, 7, -1])
    loss = momentum_distilled_contrastive(**f, temp=0.1, alpha=alpha, idx=idx, idx_queue=idx_queue)
    key_idx = idx.tolist() + idx_queue.tolist()
    ab = _naive_indexed_direction(
        f["z_a"].tolist(),
        f["z_a_m"].tolist(),
        f["z_b_m"].tolist() + f["queue_b"].tolist(),
        idx.tolist(),
        key_idx,
        0.1,
        alpha,
    )
    ba = _naive_indexed_direction(
        f["z_b"].tolist(),
        f["z_b_m"].tolist(),
        f["z_a_m"].tolist() + f["queue_a"].tolist(),
        idx.tolist(),
        key_idx,
        0.1,
        alpha,
    )
    assert loss.item() == pytest.approx((ab + ba) / 2, rel=1e-10)
    # without the index a queued copy of the sample is a negative: a different loss
    assert loss.item() != pytest.approx(momentum_distilled_contrastive(**f, temp=0.1, alpha=alpha).item())


def test_index_without_index_queue_is_refused() -> None:
    with pytest.raises(ValueError, match="both idx and idx_queue"):
        momentum_distilled_contrastive(**_features(), temp=0.1, alpha=0.4, idx=torch.arange(4))
