"""Render a committed results file (``mics bench --results FILE``) as the bench's markdown tables.

    python scripts/results_tables.py results/milk10k/table2.csv configs/table2-cpu.yaml \
        > results/milk10k/table2.md

Mean ± std over the seeds present per (method, ratio), bold only where a mean is apart from every other by
more than the seeds' spread, per-seed rows listed below each data set's tables. Rows whose protocol key no
longer matches the grid's cell are left out and counted (they would be re-run by the bench).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mics.bench import expand_cells, load_grid
from mics.bench.protocol import protocol_key
from mics.bench.results import read_csv
from mics.bench.tables import results_markdown
from mics.data.errors import DataError

PER_SEED = ("top1", "balanced_accuracy", "macro_f1", "ece", "uncertainty_auroc")


def _cell(value: str) -> str:
    if value in ("", None):
        return "–"
    return f"{100 * float(value):.2f}"  # in %, as the tables above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("grid", type=Path)
    args = parser.parse_args()
    grid = load_grid(args.grid)
    try:
        keys = {c.id: protocol_key(c) for c in expand_cells(grid)}
    except DataError as err:
        parser.error(str(err))
    rows = read_csv(args.results)
    current = [r for r in rows if keys.get(str(r.get("cell"))) == r.get("protocol")]
    print(results_markdown(current, grid))
    if len(current) < len(rows):
        print(f"\n{len(rows) - len(current)} row(s) of another protocol or grid left out.")
    print("\n## Per-seed rows (test split, %)\n")
    print("| cell | " + " | ".join(PER_SEED) + " | wall s | commit |")
    print("| --- |" + " ---: |" * (len(PER_SEED) + 1) + " --- |")
    for r in sorted(current, key=lambda r: str(r["cell"])):
        values = " | ".join(_cell(r.get(k, "")) for k in PER_SEED)
        print(f"| {r['cell']} | {values} | {r.get('wall_s', '')} | {r.get('git_commit', '')} |")


if __name__ == "__main__":
    main()
