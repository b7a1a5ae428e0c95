"""Result collection: one ``results.csv`` row per finished cell (from its run folder), and
``results.md`` from the rows."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mics.bench.cells import Cell, expand_cells
from mics.bench.grid import CSV_COLUMNS, METRICS, Grid
from mics.bench.paths import run_dir_of, write_text
from mics.bench.tables import results_markdown


def collect_rows(cells: Sequence[Cell], out: Path) -> list[dict[str, Any]]:
    """One ``results.csv`` row per finished cell (metrics as fractions, as in ``metrics.json``)."""
    out = Path(out)
    state_path = out / "bench.json"
    state = json.loads(state_path.read_text(encoding="utf-8")).get("cells", {}) if state_path.exists() else {}
    rows = []
    for c in cells:
        rd = run_dir_of(out, c)
        if not (rd / "metrics.json").exists():
            continue
        metrics = json.loads((rd / "metrics.json").read_text(encoding="utf-8"))
        meta = json.loads((rd / "run.json").read_text(encoding="utf-8")) if (rd / "run.json").exists() else {}
        pretrained = state.get(c.id, {}).get("pretrained_from") or ""
        rows.append(
            {
                "dataset": c.dataset,
                "method": c.name,
                "way": c.way or "",
                "labels": c.labels,
                "seed": c.seed,
                **{k: _metric(metrics["test"], k) for k in METRICS},
                "wall_s": metrics.get("wall_s", ""),
                "preset": meta.get("preset", c.preset),
                "git_commit": meta.get("git_commit") or "",
                "cell": c.id,
                "algorithm": c.method,
                "pretrained_from": Path(pretrained).name if pretrained else "",
            }
        )
    return rows


def _metric(test: Mapping[str, Any], name: str) -> float | str:
    """A test metric rounded for the CSV; "" where the run has none (an older run without ECE, or an
    uncertainty AUROC undefined because every test image was right or every one wrong)."""
    value = test.get(name)
    return "" if value is None else round(float(value), 6)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """``results.csv`` back as rows with numbers parsed."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = dict(r)
            row["labels"], row["seed"] = float(r["labels"]), int(r["seed"])
            for k in (*METRICS, "wall_s"):
                row[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
            rows.append(row)
    return rows


def write_results(grid: Grid, out: str | Path, cells: Sequence[Cell] | None = None) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` from the finished cells of ``grid`` in ``out``."""
    out = Path(out)
    cells = list(cells) if cells is not None else expand_cells(grid)
    rows = collect_rows(cells, out)
    missing = [c.id for c in cells if not (run_dir_of(out, c) / "metrics.json").exists()]
    csv_path = write_csv(rows, out / "results.csv")
    md_path = out / "results.md"
    write_text(md_path, results_markdown(rows, grid, missing) + "\n")
    return csv_path, md_path
