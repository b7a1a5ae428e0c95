"""Figures of a bench folder (``mics figures --bench DIR``): the paper's Fig. 8 (UMAP of the test features of
each method at the smallest label ratio), confusion matrices, learning curves and label efficiency.

Everything is read from what ``mics bench`` leaves: ``results.csv`` (one row per finished cell), each cell's
run folder (``test_features.npz``, ``metrics.json``, ``metrics.jsonl``, ``run.json``) and ``grid.yaml`` (for
the paper's numbers). Figures are drawn with matplotlib's object API on the Agg canvas: no display needed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mics.files import atomic_write_bytes

Embedder = Callable[[np.ndarray], np.ndarray]

UMAP_NEIGHBOURS = 30  # the paper's Fig. 8 settings
UMAP_MIN_DIST = 1.0


def umap_embedding(
    features: np.ndarray,
    *,
    n_neighbors: int = UMAP_NEIGHBOURS,
    min_dist: float = UMAP_MIN_DIST,
    seed: int = 0,
) -> np.ndarray:
    """2-D UMAP of features [n, D] -> [n, 2]. ``n_neighbors`` is capped at n - 1 for small test sets."""
    import warnings

    import umap

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 3:
        raise ValueError(f"UMAP needs features [n >= 3, D], got shape {list(features.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns that a fixed random_state disables its parallelism
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, len(features) - 1),
            min_dist=min_dist,
            n_components=2,
            random_state=seed,
        )
        return np.asarray(reducer.fit_transform(features), dtype=np.float64)


def _figure(n_panels: int, *, ncols: int, panel: tuple[float, float]) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=110)
    # atomic: a full disk must not leave a truncated PNG that passes for a figure
    atomic_write_bytes(path, buf.getvalue())
    return path


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_umap(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    path: Path,
    *,
    title: str = "",
    embed: Embedder | None = None,
) -> Path:
    """One scatter per (title, features [n, D], labels [n]) panel, coloured by class, shared legend."""
    embed = embed or umap_embedding
    fig, axes = _figure(len(panels), ncols=4, panel=(3.4, 3.2))
    colours = _colours(len(classes))
    for ax, (name, feats, labels) in zip(axes, panels, strict=True):
        xy = embed(feats)
        for k, cls in enumerate(classes):
            sel = labels == k
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colours[k], label=cls, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, names, loc="outside lower center", ncol=min(len(classes), 6), markerscale=3, fontsize=8
    )
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusions(
    panels: Sequence[tuple[str, np.ndarray]], classes: Sequence[str], path: Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrices [C, C] (true class = row), one panel per (title, counts)."""
    fig, axes = _figure(len(panels), ncols=4, panel=(3.3, 3.3))
    annotate = len(classes) <= 8
    for ax, (name, counts) in zip(axes, panels, strict=True):
        counts = np.asarray(counts, dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(range(len(classes)), labels=classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), labels=classes, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(name, fontsize=9)
        if annotate:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(
                        j,
                        i,
                        f"{rates[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def read_curves(metrics_jsonl: Path) -> dict[str, list[dict[str, Any]]]:
    """stage -> epoch records (sorted by step; for a step logged twice, e.g. after a resume, the last one)."""
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    if not metrics_jsonl.exists():
        return {}
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_stage.setdefault(str(rec.get("stage")), {})[int(rec.get("step", 0))] = rec
    return {stage: [recs[s] for s in sorted(recs)] for stage, recs in by_stage.items()}


def plot_learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], path: Path, *, title: str = ""
) -> Path:
    """``curves``: method -> stage -> records. Panels: pre-training loss, training loss (fine-tuning or
    the baseline's stage) and validation top-1, against the optimiser step."""
    fig, axes = _figure(3, ncols=3, panel=(4.2, 3.4))
    colours = _colours(len(curves))
    for colour, (name, stages) in zip(colours, curves.items(), strict=True):
        for stage, recs in stages.items():
            steps = [r["step"] for r in recs]
            # markers too: a one-epoch stage is a single point
            ax = axes[0] if stage == "pretrain" else axes[1]
            ax.plot(steps, [r.get("loss", np.nan) for r in recs], color=colour, label=name, marker=".")
            if stage == "pretrain":
                continue
            val = [
                (r["step"], 100 * r["val_top1"]) for r in recs if isinstance(r.get("val_top1"), (int, float))
            ]
            if val:
                axes[2].plot(*zip(*val, strict=True), color=colour, label=name, marker=".")
    for ax, name in zip(axes, ("pre-training loss", "training loss", "validation top-1 (%)"), strict=True):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimiser step")
        if not ax.lines:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles: dict[str, Any] = {}
    for ax in axes:
        for line in ax.lines:
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside right upper")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_label_efficiency(
    series: Mapping[str, Mapping[float, Sequence[float]]],
    path: Path,
    *,
    title: str = "",
    paper: Mapping[str, Mapping[float, float]] | None = None,
) -> Path:
    """Test top-1 (%) against the label ratio, mean ± std over seeds per method (values as fractions).

    A method measured at 100 % labels only (fully supervised) is drawn as a horizontal dashed line;
    ``paper`` (method -> ratio -> top-1 %) adds the paper's points as black crosses.
    """
    fig, axes = _figure(1, ncols=1, panel=(7.5, 4.6))
    ax = axes[0]
    colours = _colours(len(series))
    ratios = sorted({r for values in series.values() for r in values})
    for colour, (name, per_ratio) in zip(colours, series.items(), strict=True):
        xs = sorted(per_ratio)
        mean = np.array([100 * np.mean(per_ratio[x]) for x in xs])
        std = np.array([100 * np.std(per_ratio[x], ddof=1) if len(per_ratio[x]) > 1 else 0.0 for x in xs])
        if xs == [1.0] and ratios[0] < 1.0:
            ax.axhline(mean[0], color=colour, linestyle="--", linewidth=1, label=f"{name} (100 %)")
            continue
        pct = 100 * np.array(xs)
        ax.errorbar(pct, mean, yerr=std, marker="o", color=colour, label=name, capsize=2)
        ax.fill_between(pct, mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
    for name, points in (paper or {}).items():
        xs = sorted(points)
        ax.plot(
            [100 * x for x in xs], [points[x] for x in xs], "kx--", linewidth=0.8, label=f"{name} (paper)"
        )
    shown = [r for r in ratios if r < 1.0] or ratios
    ax.set_xscale("log")
    ax.set_xticks([100 * r for r in shown], labels=[f"{100 * r:g}" for r in shown])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper")
    if title:
        ax.set_title(title)
    return _save(fig, path)


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
    from mics.bench import GridError, format_ratio, load_grid, read_csv

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
        if sum(r < 1.0 for r in ratios) < 2:
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
                folder / "label_efficiency.png",
                paper=paper,
                title=f"Label efficiency: {dataset} (mean ± std over seeds)",
            )
        )
    return written
