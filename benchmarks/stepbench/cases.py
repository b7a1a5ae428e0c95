"""The training steps measured: how each is built on random arrays, what its encoder bound is, and the
measurement of one step (``Bench.measure``) or of the SVD construction pass (``Bench.svd_row``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from mics.config import RunConfig
from mics.data.views import to_float
from mics.engine.logging import MetricsLogger
from mics.engine.train import BatchFn, Schedule, autocast_context, fit
from mics.methods.baseline import SSLTraining, ssl_batches
from mics.methods.finetune import FusionFinetuning, labelled_batches
from mics.methods.pretrain import SynergisticPretraining, pair_batches
from mics.methods.ssl import build_algorithm
from mics.methods.svd import build_dictionary, encode_features
from mics.pipeline import build_finetune_model

from .measure import (
    MatmulPeak,
    PeakMemory,
    StepTimer,
    count_flops,
    count_step_flops,
    grads_stashed,
    median_time,
    profile_table,
    random_images,
    random_inputs,
    synchronize,
)
from .report import Row

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
            recorder.attach(model.backbone)
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
        # encode_features runs in float32 whatever the precision: so does its yardstick
        probe = MatmulPeak(self.device, "fp32")
        flops = count_flops(bound)
        real()  # warm-up
        probe()
        bound_t, enc_t, km_t, peak_t = [], [], [], []
        memory.reset()
        for _ in range(reps):
            synchronize(self.device)
            t = time.perf_counter()
            bound()
            synchronize(self.device)
            t_probe = time.perf_counter()
            bound_t.append(t_probe - t)
            probe()
            synchronize(self.device)
            peak_t.append(time.perf_counter() - t_probe)
            e, k = real()
            enc_t.append(e)
            km_t.append(k)
        memory.record()
        loader_t = median_time(
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
        row.set_flops(flops, real_s, statistics.median(peak_t), probe.flops)
        row.note = (
            f"whole pass over {n} pairs, both modalities; encode {1000 * statistics.median(enc_t):.0f} ms "
            f"+ k-means/shifts {1000 * statistics.median(km_t):.0f} ms; bound: 2 encoder fwd (eval, no grad)"
        )
        return row

    # running -----------------------------------------------------------------------------------------------

    def measure(self, case: Case, warmup: int, steps: int, profile: bool = False) -> Row:
        row = Row(case.name, case.unit, case.samples, note=case.note)
        torch.manual_seed(self.seed)
        model, batches, schedule, extra = case.build(warmup + steps + int(profile))
        model.to(self.device)
        # before the bound is made: a baseline's bound records the backbone calls of the real steps
        flops = count_step_flops(model, batches, self.device, self.cfg.precision)
        memory = PeakMemory(self.device)
        probe = MatmulPeak(self.device, self.cfg.precision)
        timer = StepTimer(
            batches,
            warmup,
            steps,
            self.device,
            case.bound(model),
            probe,
            memory,
            interleave=self.device.type == "cpu",
            profile=profile,
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
            compile_devices=("cuda", "cpu"),
        )
        real_s, bound_s = statistics.median(timer.timings.real), statistics.median(timer.timings.bound)
        row.step_ms, row.bound_ms = 1000 * real_s, 1000 * bound_s
        row.measured, row.bound = case.samples / real_s, case.samples / bound_s
        row.efficiency = bound_s / real_s
        loader_s = statistics.median(timer.timings.loader)
        row.loader = case.samples / loader_s
        row.loader_ratio = real_s / loader_s
        row.peak_mb = memory.peak / 2**20
        row.set_flops(flops, real_s, statistics.median(timer.timings.peak), probe.flops)
        if timer.profiler is not None:
            row.profile = profile_table(timer.profiler, self.device)
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
