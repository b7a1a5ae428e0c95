"""Every baseline in both ways runs from the command line on the bundled real images (smoke preset)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mics.cli import app
from mics.pipeline import BASELINE_METHODS, WAYS
from tests.conftest import GI, MILK
from tests.test_cli import mics


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_smoke(tmp_path, method, way):
    # in-process through typer's runner: the same command line, without paying the imports 16 times
    out = tmp_path / f"{method}-{way}"
    result = CliRunner().invoke(
        app,
        [
            "baseline",
            "--method",
            method,
            "--way",
            way,
            "--data",
            str(MILK),
            "--preset",
            "smoke",
            "--labels",
            "0.1",
            "--seed",
            "1",
            "--out",
            str(out),
            "--set",
            "ssl.iterations=3",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["way"] == way and metrics["iterations"] == 3
    for key in ("top1", "balanced_accuracy", "macro_f1", "per_class", "confusion"):
        assert key in metrics["test"]


def test_baselines_share_the_mics_split(tmp_path):
    mics(
        "run",
        "--data",
        MILK,
        "--preset",
        "smoke",
        "--seed",
        "4",
        "--out",
        tmp_path / "mics",
        "--set",
        "pretrain.epochs=1",
        "--set",
        "finetune.epochs=1",
        "--set",
        "finetune.min_steps_per_epoch=1",
    )
    mics(
        "baseline",
        "--method",
        "fixmatch",
        "--data",
        MILK,
        "--preset",
        "smoke",
        "--seed",
        "4",
        "--out",
        tmp_path / "fm",
        "--set",
        "ssl.iterations=2",
    )
    assert (tmp_path / "mics" / "split.json").read_text() == (tmp_path / "fm" / "split.json").read_text()
    assert (
        json.loads((tmp_path / "mics" / "labelled.json").read_text())["indices"]
        == json.loads((tmp_path / "fm" / "labelled.json").read_text())["indices"]
    )


def test_unknown_method_is_a_clear_error(tmp_path):
    proc = mics(
        "baseline",
        "--method",
        "mixmatch",
        "--data",
        MILK,
        "--preset",
        "smoke",
        "--out",
        tmp_path / "x",
        check=False,
    )
    assert proc.returncode == 2 and "fixmatch" in proc.stderr and "Traceback" not in proc.stderr


def test_fixmatch_uses_unlabelled_real_images(tmp_path):
    """A few hundred FixMatch steps on real GI images: confident pseudo-labels appear and are mostly right.

    The smoke model (width 32, one block) does not reach FixMatch's 0.95 confidence within 300 steps, so
    the threshold is 0.8 here; the mechanism under test (confident weak predictions -> masked loss on the
    strong view) is the same.
    """
    out = tmp_path / "fm"
    mics(
        "baseline",
        "--method",
        "fixmatch",
        "--data",
        GI,
        "--preset",
        "smoke",
        "--labels",
        "0.2",
        "--out",
        out,
        "--set",
        "ssl.iterations=300",
        "--set",
        "ssl.batch_size=8",
        "--set",
        "finetune.epochs=6",
        "--set",
        "ssl.lr=3e-3",
        "--set",
        "ssl.threshold=0.8",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all("pseudo_acc" in r and "mask_rate" in r for r in records)
    late = records[-1]
    print(
        f"FixMatch on GI: mask rate {late['mask_rate']:.3f}, pseudo-label accuracy {late['pseudo_acc']:.3f}"
    )
    assert late["mask_rate"] > 0.0 and late["l_unsup"] > 0.0
    assert late["pseudo_acc"] > 0.6
