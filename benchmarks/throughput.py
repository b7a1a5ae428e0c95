"""Throughput of every training step of the package, against the bound of its encoder passes and against
the machine's matmul peak.

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
* model FLOPs per sample (forward + backward of one real step, counted by ``torch.utils.flop_counter``),
  achieved FLOP/s, and MFU = achieved / the FLOP/s of a 2048x2048 matmul at the step's precision, timed
  next to each step;
* loader: samples/s of the batch function alone (batch construction + augmentation);
* peak memory: ``torch.cuda.max_memory_allocated`` of the real steps on CUDA, the process' peak resident set
  (VmHWM, reset before the timed steps) on CPU.

Images are random uint8 arrays of the preset's size: the step costs do not depend on the pixel values.
Warm-up steps are excluded from every number. The pieces live in ``benchmarks/stepbench``: ``measure``
(timing, memory, FLOPs, peak), ``cases`` (the steps and their bounds) and ``report`` (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import mics.engine.train
import mics.methods.svd
from mics.config import preset
from mics.engine.train import resolve_device, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepbench.cases import BASELINES_ALL, BASELINES_DEFAULT, Bench  # noqa: E402
from stepbench.measure import PEAK_SIZE, machine, peaks  # noqa: E402
from stepbench.report import Row, fmt, summary_line, table, worst_row, write  # noqa: E402


def _quiet(iterable: Any = None, **kwargs: Any) -> Any:
    return tqdm(iterable, total=kwargs.get("total"), disable=True)


# the stages' progress bars would interleave with the table
mics.engine.train.progress = _quiet  # type: ignore[assignment]
mics.methods.svd.progress = _quiet  # type: ignore[assignment]


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
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default=None,
        help="default: the preset's on CUDA, fp32 elsewhere; auto: bf16 where the device has it natively",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder blocks (RunConfig.compile), on CPU too",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one extra, untimed step per row (torch.profiler, top operators in OUT.md)",
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
    asked = args.precision or (cfg.precision if device.type == "cuda" else "fp32")
    cfg = replace(cfg, device=str(device), compile=args.compile, precision=resolve_precision(asked, device))
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
        "precision_asked": asked,
        "compile": cfg.compile,
        "warmup": warmup,
        "steps": steps,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "peak_size": PEAK_SIZE,
        "matmul_peak": peaks(device),
    }
    pk = meta["matmul_peak"]
    print(
        f"# matmul {PEAK_SIZE}x{PEAK_SIZE}: fp32 {pk['fp32']['median'] / 1e9:,.1f} GFLOP/s, "
        f"bf16 {pk['bf16']['median'] / 1e9:,.1f} GFLOP/s",
        flush=True,
    )
    print(
        f"# preset {args.preset} on {device} ({meta['machine']['cpu']}, "
        f"{meta['machine']['threads']} threads, "
        f"precision {cfg.precision}); {warmup} warm-up + {steps} timed steps per row",
        flush=True,
    )
    names = BASELINES_ALL if args.baselines == "all" else BASELINES_DEFAULT
    plan: list[tuple[str, Callable[[], Row]]] = [
        ("pretrain", lambda: bench.measure(bench.pretrain_case(), warmup, steps, args.profile)),
        ("svd", lambda: bench.svd_row(svd_n, reps=2 if not gpu else 3)),
        ("finetune", lambda: bench.measure(bench.finetune_case(), warmup, steps, args.profile)),
    ]
    for spec in names:
        plan.append(
            (spec, lambda spec=spec: bench.measure(bench.baseline_case(spec), warmup, steps, args.profile))
        )
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
        print(summary_line(row, time.perf_counter() - t), flush=True)
        if row.profile:
            print(row.profile, flush=True)
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
        write(args.out, rows, meta)
    return rows


if __name__ == "__main__":
    main()
