"""Does a run's uncertainty flag its misclassified images better than the plain softmax does?

    python scripts/uncertainty_vs_msp.py RUN_DIR [RUN_DIR ...] [--split val|test]

For each finished run folder, reads ``<split>_predictions.npz`` (written by every run's evaluation) and
prints the AUROC of three scores at separating wrong from right predictions: the run's own uncertainty
(TMC's u = K / S for MICS), one minus the maximum class probability (MSP, the usual reference) and the
predictive entropy. 0.5 is chance. Run folders are found recursively, so a bench's ``runs/`` folder works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def scores(path: Path) -> dict[str, float] | None:
    data = np.load(path)
    probs, unc, labels = data["probs"], data["uncertainty"], data["labels"]
    wrong = probs.argmax(1) != labels
    if wrong.all() or not wrong.any():
        return None  # AUROC is undefined with one class
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
    return {
        "accuracy": float(1 - wrong.mean()),
        "u": float(roc_auc_score(wrong, unc)),
        "msp": float(roc_auc_score(wrong, 1 - probs.max(1))),
        "entropy": float(roc_auc_score(wrong, entropy)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args()
    files = sorted({p for root in args.roots for p in root.rglob(f"{args.split}_predictions.npz")})
    if not files:
        parser.error(f"no {args.split}_predictions.npz under {', '.join(map(str, args.roots))}")
    header = (
        f"| run | method | seed | {args.split} top-1 | AUROC of u | AUROC of 1 - max p | AUROC of entropy |"
    )
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for path in files:
        got = scores(path)
        if got is None:
            continue
        meta = json.loads((path.parent / "run.json").read_text(encoding="utf-8"))
        rows.append(got)
        print(
            f"| {path.parent} | {meta.get('method')} | {meta.get('seed')} | {100 * got['accuracy']:.2f} | "
            f"{got['u']:.3f} | {got['msp']:.3f} | {got['entropy']:.3f} |"
        )
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("accuracy", "u", "msp", "entropy")}
        print(
            f"| mean of {len(rows)} | | | {100 * mean['accuracy']:.2f} | {mean['u']:.3f} | "
            f"{mean['msp']:.3f} | {mean['entropy']:.3f} |"
        )


if __name__ == "__main__":
    main()
