"""The plots of the paper's figures: Fig. 8 (UMAP of the test features of each method), confusion
matrices, learning curves and label efficiency. :mod:`mics.bench.figures` draws them for a bench folder
(``mics figures --bench DIR``). Figures are drawn with matplotlib's object API on the Agg canvas: no display
needed.
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
