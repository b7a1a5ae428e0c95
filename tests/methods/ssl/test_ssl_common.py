"""The contract every baseline shares: registry, gradient flow, exact resume, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import ALGORITHMS, base, build_algorithm, known_params
from mics.methods.ssl.base import MaskedConsistencyLoss, last_occurrence, masked_consistency_loss

NUM_CLASSES = 4
NUM_UNLABELLED = 12
FEAT_DIM = 6
TOTAL_STEPS = 20
STATEFUL = ["flexmatch", "freematch", "softmatch", "habit", "siabc"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _config() -> SSLConfig:
    # Dash: a 2-step warm-up and a decay every 2 steps so a 6-step run crosses both regimes.
    return SSLConfig(params={"warmup_steps": 2.0, "rho_period_frac": 0.1})


def _batch(step: int, device: str, batch: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    logits_w = 4.0 * torch.randn(batch, NUM_CLASSES, generator=gen)
    logits_s = logits_w + torch.randn(batch, NUM_CLASSES, generator=gen)
    idx = torch.randperm(NUM_UNLABELLED, generator=gen)[:batch]
    feats = torch.randn(batch, FEAT_DIM, generator=gen)
    return {
        k: v.to(device) for k, v in dict(logits_w=logits_w, logits_s=logits_s, idx=idx, feats=feats).items()
    }


def _head(device: str) -> torch.nn.Linear:
    head = torch.nn.Linear(FEAT_DIM, NUM_CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-1, 1, FEAT_DIM * NUM_CLASSES).view(NUM_CLASSES, FEAT_DIM))
        head.bias.zero_()
    return head.to(device)


def _run_step(algo, step: int, device: str, head: torch.nn.Module):
    b = _batch(step, device)
    algo.observe_supervised(1.2 + 0.1 * step, step)
    return algo.unlabelled_loss(
        b["logits_w"], b["logits_s"], b["idx"], step, TOTAL_STEPS, b["feats"], b["feats"], classifier=head
    )


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_registry_names_and_classes() -> None:
    expected = {"supervised", "fixmatch", "flexmatch", "dash", "freematch", "softmatch", "habit", "siabc"}
    assert set(ALGORITHMS) == expected
    for name, cls in ALGORITHMS.items():
        assert cls.name == name
        assert isinstance(build_algorithm(name, 3, 5, SSLConfig()), cls)


def test_build_algorithm_rejects_unknown_name_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown semi-supervised algorithm 'mixmatch'.*fixmatch.*siabc"):
        build_algorithm("mixmatch", 3, 5, SSLConfig())


def test_build_algorithm_rejects_unknown_param_but_accepts_other_methods_params() -> None:
    with pytest.raises(ValueError, match="unknown ssl.params gama"):
        build_algorithm("dash", 3, 5, SSLConfig(params={"gama": 1.3}))
    algo = build_algorithm("fixmatch", 3, 5, SSLConfig(params={"gamma": 1.3, "hard_label": 0.0}))
    assert not algo.flag("hard_label")
    assert "n_sigma" in known_params() and "rfc_weight" in known_params()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_gradient_reaches_strong_logits_only(name: str) -> None:
    algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    head = _head("cpu")
    for step in range(3):  # past Dash's warm-up
        _run_step(algo, step, "cpu", head)
    b = _batch(3, "cpu")
    # confident weak predictions over all classes, so every method masks some samples in
    confident = 12.0 * torch.nn.functional.one_hot(torch.arange(6) % NUM_CLASSES, NUM_CLASSES).float()
    logits_w = (confident + 0.1 * b["logits_w"]).requires_grad_(True)
    logits_s = b["logits_s"].clone().requires_grad_(True)
    out = algo.unlabelled_loss(
        logits_w, logits_s, b["idx"], 3, TOTAL_STEPS, b["feats"], b["feats"], classifier=head
    )
    assert out.loss.dim() == 0 and out.loss.requires_grad
    out.loss.backward()
    assert logits_w.grad is None
    assert logits_s.grad is not None and torch.isfinite(logits_s.grad).all()
    if name != "supervised":
        assert out.mask.sum() > 0 and logits_s.grad.abs().sum() > 0
    assert out.mask.shape == (6,) and out.mask.dtype == torch.float32
    assert ((out.mask >= 0) & (out.mask <= 1)).all()
    assert out.pseudo_labels.shape == (6,) and out.pseudo_labels.dtype == torch.long
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_state_dict_round_trip_resumes_identically(name: str, device: str) -> None:
    head = _head(device)
    original = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    for step in range(4):
        _run_step(original, step, device, head)
    saved = original.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in saved.values())
    assert all(v.device.type == "cpu" for v in saved.values() if isinstance(v, torch.Tensor))

    resumed = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    resumed.load_state_dict(saved)
    _states_equal(resumed.state_dict(), saved)
    for step in range(4, 7):
        a = _run_step(original, step, device, head)
        b = _run_step(resumed, step, device, head)
        assert torch.equal(a.loss.detach(), b.loss.detach())
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pseudo_labels, b.pseudo_labels)
        assert a.logs == b.logs
    _states_equal(original.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", ["flexmatch", "freematch", "softmatch", "habit", "siabc", "dash"])
def test_state_changes_with_training_so_round_trip_is_meaningful(name: str) -> None:
    algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    before = algo.state_dict()
    for step in range(3):
        _run_step(algo, step, "cpu", _head("cpu"))
    after = algo.state_dict()
    changed = [
        k
        for k in before
        if (
            not torch.equal(before[k], after[k])
            if isinstance(before[k], torch.Tensor)
            else before[k] != after[k]
        )
    ]
    assert changed


def test_load_state_dict_rejects_missing_unexpected_and_misshapen_entries() -> None:
    algo = build_algorithm("flexmatch", 3, 5, SSLConfig())
    state = algo.state_dict()
    with pytest.raises(ValueError, match="missing keys \\['classwise_acc'\\]"):
        algo.load_state_dict({"selected_label": state["selected_label"]})
    with pytest.raises(ValueError, match="unexpected keys \\['rho'\\]"):
        algo.load_state_dict({**state, "rho": 1.0})
    with pytest.raises(ValueError, match="selected_label"):
        algo.load_state_dict({**state, "selected_label": torch.zeros(6, dtype=torch.long)})


def test_inputs_are_validated() -> None:
    algo = build_algorithm("fixmatch", 3, 5, SSLConfig())
    good = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logits_w must be"):
        algo.unlabelled_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.arange(2), 0, 1)
    with pytest.raises(ValueError, match="logits_s must match"):
        algo.unlabelled_loss(good, torch.zeros(3, 3), torch.arange(2), 0, 1)
    with pytest.raises(ValueError, match="idx must be"):
        algo.unlabelled_loss(good, good, torch.zeros(2), 0, 1)
    flex = build_algorithm("flexmatch", 3, 5, SSLConfig())
    with pytest.raises(ValueError, match="idx must lie in \\[0, 5\\)"):
        flex.unlabelled_loss(good, good, torch.tensor([0, 5]), 0, 1)
    with pytest.raises(ValueError, match="y must be"):
        algo.supervised_loss(good, torch.zeros(2))
    for threshold in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match=rf"^fixmatch: threshold must lie in \(0, 1\], got {threshold}$"):
            build_algorithm("fixmatch", 3, 5, SSLConfig(threshold=threshold))
    build_algorithm("fixmatch", 3, 5, SSLConfig(threshold=1.0))  # the bound itself is allowed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be at least 2, got 1"),
        ({"num_unlabelled": -1}, "num_unlabelled must be non-negative, got -1"),
        ({"cfg": SSLConfig(lambda_u=-0.5)}, "lambda_u must be non-negative, got -0.5"),
        ({"cfg": SSLConfig(temperature=0.0)}, "temperature must be positive, got 0.0"),
    ],
)
def test_constructor_refuses_each_bad_setting_with_its_message(kwargs: dict, message: str) -> None:
    args = {"num_classes": 3, "num_unlabelled": 5, "cfg": SSLConfig(), **kwargs}
    with pytest.raises(ValueError, match=f"^softmatch: {message}$"):
        build_algorithm("softmatch", args["num_classes"], args["num_unlabelled"], args["cfg"])


def test_constructor_accepts_the_edges_of_each_range() -> None:
    build_algorithm("fixmatch", 2, 0, SSLConfig(lambda_u=0.0, threshold=1.0, temperature=0.01))
    algo = build_algorithm("fixmatch", 2, 0, SSLConfig(lambda_u=0.5))
    assert algo.lambda_u == 0.5


@pytest.mark.parametrize("name", STATEFUL)
def test_state_tensors_follow_the_device_of_the_logits(name: str) -> None:
    # the meta device stands in for an accelerator: the move is observable on a CPU-only machine
    algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    assert algo.TENSOR_STATE
    state = algo.state_dict()
    algo._to_device(torch.device("meta"))
    assert all(getattr(algo, key).device.type == "meta" for key in algo.TENSOR_STATE)
    algo.load_state_dict(state)  # a resumed state lands where the state already lives
    assert all(getattr(algo, key).device.type == "meta" for key in algo.TENSOR_STATE)


def test_supervised_loss_is_mean_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    y = torch.tensor([0, 2])
    expected = (-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    for name in ALGORITHMS:
        loss = build_algorithm(name, 3, 5, SSLConfig()).supervised_loss(logits, y)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_supervised_baseline_contributes_nothing() -> None:
    algo = build_algorithm("supervised", 3, 5, SSLConfig())
    logits_s = torch.randn(4, 3, requires_grad=True)
    out = algo.unlabelled_loss(torch.tensor([[9.0, 0, 0]] * 4), logits_s, torch.arange(4), 0, 10)
    assert out.loss.item() == 0.0 and torch.equal(out.mask, torch.zeros(4))
    assert torch.equal(out.pseudo_labels, torch.zeros(4, dtype=torch.long))
    x = torch.randn(2, 3, 4, 4)
    assert algo.mix_batch(x, torch.tensor([0, 1]), x, x, None, None)[0] is x
    assert algo.ema_decay(0.999, torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)) == 0.999


def _naive_masked_ce(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    total = 0.0
    for row, target, weight in zip(logits, targets, mask, strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        if np.ndim(target) == 0:
            total += weight * (log_z - row[int(target)])
        else:
            total += weight * sum(t * (log_z - v) for t, v in zip(target, row, strict=True))
    return total / len(logits)


def test_masked_consistency_loss_matches_loop_for_hard_and_soft_targets() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    hard = torch.tensor([0, 3, 1, 1, 2])
    soft = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=-1)
    for targets in (hard, soft):
        got = masked_consistency_loss(logits, targets, mask).item()
        assert got == pytest.approx(
            _naive_masked_ce(logits.numpy(), targets.numpy(), mask.numpy()), rel=1e-10
        )
    module = MaskedConsistencyLoss()
    assert module(logits, hard, mask).item() == pytest.approx(
        masked_consistency_loss(logits, hard, mask).item()
    )
    with pytest.raises(ValueError, match="mask must be"):
        module(logits, hard, mask[:3])
    with pytest.raises(ValueError, match=r"^soft targets must be \[B, C\]=\(5, 4\), got \(5, 3\)$"):
        module(logits, soft[:, :3], mask)
    with pytest.raises(ValueError, match=r"^logits_s must be \[B, C\], got shape \(5, 4, 1\)$"):
        module(logits[..., None], hard, mask)
    # hard targets: the wrong length (integers) and the right length (floats) are each refused
    for bad, shape in ((hard[:4], "(4,)"), (hard.double(), "(5,)")):
        with pytest.raises(
            ValueError, match=rf"^hard targets must be \[B\]=5 integers, got \{shape[:-1]}\)$"
        ):
            module(logits, bad, mask)


def test_last_occurrence_keeps_the_last_position_of_each_index() -> None:
    unique, positions = last_occurrence(torch.tensor([7, 2, 7, 5, 2, 7]))
    assert unique.tolist() == [2, 5, 7]
    assert positions.tolist() == [4, 3, 5]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankZeroOfTwo:
    """``torch.distributed`` as rank 0 of a two-process run sees it, in this process: ``all_gather``
    checks what the real one requires (one output per rank, every rank's tensor of one shape and dtype)
    and hands back this rank's tensor and the peer's, which the peer pads as the code under test does."""

    def __init__(self, peer: torch.Tensor) -> None:
        self.peer = peer
        self.calls = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor) -> None:
        assert len(out) == 2 and all(o.shape == tensor.shape and o.dtype == tensor.dtype for o in out)
        self.calls += 1
        if self.calls == 1:  # the exchange of batch sizes
            assert tensor.dtype == torch.int64 and tensor.shape == (1,)
            out[0].copy_(tensor)
            out[1].fill_(self.peer.shape[0])
            return
        longest = max(int(out[0].shape[0]), self.peer.shape[0])
        assert tensor.shape[0] == longest, "every rank must send a batch padded to the longest"
        peer = torch.zeros_like(tensor)
        peer[: self.peer.shape[0]] = self.peer
        out[0].copy_(tensor)
        out[1].copy_(peer)


@pytest.mark.parametrize(("mine", "theirs"), [(3, 2), (2, 3), (2, 2)])
def test_gather_across_ranks_concatenates_in_rank_order_and_trims_the_padding(
    monkeypatch: pytest.MonkeyPatch, mine: int, theirs: int
) -> None:
    local = torch.arange(1.0, 1.0 + 2 * mine).view(mine, 2).requires_grad_()
    peer = -torch.arange(1.0, 1.0 + 2 * theirs).view(theirs, 2)
    fake = _RankZeroOfTwo(peer)
    monkeypatch.setattr(base, "dist", fake)
    got = base.gather_across_ranks(local)
    assert fake.calls == 2
    assert torch.equal(got, torch.cat([local.detach(), peer]))
    assert not got.requires_grad
    # outside a multi-process run (each condition alone, the others as in one): the tensor itself
    for attr, value in (("is_available", False), ("is_initialized", False), ("get_world_size", 1)):
        with monkeypatch.context() as m:
            m.setattr(fake, attr, lambda value=value: value)
            assert base.gather_across_ranks(local) is local, attr
    assert fake.calls == 2


def _ddp_worker(rank: int, world: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = _head("cpu")
        out = {}
        for name in STATEFUL:
            algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
            for step in range(3):
                b = _batch(step, "cpu")
                part = slice(3 * rank, 3 * rank + 3)  # each rank holds half of the global batch
                algo.unlabelled_loss(
                    b["logits_w"][part],
                    b["logits_s"][part],
                    b["idx"][part],
                    step,
                    TOTAL_STEPS,
                    b["feats"][part],
                    b["feats"][part],
                    classifier=head,
                )
            out[name] = algo.state_dict()
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_running_state_under_ddp_equals_a_single_process_on_the_global_batch() -> None:
    import torch.multiprocessing as mp

    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        out = dict(results)
    head = _head("cpu")
    for name in STATEFUL:
        single = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
        for step in range(3):
            b = _batch(step, "cpu")
            single.unlabelled_loss(
                b["logits_w"],
                b["logits_s"],
                b["idx"],
                step,
                TOTAL_STEPS,
                b["feats"],
                b["feats"],
                classifier=head,
            )
        expected = single.state_dict()
        for rank in range(world):
            for key, value in expected.items():
                got = out[rank][name][key]
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(got, value, msg=f"{name}.{key} on rank {rank}")
                else:
                    assert got == value, (name, key)


LOG_KEYS = {
    "supervised": {"mask_rate"},
    "fixmatch": {"mask_rate", "threshold", "unsup_loss"},
    "flexmatch": {"mask_rate", "threshold", "unsup_loss", "unused_rate"},
    "dash": {"hard_label", "mask_rate", "threshold", "unsup_loss", "warmup"},
    "freematch": {"class_threshold_min", "fairness_loss", "mask_rate", "threshold", "unsup_loss"},
    "softmatch": {"mask_rate", "threshold", "unsup_loss", "var"},
    "habit": {"mask_rate", "recalibration_loss", "rfc_loss", "threshold", "unsup_loss"},
    "siabc": {"class_threshold_min", "fairness_loss", "mask_rate", "threshold", "unsup_loss"},
}


@pytest.mark.parametrize("name", sorted(LOG_KEYS))
def test_logs_name_the_same_scalars_at_every_step(name: str) -> None:
    # the training loop writes these names into metrics.jsonl and TensorBoard: a renamed key is a lost curve
    algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, _config())
    head = _head("cpu")
    for step in range(4):
        out = _run_step(algo, step, "cpu", head)
        warm = name == "dash" and step < 2
        assert set(out.logs) == ({"mask_rate", "warmup"} if warm else LOG_KEYS[name]), step
        assert all(isinstance(v, float) for v in out.logs.values())
        assert out.logs["mask_rate"] == pytest.approx(float(out.mask.mean()))
        if name == "dash":
            assert out.logs["warmup"] == (1.0 if warm else 0.0)


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "dash", "softmatch"])
def test_loss_is_lambda_u_times_the_masked_consistency_of_its_own_outputs(name: str) -> None:
    cfg = SSLConfig(lambda_u=2.5, params=_config().params)
    algo = build_algorithm(name, NUM_CLASSES, NUM_UNLABELLED, cfg)
    for step in range(4):
        b = _batch(step, "cpu")
        algo.observe_supervised(1.0, step)
        out = algo.unlabelled_loss(b["logits_w"], b["logits_s"], b["idx"], step, TOTAL_STEPS)
        targets = out.pseudo_labels
        if out.logs.get("hard_label", 1.0) == 0.0:  # Dash's soft phase: sharpened softmax targets
            targets = torch.softmax(b["logits_w"] / cfg.temperature, dim=-1)
        consistency = masked_consistency_loss(b["logits_s"], targets, out.mask)
        assert out.loss.item() == pytest.approx(2.5 * consistency.item(), rel=1e-6)
        if "unsup_loss" in out.logs:
            assert out.logs["unsup_loss"] == pytest.approx(consistency.item(), rel=1e-6)
