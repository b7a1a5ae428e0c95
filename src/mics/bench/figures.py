"""Figures of a bench folder: Fig. 8 (UMAP), confusion matrices, learning curves and the label-efficiency
curve of every data set, from ``results.csv`` and the run folders (the plots are
:mod:`mics.eval.figures`')."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mics.bench.cells import format_ratio
from mics.bench.grid import Grid, GridError, load_grid
from mics.bench.results import read_csv
from mics.eval.figures import (
    Embedder,
    plot_confusions,
    plot_label_efficiency,
    plot_learning_curves,
    plot_umap,
    read_curves,
)


def _classes(run_dir: Path, metrics: Mapping[str, Any] | None = None) -> list[str]:
    meta = run_dir / "run.json"
    if meta.exists():
        return list(json.loads(meta.read_text(encoding="utf-8"))["classes"])
    if metrics is not None:
        return list(metrics["test"]["per_class"])
    raise FileNotFoundError(f"{run_dir} has neither run.json nor metrics.json")


def _row_name(row: Mapping[str, Any], labels_of: Mapping[str, str]) -> str:
    label = labels_of.get(str(row["method"]), str(row["method"]))
    return label if not row.get("way") else f"{label} ({row['way']})"


def make_figures(
    bench_dir: str | Path, out: str | Path | None = None, *, embed: Embedder | None = None
) -> list[Path]:
    """Every figure of a bench folder into ``out`` (default ``bench_dir/figures``), one sub-folder per data
    set: ``umap_l<pct>.png`` (Fig. 8, smallest ratio), ``confusion_l<pct>.png`` and ``curves_l<pct>.png``
    (every ratio; first seed), ``label_efficiency.png`` (with two label ratios or more). Returns the files
    written."""
    bench_dir = Path(bench_dir)
    out = Path(out) if out is not None else bench_dir / "figures"
    results = bench_dir / "results.csv"
    if not results.exists():
        raise GridError(f"{results} not found: run 'mics bench --out {bench_dir}' first")
    rows = read_csv(results)
    if not rows:
        raise GridError(f"{results} has no finished runs yet")
    grid = load_grid(bench_dir / "grid.yaml") if (bench_dir / "grid.yaml").exists() else None
    labels_of = {m.name: m.label for m in grid.methods} if grid else {}
    written: list[Path] = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        first_seed = min(r["seed"] for r in ds_rows)
        folder = out / dataset
        ratios = sorted({r["labels"] for r in ds_rows})
        smallest = min([r for r in ratios if r < 1.0] or ratios)
        for ratio in ratios:
            picked = [r for r in ds_rows if r["labels"] == ratio and r["seed"] == first_seed]
            if not picked:
                continue
            tag = f"{dataset}, {format_ratio(ratio)} % labels, seed {first_seed}"
            dirs = [(_row_name(r, labels_of), bench_dir / "runs" / r["cell"]) for r in picked]
            metrics = {n: json.loads((d / "metrics.json").read_text(encoding="utf-8")) for n, d in dirs}
            classes = _classes(dirs[0][1], metrics[dirs[0][0]])
            written.append(
                plot_confusions(
                    [(n, np.array(metrics[n]["test"]["confusion"])) for n, _ in dirs],
                    classes,
                    folder / f"confusion_l{format_ratio(ratio)}.png",
                    title=f"Test confusion (row-normalised): {tag}",
                )
            )
            written.append(
                plot_learning_curves(
                    {n: read_curves(d / "metrics.jsonl") for n, d in dirs},
                    folder / f"curves_l{format_ratio(ratio)}.png",
                    title=f"Learning curves: {tag}",
                )
            )
            if ratio == smallest:
                panels = []
                for n, d in dirs:
                    if (d / "test_features.npz").exists():
                        with np.load(d / "test_features.npz") as z:
                            panels.append((n, z["features"], z["labels"]))
                if panels:
                    written.append(
                        plot_umap(
                            panels,
                            classes,
                            folder / f"umap_l{format_ratio(ratio)}.png",
                            title=f"UMAP of test features (Fig. 8): {tag}",
                            embed=embed,
                        )
                    )
    written.extend(label_efficiency_figures(rows, out, grid))
    return written


def label_efficiency_figures(rows: list[dict[str, Any]], out: Path, grid: Grid | None = None) -> list[Path]:
    """``<out>/<dataset>/label_efficiency.png`` for each data set of ``rows`` (results rows: dataset,
    method, way, labels, seed, top1) measured at two label ratios below 100 % or more; the grid, when
    given, names the methods and adds the paper's points."""
    labels_of = {m.name: m.label for m in grid.methods} if grid else {}
    written: list[Path] = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        if len({r["labels"] for r in ds_rows if r["labels"] < 1.0}) < 2:
            continue  # a label-efficiency curve needs two label ratios
        series: dict[str, dict[float, list[float]]] = {}
        for r in ds_rows:
            series.setdefault(_row_name(r, labels_of), {}).setdefault(r["labels"], []).append(r["top1"])
        paper = None
        if grid is not None:
            spec = next((d for d in grid.datasets if d.name == dataset), None)
            if spec is not None and spec.paper in grid.paper:
                paper = {f"{labels_of.get(k, k)}, {spec.paper}": v for k, v in grid.paper[spec.paper].items()}
        written.append(
            plot_label_efficiency(
                series,
                out / dataset / "label_efficiency.png",
                paper=paper,
                title=f"Label efficiency: {dataset} (mean ± std over seeds)",
            )
        )
    return written


def results_figures(results: str | Path, out: str | Path, grid: str | Path | None = None) -> list[Path]:
    """The figures a results file alone can give (``mics bench --results``; the run folders, which the
    other figures need, are not kept with it): the label-efficiency curve of each data set."""
    results = Path(results)
    if not results.exists():
        raise GridError(f"{results} not found: write it with 'mics bench ... --results {results}'")
    rows = read_csv(results)
    if not rows:
        raise GridError(f"{results} has no finished cells yet")
    written = label_efficiency_figures(rows, Path(out), load_grid(grid) if grid is not None else None)
    if not written:
        raise GridError(f"{results}: no data set has two label ratios below 100 % yet")
    return written
