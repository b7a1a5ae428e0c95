"""Model cards: written by 'mics run', rewritten by 'mics card', built from the run folder's own numbers."""

from __future__ import annotations

import json
import sys

import pytest

from mics.card import model_card, wilson_interval


def test_mics_run_writes_a_card_with_the_runs_numbers(gi_smoke_run):
    card = (gi_smoke_run / "model_card.md").read_text()
    metrics = json.loads((gi_smoke_run / "metrics.json").read_text())
    meta = json.loads((gi_smoke_run / "run.json").read_text())
    threshold = json.loads((gi_smoke_run / "uncertainty_threshold.json").read_text())
    for cls in meta["classes"]:
        assert cls in card
    assert f"## Metrics (seed {metrics['seed']})" in card
    assert f"{meta['n_train']} / {meta['n_val']} / {meta['n_test']}" in card
    assert f"{100 * meta['labels']:g} % of the training split labelled" in card
    assert f"| test | {metrics['test']['n']} | {100 * metrics['test']['top1']:.1f} %" in card
    assert f"test {metrics['test']['ece']:.3f}" in card
    auroc = metrics["test"]["uncertainty_auroc"]
    assert f"test {'n/a' if auroc is None else f'{auroc:.3f}'}." in card
    assert f"u > **{threshold['threshold']:.4f}**" in card
    assert "Research use only" in card and "virtual NBI" in card and "not real narrow-band" in card


def test_real_pair_runs_do_not_claim_a_virtual_partner(milk_smoke_run):
    card = model_card(milk_smoke_run)
    assert "a real second image of each sample" in card and "not real narrow-band" not in card


def test_mics_card_rewrites_the_card(gi_smoke_run, capsys):
    from mics.cli import main

    (gi_smoke_run / "model_card.md").unlink()
    argv, sys.argv = sys.argv, ["mics", "card", "--run", str(gi_smoke_run)]
    try:
        main()
    finally:
        sys.argv = argv
    assert capsys.readouterr().out.strip() == str(gi_smoke_run / "model_card.md")
    assert (gi_smoke_run / "model_card.md").read_text().startswith("# Model card")


def test_a_card_needs_an_evaluated_run(tmp_path):
    from mics.pipeline import RunError

    with pytest.raises(RunError, match="metrics.json"):
        model_card(tmp_path)


def test_wilson_interval_contains_the_proportion_and_narrows_with_n():
    lo, hi = wilson_interval(40, 80)
    assert lo < 0.5 < hi
    lo2, hi2 = wilson_interval(400, 800)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
