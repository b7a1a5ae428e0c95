"""Run reports: a results table on the terminal, ``report.md`` and ``report.json`` in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mics.engine.checkpoint import atomic_write_json, atomic_write_text

METRICS = ("top1", "balanced_accuracy", "macro_f1")


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline test metrics of one run's ``metrics.json``."""
    return {k: float(metrics["test"][k]) for k in METRICS}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    best = {k: max(r[k] for r in results.values()) for k in METRICS}
    lines = ["| method | top-1 | balanced accuracy | macro-F1 |", "| --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        cells = [
            f"**{100 * r[k]:.2f}**" if r[k] == best[k] and len(results) > 1 else f"{100 * r[k]:.2f}"
            for k in METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, runs: dict[str, dict[str, Any]], meta: dict[str, Any], command: str) -> dict:
    """``runs`` maps a method name to its ``metrics.json`` content. Writes report.md and report.json."""
    results = {name: summary(m) for name, m in runs.items()}
    report = {
        "results": results,
        "labels": meta.get("labels"),
        "seed": meta.get("seed"),
        "data": meta.get("data"),
        "classes": meta.get("classes"),
        "preset": meta.get("preset"),
        "n_train": meta.get("n_train"),
        "n_labelled": meta.get("n_labelled"),
        "n_test": meta.get("n_test"),
        "wall_s": {name: m.get("wall_s") for name, m in runs.items()},
        "command": command,
        "git_commit": meta.get("git_commit"),
        "machine": meta.get("machine"),
    }
    extra = {
        name: m["test"].get("mean_uncertainty") for name, m in runs.items() if "mean_uncertainty" in m["test"]
    }
    if extra:
        report["mean_test_uncertainty"] = extra
    atomic_write_json(Path(run_dir) / "report.json", report)
    classes = list(meta.get("classes") or [])
    lines = [
        "# MICS run report",
        "",
        f"Data: `{meta.get('data')}` ({len(classes)} classes: {', '.join(classes)})",
        f"Labelled: {meta.get('n_labelled')} of {meta.get('n_train')} training images "
        f"({100 * float(meta.get('labels') or 0):g} %), seed {meta.get('seed')}, "
        f"preset `{meta.get('preset')}`.",
        f"Test images: {meta.get('n_test')} (evaluated once, after model selection on val).",
        "",
        "Test metrics (%):",
        "",
        markdown_table(results),
        "",
        "Wall time: " + ", ".join(f"{n} {m.get('wall_s', '?')} s" for n, m in runs.items()) + ".",
        "",
        f"Command: `{command}`",
        f"Code: {meta.get('git_commit') or 'unknown commit'}; machine: {meta.get('machine')}.",
    ]
    atomic_write_text(Path(run_dir) / "report.md", "\n".join(lines) + "\n")
    return report
