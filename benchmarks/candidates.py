"""Interleaved A/B of ways to run the two encoders' training passes faster on CPU, at a preset's shapes.

    python benchmarks/candidates.py --preset cpu --rounds 7 --out benchmarks/results/cpu-candidates

One unit of work is what every MICS step is built of: the WLI and the NBI encoder (separate weights), each
forward + backward on a batch of the preset's pre-training size. Each round runs every variant once, in
turn, together with one 2048x2048 fp32 matmul (the peak), so a machine shared with other jobs slows all of
them alike; the table gives the median time of each variant, its speed-up over eager fp32, its FLOP/s and
its MFU against the fp32 matmul peak, and how far its outputs and gradients are from eager fp32's.

Variants (``--only`` picks some):
  eager            the encoders as they run today (timm blocks, fused scaled_dot_product_attention)
  unfused-attn     timm's explicit softmax(q k^T) v attention instead (what fused_attn=False would cost)
  compile-blocks   torch.compile of each transformer block (RunConfig.compile, engine.train.compile_blocks)
  compile-encoder  torch.compile of each whole encoder forward
  vmap             both encoders as one call: weights stacked (torch.func.stack_module_state) and vmapped
  bf16             bf16 autocast, eager
  bf16-compile     bf16 autocast + compiled blocks
  threads-1        eager on one thread (torch.set_num_threads(1)) instead of the process' default
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mics.config import preset
from mics.engine.train import compile_blocks, cpu_native_bf16
from mics.methods.pretrain import build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepbench.measure import MatmulPeak, count_flops, machine, random_inputs  # noqa: E402

VARIANTS = (
    "eager",
    "unfused-attn",
    "compile-blocks",
    "compile-encoder",
    "vmap",
    "bf16",
    "bf16-compile",
    "threads-1",
)


class Pair:
    """Two encoders and their inputs; ``step()`` runs forward + backward of both and returns the outputs."""

    def __init__(self, encoders: list[nn.Module], inputs: list[torch.Tensor], bf16: bool = False) -> None:
        self.encoders, self.inputs, self.bf16 = encoders, inputs, bf16

    def forward(self) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return [enc(x) for enc, x in zip(self.encoders, self.inputs, strict=True)]

    def step(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for enc in self.encoders:
            enc.zero_grad(set_to_none=True)
        outs = self.forward()
        sum(o.float().square().mean() for o in outs).backward()  # type: ignore[union-attr]
        grads = [p.grad for enc in self.encoders for p in enc.parameters()]
        return [o.detach() for o in outs], [g for g in grads if g is not None]


class StackedPair(Pair):
    """The two encoders as one vmapped call over stacked weights (what batching WLI and NBI would mean)."""

    def __init__(self, encoders: list[nn.Module], inputs: list[torch.Tensor]) -> None:
        super().__init__(encoders, inputs)
        params, buffers = torch.func.stack_module_state(encoders)  # type: ignore[arg-type]
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(encoders[0]).to("meta")
        self.x = torch.stack(inputs)

    def forward(self) -> list[torch.Tensor]:
        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, (p, b), (x,))

        out = torch.vmap(one, randomness="different")(self.params, self.buffers, self.x)
        return list(out.unbind(0))

    def step(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for p in self.params.values():
            p.grad = None
        outs = self.forward()
        sum(o.float().square().mean() for o in outs).backward()  # type: ignore[union-attr]
        # in the encoders' parameter order, encoder by encoder, to compare with the eager gradients
        names = [n for n, _ in self.encoders[0].named_parameters()]
        grads = [self.params[n].grad[i] for i in range(len(self.encoders)) for n in names]  # type: ignore[index]
        return [o.detach() for o in outs], grads


def with_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def build(name: str, base: list[nn.Module], inputs: list[torch.Tensor]) -> Callable[[], Any]:
    encoders = [copy.deepcopy(e) for e in base]
    if name in ("eager", "threads-1", "bf16"):
        pair = Pair(encoders, inputs, bf16=name == "bf16")
        return with_threads(1, pair.step) if name == "threads-1" else pair.step
    if name == "unfused-attn":
        for enc in encoders:
            for m in enc.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        return Pair(encoders, inputs).step
    if name in ("compile-blocks", "bf16-compile"):
        for enc in encoders:
            compile_blocks(enc)
        return Pair(encoders, inputs, bf16=name == "bf16-compile").step
    if name == "compile-encoder":
        for enc in encoders:
            enc.compile()
        return Pair(encoders, inputs).step
    if name == "vmap":
        return StackedPair(encoders, inputs).step
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| / max|a| over the tensors (a relative error per tensor, worst one)."""
    return max(
        float((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-12))
        for x, y in zip(a, b, strict=True)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("smoke", "cpu"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="images per encoder (default: pre-training batch)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every variant once)")
    p.add_argument("--only", default=None, help="comma-separated variants (eager is always included)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    device = torch.device("cpu")
    batch = args.batch or cfg.pretrain.batch_size
    names = ["eager"] + [n for n in (args.only.split(",") if args.only else VARIANTS) if n != "eager"]
    torch.manual_seed(0)
    base = [build_encoder(cfg.model, cfg.data.image_size) for _ in range(2)]
    shape = (batch, 3, cfg.data.image_size, cfg.data.image_size)
    inputs = [random_inputs(shape, device) for _ in range(2)]
    flops = count_flops(Pair([copy.deepcopy(e) for e in base], inputs).step)
    peak = MatmulPeak(device, "fp32")
    steps = {n: build(n, base, inputs) for n in names}
    print(
        f"# {machine()['cpu']}, {torch.get_num_threads()} threads, native bf16 {cpu_native_bf16()}, "
        f"load {os.getloadavg()}",
        flush=True,
    )
    reference = steps["eager"]()
    diffs, warm_s = {}, {}
    for n in names:  # warm-up (compilation) and the distance from eager fp32
        t = time.perf_counter()
        outs, grads = steps[n]()
        warm_s[n] = time.perf_counter() - t
        diffs[n] = (max_rel_diff(reference[0], outs), max_rel_diff(reference[1], grads))
        print(
            f"{n:<16} warm-up {warm_s[n]:.1f} s, output diff {diffs[n][0]:.1e}, grad diff {diffs[n][1]:.1e}",
            flush=True,
        )
    times: dict[str, list[float]] = {n: [] for n in names}
    peak_t: list[float] = []
    load_start = os.getloadavg()
    peak()
    for r in range(args.rounds):
        t = time.perf_counter()
        peak()
        peak_t.append(time.perf_counter() - t)
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {1000 * times[n][-1]:.0f} ms" for n in names), flush=True)
    peak_flops = peak.flops / statistics.median(peak_t)
    eager = statistics.median(times["eager"])
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append(
            {
                "variant": n,
                "median_ms": 1000 * med,
                "min_ms": 1000 * min(times[n]),
                "speedup": eager / med,
                "gflops": flops / med / 1e9,
                "mfu_fp32": flops / med / peak_flops,
                "warmup_s": warm_s[n],
                "output_rel_diff": diffs[n][0],
                "grad_rel_diff": diffs[n][1],
            }
        )
    meta = {
        "command": "python benchmarks/candidates.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "cpu_native_bf16": cpu_native_bf16(),
        "batch_per_encoder": batch,
        "rounds": args.rounds,
        "flops_per_unit": flops,
        "fp32_matmul_gflops": peak_flops / 1e9,
        "load_average_rounds_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    text = render(rows, meta)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return {"meta": meta, "rows": rows}


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Encoder-pass candidates on CPU (interleaved A/B)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, native bf16: "
        f"{meta['cpu_native_bf16']}; load average {meta['load_average_rounds_start']} when the timed rounds "
        f"started, {meta['load_average_end']} at the end. Unit: WLI + NBI encoder, forward + backward, "
        f"{meta['batch_per_encoder']} images each, {meta['flops_per_unit'] / 1e9:.1f} GFLOP (counted); fp32 "
        f"matmul peak {meta['fp32_matmul_gflops']:.1f} GFLOP/s (2048x2048, median over the rounds); "
        f"{meta['rounds']} rounds, medians.",
        "",
        "| variant | median ms | min ms | speed-up vs eager | GFLOP/s | MFU (fp32 peak) | warm-up s "
        "| output rel. diff | grad rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['speedup']:.2f}x "
            f"| {r['gflops']:.1f} | {r['mfu_fp32']:.3f} | {r['warmup_s']:.1f} "
            f"| {r['output_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
