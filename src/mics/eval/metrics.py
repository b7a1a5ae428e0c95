"""Classification metrics: top-1, balanced accuracy, macro-F1, per class, confusion, calibration, and how
well the uncertainty separates errors from correct predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    uncertainty: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics of one evaluation. probs: [N, C]; uncertainty: [N] (higher = less sure) or None."""
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[0] != len(y) or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be [N={len(y)}, C={len(classes)}], got {list(probs.shape)}")
    pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "top1": float((pred == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else 0.0,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    if uncertainty is not None:
        u = np.asarray(uncertainty, dtype=float)
        wrong = pred != y
        out["mean_uncertainty"] = float(u.mean()) if len(u) else 0.0
        # AUROC of u as a detector of misclassified samples (0.5 = uninformative)
        out["uncertainty_auroc"] = float(roc_auc_score(wrong, u)) if 0 < wrong.sum() < len(y) else None
    return out
