from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings

import pytest
import torch

import mics.engine.train as train
from mics.engine.checkpoint import load_checkpoint
from mics.engine.logging import MetricsLogger
from mics.engine.train import (
    EMAModel,
    NonFiniteLossError,
    Schedule,
    autocast_context,
    cosine_lr,
    derive_seed,
    fit,
    resolve_precision,
)


def test_cosine_schedule_warms_up_then_decays_to_min():
    s = Schedule(epochs=2, steps_per_epoch=10, lr=1.0, min_lr=0.1, weight_decay=0.0, warmup_steps=5)
    lrs = [cosine_lr(i, s) for i in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 14 / 15)))


def test_ema_follows_a_naive_average():
    online = torch.nn.Linear(2, 1)
    ema = EMAModel(online, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, step=100)
    assert torch.allclose(ema.module.weight, 0.5 * before + 0.5 * online.weight)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "pretrain", 1) == derive_seed(0, "pretrain", 1)
    assert derive_seed(0, "pretrain", 1) != derive_seed(0, "pretrain", 2)


def test_derive_seed_keeps_the_values_recorded_runs_were_made_with():
    # every committed result was seeded through these values: changing them changes every run
    assert derive_seed(0, "pretrain", 1) == 4118735716447436969
    assert derive_seed(3, "finetune", 0, "x") == 7436229852138909141
    # the definition: the first 8 bytes of sha256("a/b/..."), little-endian, top bit cleared
    digest = hashlib.sha256(b"3/finetune/0/x").digest()
    assert derive_seed(3, "finetune", 0, "x") == struct.unpack("<Q", digest[:8])[0] % 2**63
    assert all(0 <= derive_seed(i) < 2**63 for i in range(64))
    assert max(derive_seed(i) for i in range(64)) >= 2**62  # the 63 bits are used, not fewer


def test_cosine_schedule_clamps_after_the_last_step_even_with_a_single_decay_step():
    s = Schedule(epochs=1, steps_per_epoch=3, lr=1.0, min_lr=0.1, weight_decay=0.0, warmup_steps=2)
    assert cosine_lr(2, s) == pytest.approx(1.0)
    assert cosine_lr(3, s) == pytest.approx(0.1) and cosine_lr(7, s) == pytest.approx(0.1)


def test_autocast_context_is_bf16_autocast_on_cuda_and_cpu_and_nothing_elsewhere():
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constructing a CUDA autocast without CUDA only warns
            ctx = autocast_context(device, "bf16")
        assert isinstance(ctx, torch.autocast)
        assert ctx.device == device.type and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_context(torch.device("mps"), "bf16"), torch.autocast)
    assert not isinstance(autocast_context(torch.device("cpu"), "fp32"), torch.autocast)


class _Toy(torch.nn.Module):
    def __init__(self, blow_up_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.blow_up_at = blow_up_at

    def forward(self, batch, info):
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape)  # draws from the global RNG, like dropout
        loss = ((self.lin(x).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.blow_up_at is not None and info.step >= self.blow_up_at:
            loss = loss * float("nan")
        return loss, {}


def _batches(epoch, generator):
    for _ in range(3):
        x = torch.randn(8, 4, generator=generator)
        yield {"x": x, "y": x.sum(dim=1)}


def _fit(tmp_path, epochs, resume=False, model=None):
    torch.manual_seed(0)
    model = model or _Toy()
    s = Schedule(
        epochs=epochs, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9
    )
    res = fit(
        model,
        _batches,
        s,
        stage="toy",
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=tmp_path,
        logger=MetricsLogger(None),
        evaluate=lambda m: {"score": -float(m.lin.bias.abs())},
        resume=resume,
    )
    return model, res


def _fit_toy(model, schedule, ckpt_dir=None, batches=_batches, stage="toy", seed=0, logger=None, **kwargs):
    """``fit`` of a toy model on ``batches`` on CPU, without logs, checkpoints or evaluation unless given;
    keywords not given stay at ``fit``'s defaults."""
    return fit(
        model,
        batches,
        schedule,
        stage=stage,
        seed=seed,
        device=torch.device("cpu"),
        ckpt_dir=ckpt_dir,
        logger=logger or MetricsLogger(None),
        **kwargs,
    )


class _Bar:
    """Stands in for the tqdm bar ``fit`` makes: records how it was made, its count and its postfixes."""

    made: list[_Bar] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.n, self.postfix = kwargs, kwargs.get("initial", 0), []
        _Bar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix.append(kw)

    def close(self):
        pass


def _record_bars(monkeypatch) -> list[_Bar]:
    _Bar.made = []
    monkeypatch.setattr(train, "progress", lambda **kw: _Bar(**kw))
    return _Bar.made


def _one_rank_group(monkeypatch) -> None:
    """Stand-ins for the collectives of a one-rank process group, so that ``fit`` takes its
    torch.distributed path in this process."""
    monkeypatch.setattr(train.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(train.dist, "rank", lambda: 0)
    monkeypatch.setattr(train.dist, "world_size", lambda: 1)
    monkeypatch.setattr(train.dist, "all_gather_object", lambda obj: [obj])
    monkeypatch.setattr(train.dist, "all_reduce_mean", lambda t: t)
    monkeypatch.setattr(train.dist, "all_reduce_max", lambda t: t)
    monkeypatch.setattr(train.dist, "barrier", lambda: None)


def _schedule(epochs: int, **overrides) -> Schedule:
    """A toy schedule: 3 steps an epoch, constant lr 0.01 unless overridden."""
    fields = {"steps_per_epoch": 3, "lr": 0.01, "min_lr": 0.0, "weight_decay": 0.0, "warmup_steps": 0}
    return Schedule(epochs=epochs, **{**fields, **overrides})


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    full, _ = _fit(tmp_path / "full", epochs=4)

    # "kill" after 2 epochs: train a 4-epoch schedule but stop by raising inside epoch 3
    class Stop(Exception):
        pass

    def stopping(epoch, generator):
        if epoch == 2:
            raise Stop
        yield from _batches(epoch, generator)

    torch.manual_seed(0)
    s = Schedule(epochs=4, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9)
    with pytest.raises(Stop):
        fit(
            _Toy(),
            stopping,
            s,
            stage="toy",
            seed=0,
            device=torch.device("cpu"),
            ckpt_dir=tmp_path / "cut",
            logger=MetricsLogger(None),
            evaluate=lambda m: {"score": -float(m.lin.bias.abs())},
        )
    resumed, _ = _fit(tmp_path / "cut", epochs=4, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        _fit(tmp_path, epochs=3, model=_Toy(blow_up_at=4))
    assert (tmp_path / "last.json").exists()


def _no_bf16_probes(monkeypatch):
    """Hide torch's own AMX / AVX512-BF16 probes so that /proc/cpuinfo decides."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if hasattr(torch.cpu, probe):
            monkeypatch.setattr(torch.cpu, probe, lambda: False)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse avx512f amx_tile amx_bf16", True),
        ("fpu avx512f avx512_bf16", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_cpu_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, flags, native):
    _no_bf16_probes(monkeypatch)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_path = train.Path
    monkeypatch.setattr(train, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert train.cpu_native_bf16() is native


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert isinstance(autocast_context(cpu, "auto"), torch.autocast)
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert not isinstance(autocast_context(cpu, "auto"), torch.autocast)
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        resolve_precision("fp16", cpu)


def test_fit_with_auto_precision_without_native_bf16_trains_exactly_as_fp32(monkeypatch):
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    results = []
    for precision in ("fp32", "auto"):
        torch.manual_seed(0)
        model = _Toy()
        s = Schedule(epochs=1, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1)
        _fit_toy(model, s, precision=precision)
        results.append(model.lin.weight.detach().clone())
    assert torch.equal(results[0], results[1])


class _TwoSpeeds(torch.nn.Module):
    """A "pre-trained" layer and a new head whose learning rate is 10x (the method's ``lr_scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)

    def lr_scale(self, name: str) -> float:
        return 1.0 if name.startswith("enc.") else 10.0

    def forward(self, batch, info):
        return ((self.head(self.enc(batch["x"])).squeeze(-1) - batch["y"]) ** 2).mean(), {}


def test_lr_scale_puts_each_parameter_in_a_group_whose_lr_follows_the_schedule_times_its_factor():
    model = _TwoSpeeds()
    opt = train.build_optimizer(model, 0.1, 0.05, torch.device("cpu"), model.lr_scale)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert (
        by_param[id(model.enc.weight)]["lr_scale"] == 1.0
        and by_param[id(model.head.weight)]["lr_scale"] == 10
    )
    assert (
        by_param[id(model.enc.weight)]["weight_decay"] == 0.05
        and by_param[id(model.head.bias)]["weight_decay"] == 0
    )
    with pytest.raises(ValueError, match="positive"):
        train.build_optimizer(model, 0.1, 0.0, torch.device("cpu"), lambda name: 0.0)

    seen = []
    real = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append({g["lr_scale"]: g["lr"] for g in self.param_groups})
        return real(self, *args, **kwargs)

    s = Schedule(epochs=2, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        _fit_toy(model, s)
    assert len(seen) == 6
    for step, lrs in enumerate(seen):
        assert lrs[1.0] == pytest.approx(cosine_lr(step, s)) and lrs[10.0] == pytest.approx(
            10 * cosine_lr(step, s)
        )


def test_resolve_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert train.resolve_device("auto") == torch.device("cpu")
    assert train.resolve_device() == torch.device("cpu")  # auto is the default
    assert train.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(
        RuntimeError, match="^device 'cuda' was asked for but CUDA is not available; use --device cpu$"
    ):
        train.resolve_device("cuda:1")
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)
        assert train.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.dist, "local_rank", lambda: 3)
    # under torchrun "cuda" is the local rank's GPU; "auto" too
    assert train.resolve_device("cuda") == torch.device("cuda", 3)
    assert train.resolve_device("auto") == torch.device("cuda", 3)
    assert train.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_compile_blocks_compiles_each_element_of_every_module_list(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = torch.nn.Sequential(
        torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]),
        torch.nn.Linear(2, 2),
        torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU()])),
    )
    assert train.compile_blocks(model) == 3
    assert compiled == [model[0][0], model[0][1], model[2][0][0]]


def test_wrap_ddp_skips_the_per_step_buffer_broadcast_and_says_when_parameters_go_unused(tmp_path):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = torch.nn.Linear(2, 2)
        ddp = train.wrap_ddp(plain, torch.device("cpu"))
        assert train.unwrap(ddp) is plain and train.unwrap(plain) is plain
        assert ddp.device_ids is None and ddp.find_unused_parameters is False
        assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is False

        class Partial(torch.nn.Linear):
            find_unused_parameters = True

        assert train.wrap_ddp(Partial(2, 2), torch.device("cpu")).find_unused_parameters is True
    finally:
        tdist.destroy_process_group()


def test_cpu_native_bf16_trusts_torchs_own_probes_before_the_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    real_path = train.Path
    monkeypatch.setattr(train, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    _no_bf16_probes(monkeypatch)
    assert train.cpu_native_bf16() is False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        _no_bf16_probes(monkeypatch)
        monkeypatch.setattr(torch.cpu, probe, lambda: True, raising=False)
        assert train.cpu_native_bf16() is True, probe
    # no flags line, or no /proc/cpuinfo at all: not native
    _no_bf16_probes(monkeypatch)
    cpuinfo.write_text("processor\t: 0\nmodel name\t: amx_bf16 in a name\n")
    assert train.cpu_native_bf16() is False
    monkeypatch.setattr(
        train, "Path", lambda p: tmp_path / "missing" if p == "/proc/cpuinfo" else real_path(p)
    )
    assert train.cpu_native_bf16() is False


def test_optimizer_groups_skip_frozen_parameters_and_exempt_tokens_and_norms_from_decay():
    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.temp = torch.nn.Parameter(torch.ones(1, 1))
            self.norm = torch.nn.LayerNorm(4)
            self.fc = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

    model = Tokens()
    opt = train.build_optimizer(
        model, 0.1, 0.05, torch.device("cpu"), lambda n: 10.0 if n.startswith("head") else 1.0
    )
    groups = [(g["lr_scale"], g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    ids = {name: id(p) for name, p in model.named_parameters()}
    # one group per (scale, decay), in a fixed order: checkpointed optimizer states depend on it
    assert [(s, wd) for s, wd, _ in groups] == [(1.0, 0.05), (1.0, 0.0), (10.0, 0.05), (10.0, 0.0)]
    assert groups[0][2] == {ids["fc.weight"]}
    assert groups[1][2] == {
        ids[n]
        for n in ("cls_token", "pos_embed", "mask_token", "temp", "norm.weight", "norm.bias", "fc.bias")
    }
    assert groups[2][2] == {ids["head.weight"]} and groups[3][2] == {ids["head.bias"]}
    assert not {ids["frozen.weight"], ids["frozen.bias"]} & set().union(*(g for *_, g in groups))
    assert all(g["fused"] for g in opt.param_groups)  # the fused kernel on CPU (and CUDA)


def test_ema_decay_zero_copies_the_online_weights_and_the_copy_is_frozen():
    online = torch.nn.Linear(2, 1)
    ema = EMAModel(online, decay=0.0)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, step=100)
    assert torch.equal(ema.module.weight, online.weight)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMAModel(online, decay=1.0)


@pytest.mark.parametrize(("bad", "where"), [(-1, None), (0, "epoch 1, step 1"), (7, "epoch 3, step 8")])
def test_a_non_finite_loss_is_reported_at_its_epoch_and_step(bad, where):
    s = Schedule(epochs=4, steps_per_epoch=3, lr=0.1, min_lr=0.0, weight_decay=0.0, warmup_steps=0)
    if where is None:
        train._raise_if_non_finite(torch.tensor(bad), "toy", s)
        return
    advice = "the last good checkpoint is kept. Lower the learning rate or check the input images."
    expected = rf"^\[toy\] the loss became NaN or infinite at {where}; {re.escape(advice)}$"
    with pytest.raises(NonFiniteLossError, match=expected):
        train._raise_if_non_finite(torch.tensor(bad), "toy", s)


def test_seed_all_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        train.seed_all(2**40 + 5)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    train.seed_all(6)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) != draws[0]


class _Counting(torch.nn.Module):
    """Loss = step + 1 (with a zero-weight parameter so that it has a gradient), and a logged value."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batch, info):
        value = float(info.step + 1)
        return self.w * 0.0 + value, {"twice": torch.tensor(2 * value)}


@pytest.mark.parametrize("steps_per_epoch", [1, 3])
def test_each_epochs_record_holds_the_mean_of_its_steps_losses_and_logs(steps_per_epoch):
    s = Schedule(
        epochs=2, steps_per_epoch=steps_per_epoch, lr=0.1, min_lr=0.0, weight_decay=0.0, warmup_steps=0
    )

    def batches(epoch, generator):
        return iter([{}] * steps_per_epoch)

    result = _fit_toy(_Counting(), s, batches=batches)
    for epoch, record in enumerate(result.history):
        steps = [epoch * steps_per_epoch + i + 1 for i in range(steps_per_epoch)]
        assert record["epoch"] == epoch + 1
        assert record["loss"] == pytest.approx(sum(steps) / steps_per_epoch)
        assert record["twice"] == pytest.approx(2 * sum(steps) / steps_per_epoch)


def test_without_lr_scale_every_group_has_factor_one_and_the_given_lr():
    opt = train.build_optimizer(_Toy(), 0.123, 0.05, torch.device("cpu"))
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0]
    assert all(g["lr"] == 0.123 for g in opt.param_groups)


def test_seed_all_seeds_numpy_with_the_seed_itself_below_two_to_the_32():
    import numpy as np

    train.seed_all(100)
    drawn = np.random.rand()
    np.random.seed(100)
    assert drawn == np.random.rand()


@pytest.mark.parametrize("ema", [None, 0.5])
def test_fit_evaluates_the_ema_copy_when_set_and_restores_the_selected_weights(ema, tmp_path):
    model = _Toy()
    seen = []

    def evaluate(m):
        seen.append((m, {k: v.clone() for k, v in m.state_dict().items()}))
        return {"score": [0.0, 2.0, 1.0][len(seen) - 1]}  # the second epoch is the best

    s = Schedule(epochs=3, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=0, ema=ema)
    result = _fit_toy(model, s, ckpt_dir=tmp_path, evaluate=evaluate)
    assert result.best_epoch == 2 and result.best_score == 2.0
    evaluated = {id(m) for m, _ in seen}
    assert evaluated == ({id(model)} if ema is None else {id(seen[0][0])}) and len(evaluated) == 1
    if ema is not None:
        assert seen[0][0] is not model
    selected = seen[1][1]
    assert all(torch.equal(v, selected[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, seen[2][1][k]) for k, v in selected.items())


def test_fit_starts_from_scratch_unless_asked_to_resume(tmp_path):
    class Counted(_Toy):
        steps = 0

        def forward(self, batch, info):
            Counted.steps += 1
            return super().forward(batch, info)

    _fit(tmp_path, epochs=2, model=Counted())
    Counted.steps = 0
    s = Schedule(epochs=3, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9)
    # a checkpoint is there, but resume (a keyword left at its default here) was not asked for
    _fit_toy(Counted(), s, ckpt_dir=tmp_path)
    assert Counted.steps == 9
    Counted.steps = 0
    _fit(tmp_path, epochs=4, model=Counted(), resume=True)
    assert Counted.steps == 3


def test_fit_compiles_nothing_unless_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "compile_blocks", lambda module: calls.append(module) or 0)
    s = Schedule(epochs=1, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=0)
    _fit_toy(_Toy(), s)
    assert calls == []
    model = _Toy()
    _fit_toy(model, s, compile=True)
    assert calls == [model]  # the method itself (its blocks), before any DDP wrapper
    _fit_toy(_Toy(), s, compile=True, compile_devices=("cuda",))
    assert calls == [model]


def test_fit_says_when_auto_precision_resolves_and_is_quiet_otherwise(monkeypatch, capsys):
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    s = Schedule(epochs=1, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=0)
    _fit_toy(_Toy(), s, precision="auto")
    assert "[toy] precision auto: fp32 on cpu" in capsys.readouterr().err
    _fit_toy(_Toy(), s, precision="fp32")
    assert "precision" not in capsys.readouterr().err


@pytest.mark.parametrize(("device", "fused"), [("cpu", True), ("cuda", True), ("mps", None)])
def test_the_fused_adamw_kernel_is_asked_for_on_cpu_and_cuda_only(device, fused):
    # the optimizer is only built here, never stepped, so the toy's CPU tensors can stand for any device
    opt = train.build_optimizer(_Toy(), 0.1, 0.0, torch.device(device))
    assert opt.defaults["fused"] is fused


def test_cpu_native_bf16_without_torchs_probes_reads_undecodable_cpuinfo(monkeypatch, tmp_path):
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)  # an older torch has neither
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_bytes(b"model name\t: Vendor \xff\xfe CPU\nflags\t\t: fpu avx512f amx_bf16\n")
    real_path = train.Path
    monkeypatch.setattr(train, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert train.cpu_native_bf16() is True


@pytest.mark.parametrize("newer_torch", [True, False])
@pytest.mark.parametrize(("device", "ids"), [(torch.device("cpu"), None), (torch.device("cuda", 3), [3])])
def test_wrap_ddp_passes_ddp_exactly_the_options_it_means(monkeypatch, device, ids, newer_torch):
    import inspect

    seen = {}

    def record(self, module, **kwargs):
        seen.update(kwargs)

    # DDP's signature: torch >= 2.6 split broadcast_buffers, and forward_sync_buffers is the per-step part
    names = ["self", "module", "device_ids", "find_unused_parameters", "broadcast_buffers"]
    names += ["forward_sync_buffers"] if newer_torch else []
    record.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    monkeypatch.setattr(train.nn.parallel, "DistributedDataParallel", type("DDP", (), {"__init__": record}))
    train.wrap_ddp(torch.nn.Linear(2, 2), device)
    flag = "forward_sync_buffers" if newer_torch else "broadcast_buffers"
    assert seen == {"device_ids": ids, "find_unused_parameters": False, flag: False}


def test_epoch_means_across_ranks_refuse_ranks_that_logged_different_keys(monkeypatch):
    # the cross-rank check runs only under torch.distributed; a fake of the two collectives it calls
    # stands in for a second rank, whose keys are `other`
    other: list[str] = []
    gathered: list[object] = []

    def all_gather_object(obj):
        gathered.append(obj)
        return [obj, other]

    _one_rank_group(monkeypatch)
    monkeypatch.setattr(train.dist, "all_gather_object", all_gather_object)
    sums = {"loss": torch.tensor(6.0), "acc": torch.tensor(3.0)}
    other[:] = ["acc", "loss"]
    assert train._epoch_means(sums, 3) == {"acc": 1.0, "loss": 2.0}
    assert gathered == [["acc", "loss"]]  # the sorted keys are what each rank sends
    other[:] = ["loss"]
    with pytest.raises(RuntimeError, match=r"ranks logged different values this epoch: .*every rank must"):
        train._epoch_means(sums, 3)


def test_each_epoch_draws_from_generators_seeded_by_seed_stage_epoch_and_rank():
    # the data order, augmentation, masking and dropout of a run are fixed by these four parts alone
    seen: list[tuple[int, int, int]] = []

    def batches(epoch, generator):
        seen.append((epoch, generator.initial_seed(), torch.initial_seed()))
        yield from _batches(epoch, generator)

    s = _schedule(3)
    _fit_toy(_Toy(), s, batches=batches, stage="pretrain", seed=7)
    expected = [
        (e, derive_seed(7, "pretrain", e, 0), derive_seed(7, "pretrain", "global", e, 0)) for e in range(3)
    ]
    assert seen == expected


def test_after_step_and_ema_decay_hooks_run_once_per_step_after_the_update():
    # after_step (momentum encoders, queues) must see the weights of this step's update; ema_decay (HABIT)
    # chooses the decay the EMA copy uses at this step
    class Hooked(_Toy):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int, int, float, bool]] = []
            self.asked: list[tuple[float, bool]] = []

        def forward(self, batch, info):
            self.before = self.lin.weight.detach().clone()
            return super().forward(batch, info)

        def after_step(self, info):
            updated = not torch.equal(self.lin.weight, self.before)
            self.seen.append((info.epoch, info.step, info.total_steps, info.epoch_progress, updated))
            assert info.generator.initial_seed() == derive_seed(0, "toy", info.epoch, 0)

        def ema_decay(self, decay, ema_module):
            self.asked.append((decay, isinstance(ema_module, Hooked) and ema_module is not self))
            return 0.0  # the EMA copy takes the online weights at every step

    model = Hooked()
    evaluated: list[bool] = []

    def evaluate(m):
        evaluated.append(m is not model and torch.equal(m.lin.weight, model.lin.weight))
        return {"score": 0.0}

    s = Schedule(epochs=2, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=0, ema=0.9)
    _fit_toy(model, s, evaluate=evaluate)
    assert model.seen == [(e, 3 * e + i, 6, i / 3, True) for e in range(2) for i in range(3)]
    assert model.asked == [(0.9, True)] * 6
    assert evaluated == [True, True]  # the evaluated EMA copy followed the decay of 0 it was given


def test_fit_in_bf16_runs_each_step_under_cpu_bf16_autocast():
    seen: list[tuple[bool, torch.dtype]] = []

    class Probe(_Toy):
        def forward(self, batch, info):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(batch, info)

    s = _schedule(1)
    _fit_toy(Probe(), s, precision="bf16")
    assert seen == [(True, torch.bfloat16)] * 3
    seen.clear()
    _fit_toy(Probe(), s, precision="fp32")
    assert [enabled for enabled, _ in seen] == [False] * 3


def test_a_parameter_without_a_gradient_in_a_step_is_not_moved_by_that_step():
    # gradients are reset to None, not zero: AdamW then skips a parameter a step does not use (e.g. a head
    # of a modality absent from the batch) instead of moving it with its old momentum
    class SometimesUnused(_Toy):
        def __init__(self) -> None:
            super().__init__()
            self.aux = torch.nn.Parameter(torch.ones(3))
            self.values: list[torch.Tensor] = []

        def forward(self, batch, info):
            self.values.append(self.aux.detach().clone())
            loss, logs = super().forward(batch, info)
            return (loss + self.aux.sum() if info.step == 0 else loss), logs

    model = SometimesUnused()
    s = Schedule(epochs=1, steps_per_epoch=3, lr=0.1, min_lr=0.1, weight_decay=0.0, warmup_steps=0)
    _fit_toy(model, s)
    assert not torch.equal(model.values[1], model.values[0])  # step 0 used and moved it
    assert torch.equal(model.aux.detach(), model.values[1])  # steps 1 and 2 left it where step 0 put it


def test_the_progress_bar_counts_every_step_and_shows_the_running_mean_loss(monkeypatch):
    bars = _record_bars(monkeypatch)
    monkeypatch.setattr(train, "CHECK_EVERY", 1)

    class Constant(_Toy):
        def forward(self, batch, info):
            loss, logs = super().forward(batch, info)
            return loss * 0 + info.step, logs  # loss = the step's index

    s = _schedule(2)
    _fit_toy(Constant(), s)
    (bar,) = bars
    assert bar.kwargs["total"] == 6 and bar.kwargs["desc"] == "toy" and bar.n == 6
    # running mean of the epoch's losses so far: epoch 1 sees 0, 0.5, 1; epoch 2 sees 3, 3.5, 4
    means = [0.0, 0.5, 1.0, 3.0, 3.5, 4.0]
    shown = [(p["loss"], p["epoch"]) for p in bar.postfix]
    assert shown == [(f"{m:.3f}", 1 + i // 3) for i, m in enumerate(means)]
    # no forced redraw per step: tqdm redraws at its own pace (a redraw per step slows small models)
    assert all(p["refresh"] is False for p in bar.postfix)


def test_evaluation_runs_every_eval_every_epochs_and_after_the_last():
    s = _schedule(5)
    for every, epochs in ((2, [2, 4, 5]), (3, [3, 5]), (5, [5])):
        result = _fit_toy(_Toy(), s, evaluate=lambda model: {"score": 0.0}, eval_every=every)
        assert [r["epoch"] for r in result.history if "val_score" in r] == epochs


def test_an_epoch_without_batches_logs_a_zero_learning_rate_and_no_losses():
    def sometimes_empty(epoch, generator):
        if epoch != 1:
            yield from _batches(epoch, generator)

    s = _schedule(3, min_lr=0.01)
    result = _fit_toy(_Toy(), s, batches=sometimes_empty)
    assert [r["lr"] for r in result.history] == [0.01, 0.0, 0.01]
    assert "loss" not in result.history[1] and "loss" in result.history[2]


def test_auto_precision_on_cuda_follows_the_devices_bf16_support_and_other_devices_stay_fp32(monkeypatch):
    cuda = torch.device("cuda", 0)
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", cuda) == expected
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    # as asked; autocast_context then skips it
    assert resolve_precision("bf16", torch.device("mps")) == "bf16"
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or auto, got 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_each_epoch_is_logged_once_under_the_stage_at_its_last_step(tmp_path):
    s = _schedule(2)
    logger = MetricsLogger(tmp_path, tensorboard=False)
    result = _fit_toy(_Toy(), s, stage="finetune", logger=logger)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["epoch"]) for r in rows] == [("finetune", 3, 1), ("finetune", 6, 2)]
    assert [r["loss"] for r in rows] == pytest.approx([h["loss"] for h in result.history])


@pytest.mark.parametrize("check_every", [1, 100])
@pytest.mark.parametrize("first", [0, 1, 4])
def test_the_first_non_finite_step_is_reported_even_when_later_steps_are_non_finite_too(
    monkeypatch, first, check_every
):
    # the flag is read every CHECK_EVERY steps and at the end of each epoch: later bad steps must not
    # overwrite the first one
    monkeypatch.setattr(train, "CHECK_EVERY", check_every)
    s = _schedule(2)
    epoch = first // 3 + 1
    expected = rf"^\[toy\] the loss became NaN or infinite at epoch {epoch}, step {first + 1};"
    with pytest.raises(NonFiniteLossError, match=expected):
        _fit_toy(_Toy(blow_up_at=first), s)


def test_the_best_checkpoint_is_the_first_epoch_with_the_best_score_and_says_so(tmp_path):
    scores = iter([0.5, 0.7, 0.7, 0.2])  # a tie at epochs 2 and 3: the earlier one stays the best
    weights_at: list[torch.Tensor] = []

    def evaluate(model):
        weights_at.append(model.lin.weight.detach().clone())
        return {"score": next(scores)}

    s = _schedule(4)
    result = _fit_toy(_Toy(), s, ckpt_dir=tmp_path, evaluate=evaluate)
    assert (result.best_epoch, result.best_score) == (2, 0.7)
    state, info = load_checkpoint(tmp_path / "best")
    assert {k: info[k] for k in ("epoch", "score")} == {"epoch": 2, "score": 0.7}
    assert torch.equal(state["model"]["lin.weight"], weights_at[1])


def test_the_last_checkpoint_records_its_stage_epoch_best_and_history(tmp_path):
    s = _schedule(2)
    scores = iter([0.3, 0.1])
    result = _fit_toy(_Toy(), s, ckpt_dir=tmp_path, evaluate=lambda m: {"score": next(scores)})
    _, info = load_checkpoint(tmp_path / "last")
    assert info["stage"] == "toy" and info["epoch"] == 1  # 0-based: the last finished epoch
    assert (info["best_score"], info["best_epoch"]) == (0.3, 1)
    assert info["history"] == result.history


def test_resuming_without_extra_state_ignores_the_checkpoints_extra(tmp_path):
    s = _schedule(2)
    first = _schedule(1)
    _fit_toy(_Toy(), first, ckpt_dir=tmp_path, extra=torch.nn.Linear(1, 1))
    result = _fit_toy(_Toy(), s, ckpt_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_under_torch_distributed_the_step_runs_through_the_ddp_wrapper(monkeypatch):
    # stand-ins for a one-rank process group: fit must wrap the method once, with its device, and call
    # the wrapper (which averages gradients) rather than the bare method
    wrapped: list[tuple[torch.nn.Module, torch.device]] = []
    calls: list[int] = []

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, batch, info):
            calls.append(info.step)
            return self.module(batch, info)

    def wrap(method, device):
        wrapped.append((method, device))
        return Wrapper(method)

    _one_rank_group(monkeypatch)
    monkeypatch.setattr(train, "wrap_ddp", wrap)
    model = _Toy()
    s = _schedule(1)
    _fit_toy(model, s)
    assert wrapped == [(model, torch.device("cpu"))] and calls == [0, 1, 2]


def test_a_resumed_fits_progress_bar_starts_at_the_steps_already_done(monkeypatch, tmp_path):
    bars = _record_bars(monkeypatch)
    first = _schedule(2)
    _fit_toy(_Toy(), first, ckpt_dir=tmp_path)
    longer = _schedule(5)
    _fit_toy(_Toy(), longer, ckpt_dir=tmp_path, resume=True)
    assert [(b.kwargs["total"], b.kwargs["initial"]) for b in bars] == [(6, 0), (15, 6)]
