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
    (every ratio; one seed), ``label_efficiency.png`` (with two label ratios or more). Returns the files
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
    written = run_figures(rows, bench_dir / "runs", out, grid, embed=embed)
    written.extend(label_efficiency_figures(rows, out, grid))
    return written


def _kept_run(row: Mapping[str, Any], runs_dir: Path) -> Path | None:
    """The run folder of a results row under ``runs_dir``, or None when it is not there or is not the run
    the row measured (its test top-1 differs: a run of another protocol or an unfinished re-run)."""
    run_dir = runs_dir / str(row["cell"])
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        return None
    top1 = json.loads(metrics.read_text(encoding="utf-8")).get("test", {}).get("top1")
    if top1 is None or abs(float(top1) - float(row["top1"])) > 1e-5:
        return None
    return run_dir


def run_figures(
    rows: list[dict[str, Any]],
    runs_dir: Path,
    out: Path,
    grid: Grid | None = None,
    *,
    embed: Embedder | None = None,
) -> list[Path]:
    """Confusion matrices and learning curves of every label ratio, and Fig. 8 (UMAP of the test features)
    at the smallest ratio below 100 %, of the ``rows`` whose run folder ``runs_dir/<cell>`` is kept. Each
    (data set, ratio) shows one seed: the one with the most kept runs (the smallest on a tie)."""
    labels_of = {m.name: m.label for m in grid.methods} if grid else {}
    kept = [(r, d) for r in rows if (d := _kept_run(r, runs_dir)) is not None]
    written: list[Path] = []
    for dataset in dict.fromkeys(r["dataset"] for r, _ in kept):
        ds_kept = [(r, d) for r, d in kept if r["dataset"] == dataset]
        folder = out / dataset
        ratios = sorted({r["labels"] for r, _ in ds_kept})
        smallest = min([r for r in ratios if r < 1.0] or ratios)
        for ratio in ratios:
            at_ratio = [(r, d) for r, d in ds_kept if r["labels"] == ratio]
            seeds = sorted({r["seed"] for r, _ in at_ratio})
            seed = max(seeds, key=lambda s: (sum(r["seed"] == s for r, _ in at_ratio), -s))
            dirs = [(_row_name(r, labels_of), d) for r, d in at_ratio if r["seed"] == seed]
            tag = f"{dataset}, {format_ratio(ratio)} % labels, seed {seed}"
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


def results_figures(
    results: str | Path,
    out: str | Path,
    grid: str | Path | None = None,
    *,
    runs: str | Path | None = None,
    embed: Embedder | None = None,
) -> list[Path]:
    """The figures of a results file (``mics bench --results``): the label-efficiency curve of each data
    set, and with ``runs`` (a folder of kept run folders, ``runs/<cell>``, such as a bench's ``runs/``)
    the figures of :func:`run_figures` for the rows whose run is kept there."""
    results = Path(results)
    if not results.exists():
        raise GridError(f"{results} not found: write it with 'mics bench ... --results {results}'")
    rows = read_csv(results)
    if not rows:
        raise GridError(f"{results} has no finished cells yet")
    loaded = load_grid(grid) if grid is not None else None
    written: list[Path] = []
    if runs is not None:
        runs = Path(runs)
        if not runs.is_dir():
            raise GridError(f"{runs} is not a folder of run folders (a bench's runs/)")
        written = run_figures(rows, runs, Path(out), loaded, embed=embed)
        if not written:
            raise GridError(
                f"{runs} keeps none of the runs of {results}'s rows (a run counts when "
                "RUNS/<cell>/metrics.json has the row's test top-1)"
            )
    efficiency = label_efficiency_figures(rows, Path(out), loaded)
    if not efficiency and runs is None:
        raise GridError(f"{results}: no data set has two label ratios below 100 % yet")
    return written + efficiency
