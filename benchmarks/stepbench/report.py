"""The report: one row per training step, the markdown table, the JSON and markdown files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    name: str
    unit: str
    samples: int
    measured: float | None = None  # samples/s of the real step
    bound: float | None = None  # samples/s of its encoder passes alone
    efficiency: float | None = None  # measured / bound
    loader: float | None = None
    loader_ratio: float | None = None
    peak_mb: float | None = None
    step_ms: float | None = None
    bound_ms: float | None = None
    flops_per_step: int | None = None  # model FLOPs of one real step (forward + backward), counted
    achieved_flops: float | None = None  # FLOP/s of the real step
    peak_flops: float | None = None  # FLOP/s of the matmul probe at the step's precision, interleaved
    mfu: float | None = None  # achieved / peak
    note: str = ""
    error: str | None = None
    profile: str | None = None

    def set_flops(self, flops_per_step: int, step_s: float, peak_s: float, peak_flops: int) -> None:
        self.flops_per_step = flops_per_step
        self.achieved_flops = flops_per_step / step_s
        self.peak_flops = peak_flops / peak_s
        self.mfu = self.achieved_flops / self.peak_flops

    @property
    def gflop_per_sample(self) -> float | None:
        return None if self.flops_per_step is None else self.flops_per_step / self.samples / 1e9


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def giga(x: float | None) -> float | None:
    return None if x is None else x / 1e9


def table(rows: list[Row]) -> str:
    head = (
        "| step | samples/step | measured samples/s | bound samples/s | efficiency | GFLOP/sample "
        "| achieved GFLOP/s | peak GFLOP/s | MFU | loader samples/s | loader / step | step ms | peak MB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.samples} {r.unit} | failed: {r.error} |" + " |" * 10)
            continue
        lines.append(
            f"| {r.name} | {r.samples} {r.unit} | {fmt(r.measured)} | {fmt(r.bound)} "
            f"| {fmt(r.efficiency, 2)} | {fmt(r.gflop_per_sample, 3)} | {fmt(giga(r.achieved_flops))} "
            f"| {fmt(giga(r.peak_flops))} | {fmt(r.mfu, 3)} "
            f"| {fmt(r.loader)} | {fmt(r.loader_ratio, 1)}x | {fmt(r.step_ms, 0)} | {fmt(r.peak_mb, 0)} |"
        )
    return head + "\n".join(lines) + "\n"


def summary_line(row: Row, seconds: float) -> str:
    """One progress line per finished row."""
    return (
        f"{row.name:<28} measured {fmt(row.measured):>9} | bound {fmt(row.bound):>9} | eff "
        f"{fmt(row.efficiency, 2):>5} | {fmt(giga(row.achieved_flops)):>7} GFLOP/s "
        f"| MFU {fmt(row.mfu, 3):>5} "
        f"| loader {fmt(row.loader):>9} | peak {fmt(row.peak_mb, 0):>7} MB | {seconds:.0f} s"
        + (f" | {row.error}" if row.error else "")
    )


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    pk = meta.get("matmul_peak", {})
    peak_text = ", ".join(
        f"{p} {fmt(giga(v['median']))} GFLOP/s (best {fmt(giga(v['best']))})" for p, v in pk.items()
    )
    lines = [
        f"# Step throughput, preset `{meta['preset']}` on {meta['device']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {m['cpu']} (torch CPU capability {m.get('cpu_capability')}, native bf16: "
        f"{m.get('cpu_native_bf16')}), {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
        f"GPU: {m['gpu'] or 'none'}; load average {m.get('load_average_start')} at the start, "
        f"{m.get('load_average_end')} at the end. Precision {meta['precision']}"
        + (f" (asked: {meta['precision_asked']})" if meta.get("precision_asked") != meta["precision"] else "")
        + f", compile {meta.get('compile')}, "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps per row (medians), "
        f"{meta['wall_s']:.0f} s in all.",
        "",
        f"Matmul peak ({meta.get('peak_size', 2048)}x{meta.get('peak_size', 2048)}, block at the start): "
        f"{peak_text}. The peak column is the same matmul at the step's precision, timed next to each step.",
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
    profiled = [r for r in rows if r.profile]
    if profiled:
        lines += ["", "## Profiles (one untimed step after the timed ones, top operators by self time)", ""]
        for r in profiled:
            lines += [f"### {r.name}", "", "```", r.profile.rstrip(), "```", ""]  # type: ignore[union-attr]
    return "\n".join(lines) + "\n"


def worst_row(rows: list[Row]) -> Row | None:
    done = [r for r in rows if r.efficiency is not None]
    return min(done, key=lambda r: r.efficiency) if done else None  # type: ignore[arg-type, return-value]


def write(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    """OUT.json and OUT.md (a .json / .md suffix of ``out`` is dropped)."""
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [{**asdict(r), "gflop_per_sample": r.gflop_per_sample} for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(rows, meta), encoding="utf-8")
