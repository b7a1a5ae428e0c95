from __future__ import annotations

import numpy as np
import pytest

from mics.eval.metrics import classification_metrics, expected_calibration_error


def test_metrics_on_a_hand_computed_example():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 0]
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = classification_metrics(
        y, probs, ["a", "b", "c"], uncertainty=np.array([0.1, 0.1, 0.9, 0.2, 0.2, 0.8])
    )
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # F1: a: p=2/3 r=2/3 -> 2/3 ; b: p=2/3 r=1 -> 0.8 ; c: 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"]["support"] == 2
    assert m["uncertainty_auroc"] == pytest.approx(1.0)  # both errors have the highest uncertainty


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model():
    probs = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 0])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.75)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.ones((3, 2)), ["a", "b"])
