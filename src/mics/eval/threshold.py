"""The "low confidence" threshold on the uncertainty u, chosen on the val split of a run.

Rule: an image is flagged when ``u > threshold``. The threshold maximises the balanced accuracy of the
flag as a detector of wrong predictions on val (the mean of the share of wrong predictions flagged and the
share of right ones not flagged); candidates are the midpoints between consecutive distinct val
uncertainties and the two ends, and of equally good thresholds the highest (fewest flags) is kept. When
val has no wrong prediction the threshold is the highest val u (flag only what is more uncertain than
anything seen); when every val prediction is wrong it is 0 (flag everything).

Written to ``RUN/uncertainty_threshold.json`` from ``RUN/val_predictions.npz`` (saved by evaluation),
together with how the flag does on val and, held out, on test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLD_FILE = "uncertainty_threshold.json"
RULE = (
    "flag when u > threshold; threshold maximises the balanced accuracy of the flag as a detector of "
    "wrong predictions on val (highest such threshold)"
)


def choose_threshold(uncertainty: np.ndarray, wrong: np.ndarray) -> tuple[float, float | None]:
    """(threshold, its val balanced accuracy, None when val has only right or only wrong predictions)."""
    u = np.asarray(uncertainty, dtype=float)
    wrong = np.asarray(wrong, dtype=bool)
    if u.ndim != 1 or u.shape != wrong.shape or len(u) == 0:
        raise ValueError(f"need matching non-empty [n] arrays, got {u.shape} and {wrong.shape}")
    if not wrong.any():
        return float(u.max()), None
    if wrong.all():
        return 0.0, None
    levels = np.unique(u)
    below = np.nextafter(levels[0], -np.inf)  # flags every val image
    candidates = np.concatenate([[below], (levels[:-1] + levels[1:]) / 2, [levels[-1]]])
    flagged = u[None, :] > candidates[:, None]  # [T, n]
    tpr = (flagged & wrong).sum(axis=1) / wrong.sum()
    tnr = (~flagged & ~wrong).sum(axis=1) / (~wrong).sum()
    score = (tpr + tnr) / 2
    best = np.flatnonzero(score >= score.max() - 1e-12)[-1]
    return float(candidates[best]), float(score[best])


def flag_summary(uncertainty: np.ndarray, wrong: np.ndarray, threshold: float) -> dict[str, Any]:
    """How the flag ``u > threshold`` splits the predictions: counts and error rates of each side."""
    u, wrong = np.asarray(uncertainty, dtype=float), np.asarray(wrong, dtype=bool)
    flagged = u > threshold

    def rate(sel: np.ndarray) -> float | None:
        return float(wrong[sel].mean()) if sel.any() else None

    return {
        "n": int(len(u)),
        "errors": int(wrong.sum()),
        "flagged": int(flagged.sum()),
        "error_rate_flagged": rate(flagged),
        "error_rate_not_flagged": rate(~flagged),
        "errors_caught": float((flagged & wrong).sum() / wrong.sum()) if wrong.any() else None,
    }


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        probs, u, labels = data["probs"], data["uncertainty"], data["labels"]
    return np.asarray(u, dtype=float), probs.argmax(axis=1) != labels


def write_threshold(run_dir: str | Path) -> dict[str, Any] | None:
    """Choose the threshold from ``RUN/val_predictions.npz`` and write ``RUN/uncertainty_threshold.json``;
    None (nothing written) when the run has no val predictions (evaluated before they were saved)."""
    from mics.engine.checkpoint import atomic_write_json

    run_dir = Path(run_dir)
    val = run_dir / "val_predictions.npz"
    if not val.exists():
        return None
    u, wrong = _load(val)
    threshold, score = choose_threshold(u, wrong)
    record: dict[str, Any] = {
        "threshold": threshold,
        "rule": RULE,
        "val_balanced_accuracy": score,
        "val": flag_summary(u, wrong, threshold),
    }
    test = run_dir / "test_predictions.npz"
    if test.exists():
        record["test"] = flag_summary(*_load(test), threshold)
    atomic_write_json(run_dir / THRESHOLD_FILE, record)
    return record


def read_threshold(run_dir: str | Path) -> dict[str, Any] | None:
    """The stored threshold record of a run, or None."""
    path = Path(run_dir) / THRESHOLD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
