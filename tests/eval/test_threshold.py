"""The val-chosen low-confidence threshold on the uncertainty."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mics.eval.threshold import choose_threshold, flag_summary, read_threshold, write_threshold


def test_separable_errors_get_a_threshold_between_right_and_wrong():
    u = np.array([0.1, 0.2, 0.3, 0.6, 0.7])
    wrong = np.array([False, False, False, True, True])
    t, score = choose_threshold(u, wrong)
    assert t == pytest.approx(0.45) and score == 1.0
    s = flag_summary(u, wrong, t)
    assert s["flagged"] == 2 and s["error_rate_flagged"] == 1.0 and s["error_rate_not_flagged"] == 0.0


def test_the_best_balanced_accuracy_wins_and_ties_keep_the_highest_threshold():
    u = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    wrong = np.array([False, True, False, False, True, False])
    t, score = choose_threshold(u, wrong)
    flagged = u > t
    tpr, tnr = flagged[wrong].mean(), (~flagged[~wrong]).mean()
    assert score == pytest.approx((tpr + tnr) / 2)
    for c in np.linspace(0, 1, 101):
        f = u > c
        assert (f[wrong].mean() + (~f[~wrong]).mean()) / 2 <= score + 1e-12
    # 0.15 and 0.45 reach the same score; the higher one flags fewer images
    assert t == pytest.approx(0.45)


def test_no_errors_flags_nothing_seen_and_all_errors_flags_everything():
    u = np.array([0.2, 0.4, 0.3])
    assert choose_threshold(u, np.zeros(3, bool)) == (0.4, None)
    t, score = choose_threshold(u, np.ones(3, bool))
    assert score is None and (u > t).all()


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        choose_threshold(np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError):
        choose_threshold(np.zeros(0), np.zeros(0, bool))


def test_written_from_the_val_predictions_and_reported_on_test(tmp_path):
    assert write_threshold(tmp_path) is None and read_threshold(tmp_path) is None
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 0, 0, 1])  # the last two are wrong
    u = np.array([0.1, 0.2, 0.5, 0.6])
    np.savez(tmp_path / "val_predictions.npz", probs=probs, uncertainty=u, labels=labels)
    np.savez(tmp_path / "test_predictions.npz", probs=probs, uncertainty=u[::-1], labels=labels)
    record = write_threshold(tmp_path)
    assert record is not None and record["threshold"] == pytest.approx(0.35)
    assert record["val"]["errors_caught"] == 1.0 and record["test"]["errors_caught"] == 0.0
    assert json.loads((tmp_path / "uncertainty_threshold.json").read_text()) == read_threshold(tmp_path)
