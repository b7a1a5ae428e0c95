"""Tables: mean ± sample std over seeds per (method, way, label ratio), as the Markdown of
``results.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mics.bench.cells import format_ratio
from mics.bench.grid import LOWER_IS_BETTER, METRIC_TITLES, METRICS, Grid


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int


def summarise(values: Sequence[float]) -> Summary:
    """Mean and sample (n - 1) standard deviation of one cell's metric over its seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def aggregate(
    rows: Sequence[Mapping[str, Any]], metric: str = "top1"
) -> dict[str, dict[tuple[str, str], dict[float, Summary]]]:
    """dataset -> (method, way) -> label ratio -> summary over seeds; each level in order of first
    appearance. Rows without the metric (older rows without ECE, an undefined AUROC) are left out."""
    values: dict[str, dict[tuple[str, str], dict[float, list[float]]]] = {}
    for r in rows:
        value = r.get(metric)
        if value in (None, "") or math.isnan(float(value)):
            continue
        per_row = values.setdefault(str(r["dataset"]), {}).setdefault(
            (str(r["method"]), str(r["way"] or "")), {}
        )
        per_row.setdefault(float(r["labels"]), []).append(float(value))
    return {
        ds: {row: {lab: summarise(v) for lab, v in cols.items()} for row, cols in per_ds.items()}
        for ds, per_ds in values.items()
    }


def _fmt(s: Summary, expected_n: int | None) -> str:
    text = f"{100 * s.mean:.2f}" if s.n == 1 else f"{100 * s.mean:.2f} ± {100 * s.std:.2f}"
    if expected_n is not None and s.n < expected_n:
        text += f" (n={s.n})"
    return text


def _column_verdicts(
    table: Mapping[tuple[str, str], Mapping[float, Summary]],
    labels: Sequence[float],
    lower_is_better: bool,
    row_label: Any,
) -> tuple[dict[float, tuple[str, str]], list[str]]:
    """Per label ratio, the row whose mean is best *and* apart from every other row's by more than the
    seeds' spread (the larger of the two sample stds), to be shown in bold; and, for the other columns, a
    note saying why none is: a tie within the spread, or a best mean from one seed (no spread to compare).
    Means are compared at the shown precision (0.01 %)."""
    bold: dict[float, tuple[str, str]] = {}
    notes: list[str] = []
    sign = -1.0 if lower_is_better else 1.0
    for lab in labels:
        entries = {row: cols[lab] for row, cols in table.items() if lab in cols}
        if len(entries) < 2:
            continue
        order = sorted(entries, key=lambda row: -sign * entries[row].mean)
        top = entries[order[0]]
        name = row_label(*order[0])
        ties = [
            row
            for row in order[1:]
            if round(100 * abs(top.mean - entries[row].mean), 2)
            <= round(100 * max(top.std, entries[row].std), 2)
        ]
        if ties:
            rivals = ", ".join(row_label(*row) for row in ties)
            notes.append(f"{format_ratio(lab)} %: tie, {name} and {rivals} within the seeds' spread.")
        elif top.n < 2:
            notes.append(f"{format_ratio(lab)} %: best mean {name}, from one seed (no spread to compare).")
        else:
            bold[lab] = order[0]
    return bold, notes


def markdown_table(
    table: Mapping[tuple[str, str], Mapping[float, Summary]],
    *,
    labels: Sequence[float],
    row_label: Any = None,
    expected_n: int | None = None,
    paper: Mapping[str, Mapping[float, float]] | None = None,
    paper_tag: str = "",
    lower_is_better: bool = False,
) -> str:
    """Rows = (method, way), columns = label ratios, cells = mean ± std in %. A column's best mean is in
    bold only where it is apart from every other mean by more than the seeds' spread; otherwise a line
    under the table says it is a tie (or rests on one seed). ``paper`` rows (top-1 %) follow the row they
    name and take no part in the comparison."""
    row_label = row_label or (lambda name, way: name if not way else f"{name} ({way})")
    bold, notes = _column_verdicts(table, labels, lower_is_better, row_label)
    lines = [
        "| method | " + " | ".join(f"{format_ratio(lab)} %" for lab in labels) + " |",
        "| --- | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for (name, way), cols in table.items():
        cells = []
        for lab in labels:
            if lab not in cols:
                cells.append("–")
                continue
            text = _fmt(cols[lab], expected_n)
            cells.append(f"**{text}**" if bold.get(lab) == (name, way) else text)
        lines.append(f"| {row_label(name, way)} | " + " | ".join(cells) + " |")
        key = name if not way else f"{name} ({way})"
        if paper and key in paper:
            ref = [
                next((f"*{v:.2f}*" for r, v in paper[key].items() if math.isclose(r, lab)), "–")
                for lab in labels
            ]
            lines.append(f"| *{row_label(name, way)}, paper ({paper_tag})* | " + " | ".join(ref) + " |")
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


_MAX_MISSING = 40


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``3.20 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def results_markdown(
    rows: Sequence[Mapping[str, Any]], grid: Grid | None = None, missing: Sequence[str] = ()
) -> str:
    """``results.md``: per data set, one table per metric (top-1 with the paper's numbers beside)."""
    title = grid.title if grid else "Bench results"
    lines = [f"# {title}", ""]
    if grid is not None:
        lines += [
            f"Grid `{grid.source or grid.name}`, preset `{grid.preset}`, seeds "
            f"{', '.join(map(str, grid.seeds))}."
        ]
    commits = sorted({str(r.get("git_commit")) for r in rows if r.get("git_commit")})
    lines += [
        "Test-set metrics in %, mean ± sample standard deviation over seeds; a column's best mean is in "
        "**bold** only where it is apart from every other by more than the seeds' spread (the larger "
        "std), otherwise the line under the table calls it a tie; (n=k): only k seeds finished. Paper "
        "rows (*italic*) are the paper's top-1 on its own data, shown only for data sets tagged as the "
        "paper's.",
        f"Runs: {len(rows)}; code: {', '.join(commits) or 'unknown'}.",
        "",
    ]
    expected = len(grid.seeds) if grid else None
    row_label = grid.row_label if grid else None
    for metric in METRICS:
        for ds, table in aggregate(rows, metric).items():
            spec = next((d for d in grid.datasets if d.name == ds), None) if grid else None
            present = {lab for cols in table.values() for lab in cols}
            labels = sorted(present, key=lambda r: (r >= 1.0, -r))  # 100 % (fully supervised) last
            tag = spec.paper if spec else None
            paper = grid.paper.get(tag) if grid and tag and metric == "top1" else None
            heading = f"## {ds}: {METRIC_TITLES[metric]} (%)"
            if spec is not None and metric == "top1":
                heading += f" — `{spec.path}`, pair `{spec.pair}`"
            lines += [
                heading,
                "",
                markdown_table(
                    table,
                    labels=labels,
                    row_label=row_label,
                    expected_n=expected,
                    paper=paper,
                    paper_tag=tag or "",
                    lower_is_better=metric in LOWER_IS_BETTER,
                ),
                "",
            ]
            if paper and grid and grid.paper_source:
                lines += [f"Paper: {grid.paper_source}.", ""]
    if grid is not None:
        notes = [f"- **{m.label}**: `{'`, `'.join(m.overrides)}`" for m in grid.methods if m.overrides]
        if grid.overrides:
            notes.insert(0, f"- every cell: `{'`, `'.join(grid.overrides)}`")
        if notes:
            lines += ["## Overrides", "", *notes, ""]
    walls = [float(r["wall_s"]) for r in rows if r.get("wall_s") not in (None, "")]
    walls = [w for w in walls if math.isfinite(w)]
    if walls:
        lines += [
            f"Total wall time of the finished runs: {format_duration(sum(walls))} (MICS runs that reuse "
            "a pre-training do not include it).",
            "",
        ]
    if missing:
        shown = [f"- `{m}`" for m in missing[:_MAX_MISSING]]
        if len(missing) > _MAX_MISSING:
            shown.append(f"- ... and {len(missing) - _MAX_MISSING} more")
        lines += [f"## Not finished ({len(missing)})", "", *shown, ""]
    return "\n".join(lines)
