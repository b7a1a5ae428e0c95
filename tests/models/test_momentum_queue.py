"""momentum_copy / momentum_update against a naive formula; FeatureQueue ring buffer; all-gather."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mics.models.momentum import FeatureQueue, all_gather_nograd, momentum_copy, momentum_update


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_momentum_copy_is_frozen_and_independent() -> None:
    online = _net()
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for po, pt in zip(online.parameters(), target.parameters(), strict=True):
        assert torch.equal(po, pt) and po.data_ptr() != pt.data_ptr()


def _scramble(online: nn.Module) -> None:
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()
    online(torch.randn(8, 4))  # moves the BatchNorm running statistics


@pytest.mark.parametrize("m", [0.0, 0.3, 0.995, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_momentum_update_matches_naive_formula(
    m: float, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused:
        monkeypatch.delattr(torch, "_foreach_lerp_")
    online = _net()
    target = momentum_copy(online)
    _scramble(online)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, m)
    for old, po, pt in zip(before, online.parameters(), target.parameters(), strict=True):
        expected = [
            m * a + (1 - m) * b for a, b in zip(old.flatten().tolist(), po.flatten().tolist(), strict=True)
        ]
        torch.testing.assert_close(pt.flatten(), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    for name, buf in online.named_buffers():
        assert torch.equal(dict(target.named_buffers())[name], buf), name
    assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("m", [-0.01, 1.5])
def test_momentum_update_rejects_bad_momentum(m: float) -> None:
    online = _net()
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(online, momentum_copy(online), m)


def test_momentum_update_rejects_different_structures() -> None:
    with pytest.raises(ValueError, match="shape"):
        momentum_update(nn.Linear(3, 4), nn.Linear(4, 3), 0.9)
    with pytest.raises(ValueError, match="numbers of parameters"):
        momentum_update(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.9)


def test_queue_starts_with_unit_vectors_and_is_checkpointed() -> None:
    q = FeatureQueue(dim=5, size=8)
    assert q.features.shape == (8, 5)
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(8))
    state = q.state_dict()
    assert set(state) == {"queue", "ptr"}
    assert state["ptr"].dtype == torch.long


def test_queue_wraps_around_like_a_naive_ring() -> None:
    q = FeatureQueue(dim=3, size=6)
    ring = [row.clone() for row in q.features]
    ptr = 0
    for step in range(7):
        feats = torch.full((2, 3), float(step)) + torch.arange(2.0)[:, None]
        q.enqueue(feats)
        for row in feats:
            ring[ptr] = row
            ptr = (ptr + 1) % 6
        torch.testing.assert_close(q.features, torch.stack(ring))
        assert int(q.ptr) == ptr


def test_queue_handles_a_batch_equal_to_its_size_and_restores_from_state() -> None:
    q = FeatureQueue(dim=2, size=4)
    q.enqueue(torch.ones(4, 2))
    assert int(q.ptr) == 0 and torch.equal(q.features, torch.ones(4, 2))
    q.enqueue(torch.zeros(2, 2))
    restored = FeatureQueue(dim=2, size=4)
    restored.load_state_dict(q.state_dict())
    assert int(restored.ptr) == 2 and torch.equal(restored.features, q.features)


@pytest.mark.parametrize("batch", [4, 5, 8])
def test_queue_size_must_be_a_multiple_of_the_batch(batch: int) -> None:
    q = FeatureQueue(dim=2, size=6)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        q.enqueue(torch.randn(batch, 2))


def test_queue_rejects_wrong_feature_width() -> None:
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        FeatureQueue(dim=4, size=8).enqueue(torch.randn(2, 3))


def test_features_is_a_detached_view_and_enqueue_ignores_grad() -> None:
    q = FeatureQueue(dim=3, size=4)
    assert q.features.data_ptr() == q.queue.data_ptr()
    q.enqueue(torch.randn(2, 3, requires_grad=True))
    assert not q.features.requires_grad


def test_all_gather_is_identity_without_distributed() -> None:
    x = torch.randn(3, 2)
    assert all_gather_nograd(x) is x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial queue on every rank
        q = FeatureQueue(dim=2, size=8)
        q.enqueue(torch.full((2, 2), float(rank)))
        try:
            FeatureQueue(dim=2, size=6).enqueue(torch.zeros(2, 2))  # global batch 4 does not divide 6
            raised = False
        except ValueError:
            raised = True
        results[rank] = (q.features[:4].clone(), int(q.ptr), raised)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_enqueue_all_gathers_in_rank_order() -> None:
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        out = dict(results)
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank in range(world):
        feats, ptr, raised = out[rank]
        torch.testing.assert_close(feats, expected)
        assert ptr == 4 and raised
