"""The one training loop shared by pre-training, fine-tuning and every baseline.

A method is an ``nn.Module`` whose ``forward(batch, info)`` returns ``(loss, logs)``; it may also define
``after_step()`` (momentum encoders, queues), ``extra_state()`` / ``load_extra_state()`` (state outside
the parameters, e.g. a baseline's class-wise thresholds) and is fed by a ``batches(epoch)`` iterator.
The loop owns optimisation, the learning-rate schedule, the evaluated EMA copy, validation-based
selection, checkpoints (each epoch, atomic) and resumption. All randomness of an epoch is derived from
(seed, stage, epoch), and the RNG states are checkpointed, so a resumed run on CPU reproduces an
uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mics.engine import distributed as dist
from mics.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mics.engine.logging import MetricsLogger, info, progress


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class StepInfo:
    epoch: int
    step: int  # global optimiser step, 0-based
    total_steps: int
    epoch_progress: float  # fraction of the current epoch done, in [0, 1)
    generator: torch.Generator  # the epoch's generator: augmentation, masking, sampling


@dataclass(frozen=True)
class Schedule:
    epochs: int
    steps_per_epoch: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_steps: int
    ema: float | None = None  # decay of the evaluated EMA copy; None = evaluate the online weights

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class TrainMethod(Protocol):
    def __call__(self, batch: Any, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]: ...


BatchFn = Callable[[int, torch.Generator], Iterator[Any]]
EvalFn = Callable[[nn.Module], dict[str, float]]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; ``cuda`` under torchrun picks the local rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        return torch.device("cuda", dist.local_rank())
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across runs and processes (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cosine_lr(step: int, schedule: Schedule) -> float:
    """Linear warm-up to ``lr`` then half-cosine decay to ``min_lr`` at the last step."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    span = max(1, schedule.total_steps - schedule.warmup_steps)
    t = min(1.0, (step - schedule.warmup_steps) / span)
    return schedule.min_lr + 0.5 * (schedule.lr - schedule.min_lr) * (1 + math.cos(math.pi * t))


def build_optimizer(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    device: torch.device,
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings (1-D or named so).

    ``lr_scale(name)``: a factor on the learning rate of parameter ``name`` (e.g. new heads on pre-trained
    encoders); each param group keeps its factor as ``"lr_scale"`` and :func:`fit` applies it every step."""
    groups_by_key: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token", "temp"))
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"lr scale of {name} must be a positive number, got {scale}")
        groups_by_key.setdefault((no_decay, scale), []).append(p)
    keys = sorted(groups_by_key, key=lambda k: (k[1], k[0]))
    groups = [
        {"params": groups_by_key[k], "weight_decay": 0.0 if k[0] else weight_decay, "lr_scale": k[1]}
        for k in keys
    ]
    # the fused kernel updates every tensor in one pass; on CPU it is also 3x faster than the default
    # per-tensor loop for the small ViTs of the cpu preset (benchmarks/README.md)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` every repeated block of ``module`` in place (each element of an ``nn.ModuleList``:
    the transformer blocks of the encoders, decoder and fusion encoder, where nearly all FLOPs are).

    Compiling the blocks rather than the whole method keeps the Python side effects of a step (momentum
    updates, queues, a baseline's state) out of the graph, and identical blocks share one compiled graph,
    so compilation takes seconds instead of minutes. Parameter names, and so checkpoints, are unchanged.
    Returns the number of blocks compiled.
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                block.compile()
                count += 1
    return count


class EMAModel:
    """Exponential moving average of a module's parameters and buffers, used for evaluation."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int, decay: float | None = None) -> None:
        """``decay`` overrides the configured one for this step (a method may adapt it, e.g. HABIT)."""
        # the usual warm-up of the decay lets early evaluations reflect training instead of the random init
        d = min(self.decay if decay is None else decay, (1 + step) / (10 + step))
        ema_p: list[torch.Tensor] = list(self.module.parameters())
        src_p = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), module.buffers(), strict=True):
            b_ema.copy_(b)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX tiles or AVX512-BF16), where bf16
    autocast can be faster than float32; elsewhere torch emulates bf16 and it only costs conversions."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run computes in: ``fp32`` and ``bf16`` as asked; ``auto`` is bf16 where the device
    computes it natively (CUDA with bf16 support, a CPU with AMX or AVX512-BF16) and fp32 elsewhere."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_native_bf16() else "fp32"
    return "fp32"


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast for ``bf16`` (and ``auto`` where it resolves to bf16) on CUDA and CPU, else nothing."""
    if resolve_precision(precision, device) == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class FitResult:
    best_score: float | None
    best_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)


def wrap_ddp(method: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP around ``method``: gradients averaged over ranks, buffers synchronised once at the start only."""
    options: dict[str, Any] = {
        "device_ids": [device.index] if device.type == "cuda" else None,
        "find_unused_parameters": bool(getattr(method, "find_unused_parameters", False)),
    }
    # newer torch splits the old flag in two: keep the sync at construction, skip the one before each forward
    ddp_args = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    options["forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(method, **options)


CHECK_EVERY = 10  # steps between reads of the non-finite-loss flag (each read waits for the accelerator)


def _raise_if_non_finite(first_bad: torch.Tensor, stage: str, schedule: Schedule) -> None:
    """Raise :class:`NonFiniteLossError` if any rank saw a non-finite loss (all ranks raise together)."""
    bad = int(dist.all_reduce_max(first_bad))
    if bad >= 0:
        epoch = bad // schedule.steps_per_epoch
        raise NonFiniteLossError(
            f"[{stage}] the loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}; "
            "the last good checkpoint is kept. Lower the learning rate or check the input images."
        )


def _epoch_means(sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """Mean of each logged value over the epoch's steps and over the ranks: one all-reduce for all keys
    (sorted, so that every rank reduces them in the same order)."""
    keys = sorted(sums)
    if dist.is_distributed():
        seen = dist.all_gather_object(keys)
        if any(k != keys for k in seen):
            raise RuntimeError(
                f"ranks logged different values this epoch: {seen}; every rank must log the same keys"
            )
    if not keys:
        return {}
    means = dist.all_reduce_mean(torch.stack([sums[k].reshape(()) for k in keys]) / max(n, 1))
    return dict(zip(keys, means.tolist(), strict=True))


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def fit(
    method: nn.Module,
    batches: BatchFn,
    schedule: Schedule,
    *,
    stage: str,
    seed: int,
    device: torch.device,
    ckpt_dir: Path | None,
    logger: MetricsLogger,
    evaluate: EvalFn | None = None,
    eval_every: int = 1,
    precision: str = "fp32",
    resume: bool = False,
    extra: Any = None,
    compile: bool = False,
    compile_devices: tuple[str, ...] = ("cuda", "cpu"),
) -> FitResult:
    """Train ``method`` for ``schedule``; returns the best validation score (``evaluate`` must return
    ``{"score": ...}``, higher is better) and restores the selected weights into ``method`` (the EMA
    copy's when ``schedule.ema`` is set).

    A method may define ``lr_scale(name) -> float``, a factor on the learning rate of each parameter
    (:func:`build_optimizer`). ``extra`` is any object with ``state_dict()`` / ``load_state_dict()``
    checkpointed with the model.
    Checkpoints: ``<ckpt_dir>/last`` each epoch (for ``resume``) and ``<ckpt_dir>/best`` on a new best.
    ``compile``: ``torch.compile`` the method's transformer blocks (:func:`compile_blocks`) when the device
    type is in ``compile_devices``. On CPU it pays back only with native bf16 (AMX): on an AVX512 CPU without
    it, compiled fp32 blocks ran no faster than eager (``benchmarks/results/cpu-candidates-1thread.md``).

    Under ``torchrun`` the method is wrapped in DDP. A method whose forward leaves some trainable
    parameters without a gradient must say so with a ``find_unused_parameters = True`` attribute.
    Buffers are not broadcast: every buffer of the package's methods is either constant or kept identical
    on every rank by the method itself (the feature queues all-gather), so the per-step broadcast from
    rank 0 would only cost time.
    """
    method.to(device)
    asked, precision = precision, resolve_precision(precision, device)
    if asked != precision:
        info(f"[{stage}] precision {asked}: {precision} on {device}")
    optimizer = build_optimizer(
        method, schedule.lr, schedule.weight_decay, device, getattr(method, "lr_scale", None)
    )
    ema = EMAModel(method, schedule.ema) if schedule.ema is not None else None
    # after the EMA copy: a deep copy of a compiled module would call the original's compiled forward
    if compile and device.type in compile_devices:
        info(f"[{stage}] torch.compile: {compile_blocks(method)} blocks")
    train_module: nn.Module = method
    if dist.is_distributed():
        train_module = wrap_ddp(method, device)
    result = FitResult(best_score=None, best_epoch=None)
    start_epoch = 0
    if resume and ckpt_dir is not None and (Path(ckpt_dir) / "last.json").exists():
        state, meta = load_checkpoint(Path(ckpt_dir) / "last", map_location=device)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        if extra is not None and "extra" in state:
            extra.load_state_dict(state["extra"])
        set_rng_state(state["rng"])
        start_epoch = int(meta["epoch"]) + 1
        result = FitResult(meta.get("best_score"), meta.get("best_epoch"), list(meta.get("history", [])))
        info(f"[{stage}] resuming after epoch {start_epoch} of {schedule.epochs}")
    total = schedule.total_steps
    bar = progress(total=total, desc=stage, initial=start_epoch * schedule.steps_per_epoch)
    for epoch in range(start_epoch, schedule.epochs):
        train_module.train()
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, stage, epoch, dist.rank()))
        seed_all(derive_seed(seed, stage, "global", epoch, dist.rank()))
        sums: dict[str, torch.Tensor] = {}
        n = 0
        # step of the first non-finite loss, -1 while all are finite; kept on the device and read only every
        # CHECK_EVERY steps and before any checkpoint, because reading it waits for the accelerator
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        after = getattr(method, "after_step", None)
        for i, batch in enumerate(batches(epoch, generator)):
            step = epoch * schedule.steps_per_epoch + i
            lr = cosine_lr(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            step_info = StepInfo(epoch, step, total, i / schedule.steps_per_epoch, generator)
            with autocast_context(device, precision):
                loss, logs = train_module(batch, step_info)
            loss_value = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_value), step, first_bad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after is not None:
                after(step_info)
            if ema is not None:
                adapt = getattr(method, "ema_decay", None)
                ema.update(method, step, adapt(ema.decay, ema.module) if adapt is not None else None)
            # summed as tensors: a float() per step would wait for the accelerator every step
            for k, v in {"loss": loss_value, **logs}.items():
                v = torch.as_tensor(v, device=device).detach().float()
                sums[k] = sums[k] + v if k in sums else v
            n += 1
            bar.update(1)
            if i % CHECK_EVERY == 0:
                _raise_if_non_finite(first_bad, stage, schedule)
                bar.set_postfix(loss=f"{float(sums['loss']) / n:.3f}", epoch=epoch + 1, refresh=False)
        _raise_if_non_finite(first_bad, stage, schedule)
        epoch_logs = _epoch_means(sums, n)
        epoch_logs["lr"] = lr if n else 0.0
        record: dict[str, float] = {"epoch": epoch + 1, **epoch_logs}
        if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == schedule.epochs):
            scored = evaluate(ema.module if ema is not None else method)
            record.update({f"val_{k}": v for k, v in scored.items()})
            if result.best_score is None or scored["score"] > result.best_score:
                result.best_score, result.best_epoch = scored["score"], epoch + 1
                if ckpt_dir is not None and dist.is_main():
                    weights = ema.module if ema is not None else method
                    save_checkpoint(
                        Path(ckpt_dir) / "best",
                        {"model": weights.state_dict()},
                        info={"epoch": epoch + 1, "score": scored["score"]},
                    )
        result.history.append(record)
        if ckpt_dir is not None and dist.is_main():
            state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            if extra is not None:
                state["extra"] = extra.state_dict()
            save_checkpoint(
                Path(ckpt_dir) / "last",
                state,
                info={
                    "epoch": epoch,
                    "best_score": result.best_score,
                    "best_epoch": result.best_epoch,
                    "history": result.history,
                    "stage": stage,
                },
            )
        # logged once the epoch is checkpointed: a run killed in between repeats the epoch, not its record
        logger.log(stage, (epoch + 1) * schedule.steps_per_epoch, record)
        dist.barrier()
    bar.close()
    if evaluate is not None and ckpt_dir is not None and (Path(ckpt_dir) / "best.json").exists():
        state, _ = load_checkpoint(Path(ckpt_dir) / "best", map_location=device)
        method.load_state_dict(state["model"])
    elif ema is not None:
        method.load_state_dict(ema.module.state_dict())
    return result
