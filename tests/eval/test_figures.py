"""Figures of a bench folder, drawn from synthetic run folders (no training)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mics import bench
from mics.bench import GridError
from mics.bench.figures import make_figures
from mics.eval import figures
from mics.eval.figures import read_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["BCC", "MEL", "NV"]


def pca_2d(features: np.ndarray) -> np.ndarray:
    """A cheap stand-in for UMAP (whose first call compiles for ~15 s)."""
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def clustered(
    n_per_class: int, dim: int, rng: np.random.Generator, spread: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(len(CLASSES), dim)) * 3
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def fake_bench(root: Path, *, paper_tag: str | None = "Kvasir") -> Path:
    """A bench folder with 3 rows x 2 ratios x 2 seeds of finished runs, as ``mics bench`` leaves it."""
    rng = np.random.default_rng(0)
    grid = {
        "name": "fake",
        "preset": "smoke",
        "seeds": [0, 1],
        "labels": [0.1, 0.05],
        "datasets": [{"name": "d", "path": "/d", **({"paper": paper_tag} if paper_tag else {})}],
        "methods": [
            {"name": "mics", "label": "MICS"},
            {"name": "fixmatch", "ways": ["multimodal"]},
            {"name": "full", "method": "supervised", "ways": ["standard"], "labels": [1.0]},
        ],
        "paper": {"results": {"Kvasir": {"mics": {0.1: 67.17, 0.05: 60.88}}}},
    }
    import yaml

    root.mkdir(parents=True)
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    rows = []
    for cell in bench.expand_cells(bench.parse_grid(grid)):
        rd = bench.run_dir_of(root, cell)
        rd.mkdir(parents=True)
        feats, labels = clustered(20, 16, rng)
        np.savez_compressed(rd / "test_features.npz", features=feats, labels=labels)
        confusion = np.diag([18, 15, 12]) + rng.integers(0, 4, size=(3, 3))
        top1 = float(np.trace(confusion) / confusion.sum())
        (rd / "metrics.json").write_text(
            json.dumps(
                {
                    "test": {
                        "top1": top1,
                        "balanced_accuracy": top1,
                        "macro_f1": top1,
                        "confusion": confusion.tolist(),
                        "per_class": {c: {} for c in CLASSES},
                    },
                    "wall_s": 3.0,
                }
            )
        )
        (rd / "run.json").write_text(json.dumps({"classes": CLASSES, "preset": "smoke"}))
        stages = (["pretrain"] if cell.method == "mics" else []) + [
            "finetune" if cell.method == "mics" else "x"
        ]
        with open(rd / "metrics.jsonl", "w") as fh:
            for stage in stages:
                for epoch in range(1, 4):
                    rec = {"stage": stage, "step": 10 * epoch, "epoch": epoch, "loss": 2.0 / epoch}
                    if stage != "pretrain":
                        rec["val_top1"] = 0.3 + 0.1 * epoch
                    fh.write(json.dumps(rec) + "\n")
        rows.append(
            {
                "dataset": cell.dataset,
                "method": cell.name,
                "way": cell.way or "",
                "labels": cell.labels,
                "seed": cell.seed,
                "top1": top1,
                "balanced_accuracy": top1,
                "macro_f1": top1,
                "wall_s": 3.0,
                "preset": "smoke",
                "git_commit": "",
                "cell": cell.id,
                "algorithm": cell.method,
                "pretrained_from": "",
            }
        )
    bench.write_csv(rows, root / "results.csv")
    return root


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank canvas


def test_make_figures_writes_every_figure_as_a_png(tmp_path):
    root = fake_bench(tmp_path / "bench")
    written = make_figures(root, embed=pca_2d)
    names = sorted(p.relative_to(root / "figures").as_posix() for p in written)
    assert names == sorted(
        [
            "d/confusion_l5.png",
            "d/confusion_l10.png",
            "d/confusion_l100.png",
            "d/curves_l5.png",
            "d/curves_l10.png",
            "d/curves_l100.png",
            "d/umap_l5.png",
            "d/label_efficiency.png",
        ]
    )
    for p in written:
        assert_png(p)


def test_umap_panels_use_the_smallest_ratio_and_every_method(tmp_path, monkeypatch):
    root = fake_bench(tmp_path / "bench", paper_tag=None)
    seen: list[tuple[str, int]] = []
    original = figures.plot_umap

    def spy(panels, classes, path, **kw):
        seen.extend((name, len(f)) for name, f, _ in panels)
        assert list(classes) == CLASSES
        return original(panels, classes, path, **kw)

    monkeypatch.setattr("mics.bench.figures.plot_umap", spy)
    make_figures(root, tmp_path / "figs", embed=pca_2d)
    assert seen == [("MICS", 60), ("fixmatch (multimodal)", 60)]  # fully supervised: 100 % only
    assert (tmp_path / "figs" / "d" / "umap_l5.png").exists()


def test_umap_embedding_uses_the_papers_settings(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **kw):
            calls.update(kw)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    xy = figures.umap_embedding(np.ones((50, 4)), seed=3)
    assert xy.shape == (50, 2)
    assert (calls["n_neighbors"], calls["min_dist"], calls["n_components"], calls["random_state"]) == (
        30,
        1.0,
        2,
        3,
    )
    figures.umap_embedding(np.ones((12, 4)))
    assert calls["n_neighbors"] == 11  # capped below the number of test images
    with pytest.raises(ValueError, match="UMAP needs"):
        figures.umap_embedding(np.ones((2, 4)))


def test_read_curves_keeps_the_last_record_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [
        {"stage": "finetune", "step": 20, "loss": 1.0},
        {"stage": "finetune", "step": 10, "loss": 2.0},
        {"stage": "pretrain", "step": 5, "loss": 9.0},
        {"stage": "finetune", "step": 20, "loss": 0.5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    curves = read_curves(path)
    assert [(r["step"], r["loss"]) for r in curves["finetune"]] == [(10, 2.0), (20, 0.5)]
    assert [r["loss"] for r in curves["pretrain"]] == [9.0]
    assert read_curves(tmp_path / "missing.jsonl") == {}


def test_label_efficiency_alone(tmp_path):
    series = {
        "MICS": {0.05: [0.6, 0.62], 0.1: [0.7, 0.71, 0.69], 0.5: [0.8]},
        "Fully supervised": {1.0: [0.9]},
    }
    path = figures.plot_label_efficiency(
        series, tmp_path / "le.png", title="t", paper={"MICS, Kvasir": {0.05: 60.88, 0.1: 67.17}}
    )
    assert_png(path)


def test_figures_need_a_bench_folder(tmp_path):
    with pytest.raises(GridError, match="results.csv"):
        make_figures(tmp_path)


@pytest.mark.slow
def test_real_umap_keeps_well_separated_classes_apart(tmp_path):
    feats, labels = clustered(30, 32, np.random.default_rng(1), spread=0.2)
    xy = figures.umap_embedding(feats)
    # leave-one-out 1-NN in the embedding recovers the class of nearly every point
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(axis=1)] == labels).mean() > 0.95
    assert_png(figures.plot_umap([("m", feats, labels)], CLASSES, tmp_path / "u.png"))


def test_results_file_alone_gives_the_label_efficiency_curve(tmp_path, monkeypatch):
    from mics.bench.figures import results_figures

    root = fake_bench(tmp_path / "bench")
    results = root / "results.csv"
    written = results_figures(results, tmp_path / "figs")
    assert [p.relative_to(tmp_path / "figs").as_posix() for p in written] == ["d/label_efficiency.png"]
    assert_png(written[0])
    # with the grid: its method names, and the paper's points of the data set's paper tag
    seen: dict[str, Any] = {}
    original = figures.plot_label_efficiency

    def spy(series, path, **kw):
        seen.update(series=series, paper=kw.get("paper"))
        return original(series, path, **kw)

    monkeypatch.setattr("mics.bench.figures.plot_label_efficiency", spy)
    results_figures(results, tmp_path / "named", root / "grid.yaml")
    assert sorted(seen["series"]) == ["MICS", "fixmatch (multimodal)", "full (standard)"]
    assert seen["series"]["MICS"].keys() == {0.1, 0.05} and len(seen["series"]["MICS"][0.1]) == 2
    assert seen["paper"] == {"MICS, Kvasir": {0.1: 67.17, 0.05: 60.88}}
    results_figures(results, tmp_path / "plain")
    assert seen["paper"] is None and "mics" in seen["series"]


def test_results_figures_say_what_is_missing(tmp_path):
    from mics.bench.figures import results_figures

    with pytest.raises(GridError, match="^" + re.escape(f"{tmp_path / 'no.csv'} not found")):
        results_figures(tmp_path / "no.csv", tmp_path / "figs")
    root = fake_bench(tmp_path / "bench")
    rows = [r for r in bench.read_csv(root / "results.csv") if r["labels"] != 0.05]
    bench.write_csv(rows, tmp_path / "one-ratio.csv")
    message = f"{tmp_path / 'one-ratio.csv'}: no data set has two label ratios below 100 % yet"
    with pytest.raises(GridError, match="^" + re.escape(message) + "$"):
        results_figures(tmp_path / "one-ratio.csv", tmp_path / "figs")
    bench.write_csv([], tmp_path / "empty.csv")
    with pytest.raises(GridError, match="has no finished cells yet"):
        results_figures(tmp_path / "empty.csv", tmp_path / "figs")


def test_results_file_with_kept_runs_draws_each_ratio_from_its_most_complete_seed(tmp_path, monkeypatch):
    from mics.bench.figures import results_figures

    root = fake_bench(tmp_path / "bench")
    runs = root / "runs"
    # seed 0 loses MICS at 5 % (run folder gone) and FixMatch at 10 % (a re-run of another protocol)
    for cell in ("d__mics__l5__s0", "d__fixmatch-multimodal__l5__s0"):
        assert (runs / cell).is_dir(), sorted(p.name for p in runs.iterdir())
    (runs / "d__mics__l5__s0" / "metrics.json").unlink()
    other = runs / "d__fixmatch-multimodal__l10__s0" / "metrics.json"
    record = json.loads(other.read_text())
    record["test"]["top1"] += 0.01
    other.write_text(json.dumps(record))
    titles: list[str] = []
    umap_panels: list[str] = []
    original_confusions, original_umap = figures.plot_confusions, figures.plot_umap

    def spy_confusions(panels, classes, path, **kw):
        titles.append(f"{path.name}: {kw['title']} {[n for n, _ in panels]}")
        return original_confusions(panels, classes, path, **kw)

    def spy_umap(panels, classes, path, **kw):
        umap_panels.extend(n for n, _, _ in panels)
        return original_umap(panels, classes, path, **kw)

    monkeypatch.setattr("mics.bench.figures.plot_confusions", spy_confusions)
    monkeypatch.setattr("mics.bench.figures.plot_umap", spy_umap)
    written = results_figures(
        root / "results.csv", tmp_path / "figs", root / "grid.yaml", runs=runs, embed=pca_2d
    )
    assert sorted(p.relative_to(tmp_path / "figs").as_posix() for p in written) == sorted(
        [f"d/{kind}_l{pct}.png" for kind in ("confusion", "curves") for pct in (5, 10, 100)]
        + ["d/umap_l5.png", "d/label_efficiency.png"]
    )
    assert sorted(titles) == [
        "confusion_l10.png: Test confusion (row-normalised): d, 10 % labels, seed 1 "
        "['MICS', 'fixmatch (multimodal)']",
        "confusion_l100.png: Test confusion (row-normalised): d, 100 % labels, seed 0 ['full (standard)']",
        "confusion_l5.png: Test confusion (row-normalised): d, 5 % labels, seed 1 "
        "['MICS', 'fixmatch (multimodal)']",
    ]
    assert umap_panels == ["MICS", "fixmatch (multimodal)"]
    for p in written:
        assert_png(p)


def test_kept_runs_that_match_no_row_are_an_error(tmp_path):
    from mics.bench.figures import results_figures

    root = fake_bench(tmp_path / "bench")
    (tmp_path / "empty-runs").mkdir()
    message = f"{tmp_path / 'empty-runs'} keeps none of the runs of {root / 'results.csv'}'s rows"
    with pytest.raises(GridError, match="^" + re.escape(message)):
        results_figures(root / "results.csv", tmp_path / "figs", runs=tmp_path / "empty-runs")
    with pytest.raises(GridError, match="^" + re.escape(f"{tmp_path / 'nothing'} is not a folder of run")):
        results_figures(root / "results.csv", tmp_path / "figs", runs=tmp_path / "nothing")
    # one label ratio and kept runs: the run figures alone, no error about the missing curve
    rows = [r for r in bench.read_csv(root / "results.csv") if r["labels"] == 0.1]
    bench.write_csv(rows, tmp_path / "one-ratio.csv")
    written = results_figures(tmp_path / "one-ratio.csv", tmp_path / "figs", runs=root / "runs", embed=pca_2d)
    assert sorted(p.name for p in written) == ["confusion_l10.png", "curves_l10.png", "umap_l10.png"]
