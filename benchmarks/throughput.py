"""Throughput of every training step of the package, against the bound of its encoder passes.

    python benchmarks/throughput.py --preset cpu                       # 2 CPU cores: a few minutes
    python benchmarks/throughput.py --preset paper --device cuda --out benchmarks/results/h100

For each step (MICS pre-training, SVD construction, fusion fine-tuning, the baseline families) it reports

* measured: samples/s of the real step, run by ``mics.engine.train.fit`` on the real batch function
  (uint8 arrays -> augmentation -> normalisation) and the real method module (forward, backward,
  optimiser step, momentum / EMA updates);
* bound: samples/s of just the encoder passes the step needs (forward + backward at the same shapes and
  precision, nothing else), timed in the same process and interleaved with the real steps, so that a
  machine shared with other jobs slows both alike;
* efficiency = measured / bound (the share of the step spent in encoder compute);
* loader: samples/s of the batch function alone (batch construction + augmentation);
* peak memory: ``torch.cuda.max_memory_allocated`` of the real steps on CUDA, the process' peak resident set
  (VmHWM, reset before the timed steps) on CPU.

Images are random uint8 arrays of the preset's size: the step costs do not depend on the pixel values.
Warm-up steps are excluded from every number.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import mics.engine.train
import mics.methods.svd
from mics.config import RunConfig, preset
from mics.data.views import to_float
from mics.engine.logging import MetricsLogger
from mics.engine.train import BatchFn, Schedule, autocast_context, fit, resolve_device
from mics.methods.baseline import SSLTraining, ssl_batches
from mics.methods.finetune import FusionFinetuning, labelled_batches
from mics.methods.pretrain import SynergisticPretraining, pair_batches
from mics.methods.ssl import build_algorithm
from mics.methods.svd import build_dictionary, encode_features
from mics.pipeline import build_finetune_model


def _quiet(iterable: Any = None, **kwargs: Any) -> Any:
    return tqdm(iterable, total=kwargs.get("total"), disable=True)


# the stages' progress bars would interleave with the table
mics.engine.train.progress = _quiet  # type: ignore[assignment]
mics.methods.svd.progress = _quiet  # type: ignore[assignment]

NUM_CLASSES = 6  # Kvasir
BASELINES_DEFAULT = ("supervised", "fixmatch", "fixmatch/multimodal", "habit", "siabc")
BASELINES_ALL = (
    "supervised",
    "fixmatch",
    "fixmatch/multimodal",
    "flexmatch",
    "dash",
    "freematch",
    "softmatch",
    "habit",
    "siabc",
)


# ----------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """Cores, CPU model, torch version and threads, GPU: what a reader needs to compare numbers."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ------------------------------------------------------------------------------------------ measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class PeakMemory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the process' peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def record(self) -> None:
        self.peak = max(self.peak, self.current_peak())

    def current_peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


@dataclass
class Timings:
    real: list[float] = field(default_factory=list)  # seconds per real step
    bound: list[float] = field(default_factory=list)  # seconds per bound pass
    loader: list[float] = field(default_factory=list)  # seconds per batch of the batch function alone


class StepTimer:
    """Wraps a batch function for ``fit`` and times the steps it feeds (warm-up steps excluded).

    ``interleave=True`` (CPU): before each timed step's batch is built, the previous step's timing is closed,
    then one bound pass runs and one batch is built by a second, independent copy of the batch function
    (the loader alone), so real steps, bound passes and loader batches alternate and a machine shared with
    other jobs slows all three alike. A real step's time runs from there to the request of the next batch:
    batch construction + forward + backward + optimiser step + after-step hooks + logging.

    ``interleave=False`` (accelerators): the timed steps run back to back between two synchronisations,
    as in training, so the host may queue work ahead of the device; the bound and the loader are timed in
    blocks after the steps.
    """

    def __init__(
        self,
        inner: BatchFn,
        warmup: int,
        steps: int,
        device: torch.device,
        bound: Callable[[], None],
        memory: PeakMemory,
        interleave: bool,
    ) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(
                "need at least one warm-up step (it records the bound's passes) and one timed step"
            )
        self.inner, self.warmup, self.steps, self.device = inner, warmup, steps, device
        self.bound, self.memory, self.interleave = bound, memory, interleave
        self.timings = Timings()
        self.loader = cycle_batches(inner, torch.Generator().manual_seed(1))

    def load_one(self) -> None:
        next(self.loader)

    def __call__(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        source = cycle_batches(self.inner, generator)
        started = None
        for i in range(self.warmup + self.steps):
            if i >= self.warmup and (self.interleave or i == self.warmup):
                synchronize(self.device)
                now = time.perf_counter()
                if started is not None:
                    self.timings.real.append(now - started)
                    self.memory.record()
                if self.interleave:
                    if i == self.warmup:  # warm-up of the bound and the loader
                        self.bound()
                        self.load_one()
                        synchronize(self.device)
                        now = time.perf_counter()
                    self.bound()
                    synchronize(self.device)
                    after_bound = time.perf_counter()
                    self.timings.bound.append(after_bound - now)
                    self.load_one()
                    synchronize(self.device)
                    self.timings.loader.append(time.perf_counter() - after_bound)
                self.memory.reset()
                started = time.perf_counter()
            yield next(source)
        synchronize(self.device)
        if started is not None:
            elapsed = time.perf_counter() - started
            self.memory.record()
            self.timings.real.append(elapsed if self.interleave else elapsed / self.steps)
        if not self.interleave:
            self.timings.bound.append(_block_time(self.bound, self.device, self.steps))
            self.timings.loader.append(_block_time(self.load_one, self.device, self.steps))


def cycle_batches(inner: BatchFn, generator: torch.Generator) -> Iterator[Any]:
    """The batch function's epochs one after the other, so a short data set never runs dry."""
    return itertools.chain.from_iterable(inner(epoch, generator) for epoch in itertools.count())


def grads_stashed(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run a bound pass without touching the gradients the real step left behind (their memory stays
    allocated as in a real run, and the bound's own gradients are dropped afterwards)."""

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        params = [p for p in module.parameters() if p.requires_grad]
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(params, stash, strict=True):
                p.grad = g

    return ctx()


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, 3, size, size] noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def random_inputs(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Normalised float images as the encoders see them."""
    return to_float(torch.randint(0, 256, shape, dtype=torch.uint8).to(device))


# ----------------------------------------------------------------------------------------------- cases


# steps per epoch -> (method module, batch function, schedule, ``extra`` state for fit)
Builder = Callable[[int], tuple[nn.Module, BatchFn, Schedule, Any]]


@dataclass
class Case:
    """One training step: how to build its module and batches, what its bound pass is."""

    name: str
    samples: int  # samples one step consumes (the unit of every samples/s of this row)
    unit: str
    build: Builder
    bound: Callable[[nn.Module], Callable[[], None]]  # the built module -> one bound pass
    note: str = ""


@dataclass
class Row:
    name: str
    unit: str
    samples: int
    measured: float | None = None
    bound: float | None = None
    efficiency: float | None = None
    loader: float | None = None
    loader_ratio: float | None = None
    peak_mb: float | None = None
    step_ms: float | None = None
    bound_ms: float | None = None
    note: str = ""
    error: str | None = None


class Bench:
    """Builds the cases of one preset on random arrays and measures them."""

    def __init__(self, cfg: RunConfig, device: torch.device, n_images: int, seed: int = 0) -> None:
        self.cfg, self.device, self.seed = cfg, device, seed
        size = cfg.data.image_size
        self.arrays_a = random_images(n_images, size, seed)
        self.arrays_b = random_images(n_images, size, seed + 1)
        self.labels = np.arange(n_images) % NUM_CLASSES
        self.train = np.arange(n_images)
        self.labelled = np.arange(max(cfg.finetune.batch_size, cfg.ssl.batch_size) * 4)

    def autocast(self) -> Any:
        return autocast_context(self.device, self.cfg.precision)

    # pre-training --------------------------------------------------------------------------------------

    def pretrain_case(self) -> Case:
        cfg, b = self.cfg, self.cfg.pretrain.batch_size

        def build(spe: int) -> tuple[nn.Module, BatchFn, Schedule, Any]:
            model = SynergisticPretraining(cfg.model, cfg.pretrain, cfg.data.image_size, len(self.train), b)
            batches = pair_batches(self.arrays_a, self.arrays_b, self.train, b, self.device, seed=self.seed)
            p = cfg.pretrain
            return model, batches, Schedule(1, spe, p.lr, p.min_lr, p.weight_decay, warmup_steps=1), None

        def bound(model: nn.Module) -> Callable[[], None]:
            assert isinstance(model, SynergisticPretraining)
            shape = (b, 3, cfg.data.image_size, cfg.data.image_size)
            a, bb = random_inputs(shape, self.device), random_inputs(shape, self.device)
            pc = cfg.pretrain

            def run() -> None:
                with grads_stashed(model):
                    with self.autocast():
                        loss = a.new_zeros(())
                        if pc.consistency or pc.alignment:
                            loss = (
                                loss
                                + model.enc_a(a)[:, 0].float().mean()
                                + model.enc_b(bb)[:, 0].float().mean()
                            )
                        if pc.consistency:
                            with torch.no_grad():
                                model.enc_a_m(a)
                                model.enc_b_m(bb)
                        if pc.reconstruction:
                            for enc, x in ((model.enc_a, a), (model.enc_b, bb)):
                                tokens, _, ids = enc.forward_masked(x, pc.mask_ratio)
                                loss = loss + model.decoder(tokens, ids).float().mean()
                    loss.backward()

            return run

        parts = []
        if cfg.pretrain.consistency or cfg.pretrain.alignment:
            parts.append("2 full fwd+bwd")
        if cfg.pretrain.consistency:
            parts.append("2 momentum fwd")
        if cfg.pretrain.reconstruction:
            parts.append(f"2 masked fwd+bwd (ratio {cfg.pretrain.mask_ratio}) + decoder fwd+bwd x2")
        return Case("MICS pre-training", b, "pairs", build, bound, note="bound: " + ", ".join(parts))

    # fine-tuning ---------------------------------------------------------------------------------------

    def finetune_case(self) -> Case:
        cfg, b = self.cfg, self.cfg.finetune.batch_size

        def build(spe: int) -> tuple[nn.Module, BatchFn, Schedule, Any]:
            model = build_finetune_model(_Ctx(cfg, NUM_CLASSES))  # type: ignore[arg-type]
            feats = torch.randn(64, cfg.model.width)
            d = build_dictionary(feats, NUM_CLASSES, cfg.svd, seed=self.seed)
            if cfg.finetune.use_svd:
                model.set_dictionaries(d, d if cfg.finetune.use_nbi else None)
            batches = labelled_batches(
                self.arrays_a,
                self.arrays_b if cfg.finetune.use_nbi else None,
                self.labels,
                self.labelled,
                b,
                spe,
                self.device,
                seed=self.seed,
            )
            f = cfg.finetune
            schedule = Schedule(1, spe, f.lr, f.min_lr, f.weight_decay, warmup_steps=1, ema=f.ema)
            return model, batches, schedule, None

        def bound(model: nn.Module) -> Callable[[], None]:
            assert isinstance(model, FusionFinetuning)
            shape = (b, 3, cfg.data.image_size, cfg.data.image_size)
            a, bb = random_inputs(shape, self.device), random_inputs(shape, self.device)

            def run() -> None:
                with grads_stashed(model):
                    with self.autocast():
                        feats = model.encode(a, bb if cfg.finetune.use_nbi else None)
                        loss = sum(v.float().mean() for v in feats.values())
                    loss.backward()  # type: ignore[union-attr]

            return run

        note = "bound: 2 full fwd+bwd + fusion fwd+bwd" if cfg.finetune.use_nbi else "bound: 1 full fwd+bwd"
        return Case("MICS fine-tuning", b, "labelled pairs", build, bound, note=note)

    # baselines -----------------------------------------------------------------------------------------

    def baseline_case(self, spec: str) -> Case:
        method, _, way = spec.partition("/")
        way = way or "standard"
        cfg = self.cfg
        b_l, b_u = cfg.ssl.batch_size, cfg.ssl.batch_size * cfg.ssl.uratio
        supervised = method == "supervised"
        recorder = BackboneRecorder()

        def build(spe: int) -> tuple[nn.Module, BatchFn, Schedule, Any]:
            algorithm = build_algorithm(method, NUM_CLASSES, len(self.train), cfg.ssl)
            model = SSLTraining(cfg.model, cfg.data.image_size, NUM_CLASSES, algorithm)
            recorder.attach(model.backbone)
            batches = ssl_batches(
                self.arrays_a,
                self.arrays_b,
                self.labels,
                self.labelled,
                self.train,
                cfg.ssl,
                way,
                spe,
                self.device,
                seed=self.seed,  # type: ignore[arg-type]
                use_unlabelled=not supervised,
            )
            s = cfg.ssl
            schedule = Schedule(1, spe, s.lr, s.min_lr, s.weight_decay, warmup_steps=1, ema=s.ema)
            return model, batches, schedule, algorithm

        def bound(model: nn.Module) -> Callable[[], None]:
            assert isinstance(model, SSLTraining)
            return recorder.replay(model.backbone, self.device, self.autocast)

        if supervised:
            return Case("supervised", b_l, "labelled", build, bound, note="bound: backbone fwd+bwd [B_l]")
        label = method if way == "standard" else f"{method} ({way})"
        strong = "RandAugment" if way == "standard" else "weak partner"
        return Case(
            label,
            b_l + b_u,
            "labelled + unlabelled",
            build,
            bound,
            note=f"strong view: {strong}; bound: the backbone calls of one real step",
        )

    # SVD -------------------------------------------------------------------------------------------------

    def svd_row(self, n: int, reps: int) -> Row:
        """encode (both modalities, no augmentation) + k-means + shift sampling, against encode-only."""
        cfg = self.cfg
        model = SynergisticPretraining(
            cfg.model,
            replace(cfg.pretrain, consistency=False, alignment=False, reconstruction=True),
            cfg.data.image_size,
            len(self.train),
            cfg.pretrain.batch_size,
        )
        encoders = [model.enc_a.to(self.device), model.enc_b.to(self.device)]
        idx = self.train[:n]
        batch = 128
        inputs = [random_inputs((min(batch, n), 3, cfg.data.image_size, cfg.data.image_size), self.device)]

        @torch.no_grad()
        def bound() -> None:
            for enc in encoders:
                enc.eval()
                for start in range(0, n, batch):
                    x = inputs[0][: min(batch, n - start)]
                    with self.autocast():
                        enc(x)

        def real() -> tuple[float, float]:
            t0 = time.perf_counter()
            feats = [
                encode_features(enc, arr, idx, self.device)
                for enc, arr in zip(encoders, (self.arrays_a, self.arrays_b), strict=True)
            ]
            synchronize(self.device)
            t1 = time.perf_counter()
            for f in feats:
                build_dictionary(f, NUM_CLASSES, cfg.svd, seed=self.seed)
            return t1 - t0, time.perf_counter() - t1

        memory = PeakMemory(self.device)
        bound()
        real()  # warm-up
        bound_t, enc_t, km_t = [], [], []
        memory.reset()
        for _ in range(reps):
            synchronize(self.device)
            t = time.perf_counter()
            bound()
            synchronize(self.device)
            bound_t.append(time.perf_counter() - t)
            e, k = real()
            enc_t.append(e)
            km_t.append(k)
        memory.record()
        loader_t = _time(
            lambda: [
                to_float(
                    torch.from_numpy(np.ascontiguousarray(self.arrays_a[idx[s : s + batch]])).to(self.device)
                )
                for s in range(0, n, batch)
            ],
            self.device,
        )
        real_s = statistics.median(e + k for e, k in zip(enc_t, km_t, strict=True))
        bound_s = statistics.median(bound_t)
        row = Row(
            "SVD construction",
            "training pairs",
            n,
            measured=n / real_s,
            bound=n / bound_s,
            loader=n / loader_t,
            peak_mb=memory.peak / 2**20,
            step_ms=1000 * real_s,
            bound_ms=1000 * bound_s,
        )
        row.efficiency = row.measured / row.bound  # type: ignore[operator]
        row.loader_ratio = row.loader / row.measured  # type: ignore[operator]
        row.note = (
            f"whole pass over {n} pairs, both modalities; encode {1000 * statistics.median(enc_t):.0f} ms "
            f"+ k-means/shifts {1000 * statistics.median(km_t):.0f} ms; bound: 2 encoder fwd (eval, no grad)"
        )
        return row

    # running -----------------------------------------------------------------------------------------------

    def measure(self, case: Case, warmup: int, steps: int) -> Row:
        row = Row(case.name, case.unit, case.samples, note=case.note)
        torch.manual_seed(self.seed)
        model, batches, schedule, extra = case.build(warmup + steps)
        model.to(self.device)
        memory = PeakMemory(self.device)
        timer = StepTimer(
            batches,
            warmup,
            steps,
            self.device,
            case.bound(model),
            memory,
            interleave=self.device.type == "cpu",
        )
        fit(
            model,
            timer,
            schedule,
            stage=f"bench-{case.name}",
            seed=self.seed,
            device=self.device,
            ckpt_dir=None,
            logger=MetricsLogger(None),
            precision=self.cfg.precision,
            extra=extra,
            compile=self.cfg.compile,
        )
        real_s, bound_s = statistics.median(timer.timings.real), statistics.median(timer.timings.bound)
        row.step_ms, row.bound_ms = 1000 * real_s, 1000 * bound_s
        row.measured, row.bound = case.samples / real_s, case.samples / bound_s
        row.efficiency = bound_s / real_s
        loader_s = statistics.median(timer.timings.loader)
        row.loader = case.samples / loader_s
        row.loader_ratio = real_s / loader_s
        row.peak_mb = memory.peak / 2**20
        return row


class _Ctx:
    """The two attributes of a run context ``build_finetune_model`` reads."""

    def __init__(self, cfg: RunConfig, num_classes: int) -> None:
        self.cfg, self.num_classes = cfg, num_classes


class BackboneRecorder:
    """Records the backbone calls of the first real step (input shape, whether grad was on) so the bound
    replays exactly the encoder passes the step makes: one joint pass for FixMatch-like methods, an extra
    no-grad weak pass where a method needs the weak logits before it mixes its inputs, and so on."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], bool]] = []
        self.recording = True
        self.handle: Any = None

    def attach(self, backbone: nn.Module) -> None:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.recording:
                self.calls.append((tuple(args[0].shape), torch.is_grad_enabled()))

        self.handle = backbone.register_forward_pre_hook(hook)

    def replay(
        self, backbone: nn.Module, device: torch.device, autocast: Callable[[], Any]
    ) -> Callable[[], None]:
        inputs: dict[tuple[int, ...], torch.Tensor] = {}

        def run() -> None:
            if not self.calls:  # called before the first real step: nothing recorded yet
                return
            self.recording = False
            with grads_stashed(backbone):
                loss = None
                with autocast():
                    for shape, grad in self.calls:
                        if shape not in inputs:
                            inputs[shape] = random_inputs(shape, device)
                        with torch.set_grad_enabled(grad):
                            out = backbone(inputs[shape])[:, 0].float().mean()
                        if grad:
                            loss = out if loss is None else loss + out
                if loss is not None:
                    loss.backward()

        return run


def _time(fn: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
    """Median seconds of one call of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _block_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls made back to back between two synchronisations (the device
    may queue ahead, as in training), after one warm-up call."""
    fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / reps


# ----------------------------------------------------------------------------------------------- output


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(rows: list[Row]) -> str:
    head = (
        "| step | samples/step | measured samples/s | bound samples/s | efficiency | loader samples/s "
        "| loader / step | step ms | peak MB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.samples} {r.unit} | failed: {r.error} | | | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.samples} {r.unit} | {fmt(r.measured)} | {fmt(r.bound)} "
            f"| {fmt(r.efficiency, 2)} "
            f"| {fmt(r.loader)} | {fmt(r.loader_ratio, 1)}x | {fmt(r.step_ms, 0)} | {fmt(r.peak_mb, 0)} |"
        )
    return head + "\n".join(lines) + "\n"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"# Step throughput, preset `{meta['preset']}` on {meta['device']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
        f"GPU: {m['gpu'] or 'none'}; load average {m.get('load_average_start')} at the start, "
        f"{m.get('load_average_end')} at the end. Precision {meta['precision']}, "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps per row (medians), "
        f"{meta['wall_s']:.0f} s in all.",
        "",
        table(rows),
        "",
        "Notes:",
        "",
    ]
    lines += [f"- **{r.name}**: {r.note}" for r in rows if r.note and not r.error]
    worst = worst_row(rows)
    if worst is not None:
        lines += ["", f"Worst efficiency: **{worst.name}** ({fmt(worst.efficiency, 2)})."]
    return "\n".join(lines) + "\n"


def worst_row(rows: list[Row]) -> Row | None:
    done = [r for r in rows if r.efficiency is not None]
    return min(done, key=lambda r: r.efficiency) if done else None  # type: ignore[arg-type, return-value]


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=("smoke", "cpu", "paper"), default="cpu")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per row (default: 5 on CPU, 20 on GPU)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the preset's")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder blocks (RunConfig.compile)"
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated subset: pretrain, svd, finetune, or baseline names (fixmatch/multimodal)",
    )
    p.add_argument(
        "--baselines",
        choices=("default", "all"),
        default="default",
        help="default: supervised, fixmatch (both ways), habit, siabc; all: every algorithm",
    )
    p.add_argument("--svd-images", type=int, default=None, help="pairs encoded by the SVD row (default: 512)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (a suffix is dropped)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    device = resolve_device(args.device)
    cfg = replace(
        cfg,
        device=str(device),
        compile=args.compile,
        precision=args.precision or (cfg.precision if device.type == "cuda" else "fp32"),
    )
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    steps = args.steps if args.steps is not None else (20 if gpu else 5)
    svd_n = args.svd_images or 512
    need = (warmup + steps + 2) * max(cfg.pretrain.batch_size, cfg.ssl.batch_size * (cfg.ssl.uratio + 1))
    bench = Bench(cfg, device, n_images=max(svd_n, min(need, 2048)))
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "preset": args.preset,
        "device": str(device),
        "precision": cfg.precision,
        "compile": cfg.compile,
        "warmup": warmup,
        "steps": steps,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
    }
    print(
        f"# preset {args.preset} on {device} ({meta['machine']['cpu']}, "
        f"{meta['machine']['threads']} threads, "
        f"precision {cfg.precision}); {warmup} warm-up + {steps} timed steps per row",
        flush=True,
    )
    names = BASELINES_ALL if args.baselines == "all" else BASELINES_DEFAULT
    plan: list[tuple[str, Callable[[], Row]]] = [
        ("pretrain", lambda: bench.measure(bench.pretrain_case(), warmup, steps)),
        ("svd", lambda: bench.svd_row(svd_n, reps=2 if not gpu else 3)),
        ("finetune", lambda: bench.measure(bench.finetune_case(), warmup, steps)),
    ]
    for spec in names:
        plan.append((spec, lambda spec=spec: bench.measure(bench.baseline_case(spec), warmup, steps)))
    only = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    for key, job in plan:
        if only is not None and key not in only:
            continue
        t = time.perf_counter()
        try:
            row = job()
        except Exception as err:  # a broken step is reported in its row; the others still run
            traceback.print_exc()
            row = Row(key, "", 0, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        rows.append(row)
        print(
            f"{row.name:<28} measured {fmt(row.measured):>9} | bound {fmt(row.bound):>9} | eff "
            f"{fmt(row.efficiency, 2):>5} | loader {fmt(row.loader):>9} | peak {fmt(row.peak_mb, 0):>7} MB "
            f"| {time.perf_counter() - t:.0f} s" + (f" | {row.error}" if row.error else ""),
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["wall_s"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        meta["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(table(rows))
    worst = worst_row(rows)
    if worst is not None:
        print(f"worst efficiency: {worst.name} ({fmt(worst.efficiency, 2)}); {meta['wall_s']:.0f} s in all")
    if args.out is not None:
        stem = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": [r.__dict__ for r in rows]}, indent=2) + "\n", encoding="utf-8"
        )
        stem.with_suffix(".md").write_text(markdown(rows, meta), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
