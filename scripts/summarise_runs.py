"""Print a markdown table of the VAL metrics of every finished run folder under a directory.

    python scripts/summarise_runs.py runs/ab/milk10k-l10-s0 [--test NAME]

Defaults are chosen on val only, so test metrics are printed only for the run named with ``--test`` (the
configuration that was chosen), never for the whole ablation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("top1", "balanced_accuracy", "macro_f1", "ece", "uncertainty_auroc")


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if key != "ece" and key != "uncertainty_auroc" else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--test", help="run folder name whose test metrics are printed")
    args = parser.parse_args()
    rows = []
    for path in sorted(args.root.glob("*/metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        meta = json.loads((path.parent / "run.json").read_text(encoding="utf-8"))
        rows.append((path.parent.name, metrics, meta))
    print(f"| run | split | {' | '.join(COLUMNS)} | wall s | commit |")
    print("| --- | --- |" + " ---: |" * (len(COLUMNS) + 1) + " --- |")
    for name, metrics, meta in rows:
        splits = ["val"] + (["test"] if name == args.test else [])
        for split in splits:
            cells = " | ".join(_fmt(metrics[split], key) for key in COLUMNS)
            print(f"| {name} | {split} | {cells} | {metrics.get('wall_s', '–')} | {meta.get('git_commit')} |")


if __name__ == "__main__":
    main()
