"""Measuring: the machine, timers that interleave real steps with their bounds, peak memory, FLOP counting
and the matmul peak the model FLOP utilisation (MFU) is measured against."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mics.data.views import to_float
from mics.engine.train import BatchFn, StepInfo, autocast_context, cpu_native_bf16

PEAK_SIZE = 2048  # side of the square matmul that measures the machine's peak


def machine() -> dict[str, Any]:
    """Cores, CPU model and bf16 support, torch version and threads, GPU: what a reader needs to compare
    numbers."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


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


# ------------------------------------------------------------------------------------------ matmul peak


class MatmulPeak:
    """One square matmul at a precision: the yardstick of MFU. fp32 multiplies float32 tensors, bf16
    bfloat16 tensors (no autocast, no TF32 change: whatever the process uses, the steps use too)."""

    def __init__(self, device: torch.device, precision: str, size: int = PEAK_SIZE) -> None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        self.flops = 2 * size**3
        self.device = device

    def __call__(self) -> None:
        torch.mm(self.a, self.b)

    def flops_per_s(self, reps: int = 5) -> list[float]:
        """FLOP/s of ``reps`` single matmuls after one warm-up (on GPU: blocks of 10 back to back)."""
        inner = 10 if self.device.type == "cuda" else 1
        self()
        out = []
        for _ in range(reps):
            synchronize(self.device)
            t = time.perf_counter()
            for _ in range(inner):
                self()
            synchronize(self.device)
            out.append(inner * self.flops / (time.perf_counter() - t))
        return out


def peaks(device: torch.device, reps: int = 5) -> dict[str, dict[str, float]]:
    """Median and best matmul FLOP/s in fp32 and bf16 (a block at the start of a run)."""
    out = {}
    for precision in ("fp32", "bf16"):
        rates = MatmulPeak(device, precision).flops_per_s(reps)
        out[precision] = {"median": statistics.median(rates), "best": max(rates)}
    return out


# ------------------------------------------------------------------------------------------ FLOP counting


def count_step_flops(model: nn.Module, batches: BatchFn, device: torch.device, precision: str) -> int:
    """Model FLOPs of one training step, forward + backward, as ``torch.utils.flop_counter`` counts them
    (matrix products, convolutions and attention; element-wise work is not counted, as usual for MFU).

    Runs on a deep copy of the freshly built module, in eager mode, so the real module's state (queues,
    running statistics, the recorded backbone calls) and any later compilation are untouched."""
    clone = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(2)
    batch = next(iter(batches(0, generator)))
    info = StepInfo(0, 0, 1, 0.0, generator)
    with FlopCounterMode(display=False) as counter:
        with autocast_context(device, precision):
            loss, _ = clone(batch, info)
        loss.backward()
    return int(counter.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timings:
    real: list[float] = field(default_factory=list)  # seconds per real step
    bound: list[float] = field(default_factory=list)  # seconds per bound pass
    loader: list[float] = field(default_factory=list)  # seconds per batch of the batch function alone
    peak: list[float] = field(default_factory=list)  # seconds per matmul of the peak probe


class StepTimer:
    """Wraps a batch function for ``fit`` and times the steps it feeds (warm-up steps excluded).

    ``interleave=True`` (CPU): before each timed step's batch is built, the previous step's timing is closed,
    then one bound pass runs, one batch is built by a second, independent copy of the batch function
    (the loader alone) and one matmul of the peak probe runs, so real steps, bound passes, loader batches
    and the peak alternate and a machine shared with other jobs slows all four alike. A real step's time
    runs from there to the request of the next batch: batch construction + forward + backward + optimiser
    step + after-step hooks + logging.

    ``interleave=False`` (accelerators): the timed steps run back to back between two synchronisations,
    as in training, so the host may queue work ahead of the device; the bound, the loader and the peak
    are timed in blocks after the steps.

    ``profile=True`` adds one untimed step after the timed ones, run under ``torch.profiler``
    (``self.profiler`` afterwards).
    """

    def __init__(
        self,
        inner: BatchFn,
        warmup: int,
        steps: int,
        device: torch.device,
        bound: Callable[[], None],
        probe: MatmulPeak,
        memory: PeakMemory,
        interleave: bool,
        profile: bool = False,
    ) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(
                "need at least one warm-up step (it records the bound's passes) and one timed step"
            )
        self.inner, self.warmup, self.steps, self.device = inner, warmup, steps, device
        self.bound, self.probe, self.memory, self.interleave = bound, probe, memory, interleave
        self.profile = profile
        self.profiler: Any = None
        self.timings = Timings()
        self.loader = cycle_batches(inner, torch.Generator().manual_seed(1))

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + int(self.profile)

    def load_one(self) -> None:
        next(self.loader)

    def _timed(self, fn: Callable[[], Any]) -> float:
        synchronize(self.device)
        t = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - t

    def __call__(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        source = cycle_batches(self.inner, generator)
        started: float | None = None
        end = self.warmup + self.steps

        def close() -> None:
            synchronize(self.device)
            if started is not None:
                elapsed = time.perf_counter() - started
                self.timings.real.append(elapsed if self.interleave else elapsed / self.steps)
                self.memory.record()

        for i in range(self.total_steps):
            if i == end:  # the profiled step: untimed
                close()
                started = None
                self.profiler = torch.profiler.profile(activities=_activities(self.device))
                self.profiler.__enter__()
            elif i >= self.warmup and (self.interleave or i == self.warmup):
                close()
                if self.interleave:
                    if i == self.warmup:  # warm-up of the bound, the loader and the probe
                        self.bound()
                        self.load_one()
                        self.probe()
                    self.timings.bound.append(self._timed(self.bound))
                    self.timings.loader.append(self._timed(self.load_one))
                    self.timings.peak.append(self._timed(self.probe))
                self.memory.reset()
                started = time.perf_counter()
            yield next(source)
        if self.profiler is not None:
            synchronize(self.device)
            self.profiler.__exit__(None, None, None)
        else:
            close()
        if not self.interleave:
            self.timings.bound.append(block_time(self.bound, self.device, self.steps))
            self.timings.loader.append(block_time(self.load_one, self.device, self.steps))
            self.timings.peak.append(block_time(self.probe, self.device, self.steps))


def _activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def profile_table(profiler: Any, device: torch.device, rows: int = 15) -> str:
    """The top operators of a profiled step by self time."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return str(profiler.key_averages().table(sort_by=key, row_limit=rows))


def cycle_batches(inner: BatchFn, generator: torch.Generator) -> Iterator[Any]:
    """The batch function's epochs one after the other, so a short data set never runs dry."""
    return itertools.chain.from_iterable(inner(epoch, generator) for epoch in itertools.count())


@contextlib.contextmanager
def grads_stashed(module: nn.Module) -> Iterator[None]:
    """Run a bound pass without touching the gradients the real step left behind (their memory stays
    allocated as in a real run, and the bound's own gradients are dropped afterwards)."""
    params = [p for p in module.parameters() if p.requires_grad]
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, stash, strict=True):
            p.grad = g


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, 3, size, size] noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def random_inputs(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Normalised float images as the encoders see them."""
    return to_float(torch.randint(0, 256, shape, dtype=torch.uint8).to(device))


def median_time(fn: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
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


def block_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls made back to back between two synchronisations (the device
    may queue ahead, as in training), after one warm-up call."""
    fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / reps
