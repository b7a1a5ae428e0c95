"""Print markdown tables of the VAL metrics of every finished run folder under one or more directories.

    python scripts/summarise_runs.py runs/ab/milk10k-l10-s0 [runs/ab/milk10k-l10-s1 ...] [--test NAME]

One row per run folder (with its seed), then, with several directories, the mean over the directories of
every run name present in all of them. Defaults are chosen on val only, so test metrics are printed only
for the run named with ``--test`` (the configuration that was chosen), never for the whole ablation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("top1", "balanced_accuracy", "macro_f1", "ece", "uncertainty_auroc")
PERCENT = ("top1", "balanced_accuracy", "macro_f1")


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if key in PERCENT else f"{value:.3f}"


def _runs(root: Path) -> list[tuple[str, dict, dict]]:
    rows = []
    for path in sorted(root.glob("*/metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        meta = json.loads((path.parent / "run.json").read_text(encoding="utf-8"))
        rows.append((path.parent.name, metrics, meta))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+")
    parser.add_argument("--test", help="run folder name whose test metrics are printed")
    args = parser.parse_args()
    by_root = {root: _runs(root) for root in args.roots}
    print(f"| run | seed | split | {' | '.join(COLUMNS)} | wall s | commit |")
    print("| --- | ---: | --- |" + " ---: |" * (len(COLUMNS) + 1) + " --- |")
    for rows in by_root.values():
        for name, metrics, meta in rows:
            splits = ["val"] + (["test"] if name == args.test else [])
            for split in splits:
                cells = " | ".join(_fmt(metrics[split].get(key), key) for key in COLUMNS)
                print(
                    f"| {name} | {meta.get('seed')} | {split} | {cells} | {metrics.get('wall_s', '–')} | "
                    f"{meta.get('git_commit')} |"
                )
    if len(by_root) < 2:
        return
    names = [n for n, _, _ in next(iter(by_root.values()))]
    common = [n for n in names if all(any(r[0] == n for r in rows) for rows in by_root.values())]
    print(f"\nMean over {len(by_root)} seeds (val), run names present in every directory:\n")
    print(f"| run | {' | '.join(COLUMNS)} |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for name in common:
        vals = [next(m for n, m, _ in rows if n == name)["val"] for rows in by_root.values()]
        cells = []
        for key in COLUMNS:
            xs = [v.get(key) for v in vals]
            cells.append("–" if any(x is None for x in xs) else _fmt(sum(xs) / len(xs), key))
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
