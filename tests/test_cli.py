"""End-to-end smoke tests of the command line on the real images bundled in the repository."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GI, MILK

FAST = ["--set", "pretrain.epochs=1", "--set", "finetune.epochs=1", "--set", "finetune.min_steps_per_epoch=2"]


def mics(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mics", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mics {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def milk_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "milk"
    mics("run", "--data", MILK, "--preset", "smoke", "--labels", "0.1", "--seed", "1", "--out", out, *FAST)
    return out


def test_run_writes_every_artefact(milk_run):
    for name in (
        "config.yaml",
        "run.json",
        "split.json",
        "labelled.json",
        "metrics.jsonl",
        "metrics.json",
        "report.md",
        "report.json",
        "pretrain/encoders.safetensors",
        "svd/dictionary.safetensors",
        "finetune/best.safetensors",
    ):
        assert (milk_run / name).exists(), name
    metrics = json.loads((milk_run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("top1", "balanced_accuracy", "macro_f1", "per_class", "confusion"):
            assert key in metrics[split]
    run = json.loads((milk_run / "run.json").read_text())
    assert run["pair"] == "suffix:clinical,dermoscopic" and len(run["classes"]) == 5
    assert run["n_labelled"] == 5 * round(0.1 * run["n_train"] / 5)
    stages = {json.loads(line)["stage"] for line in (milk_run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"pretrain", "finetune"}


def test_predict_json_and_csv_with_partners_and_a_bad_image(milk_run, tmp_path):
    a = sorted((MILK / "NV").glob("*__clinical.jpg"))[:2]
    b = [p.with_name(p.name.replace("clinical", "dermoscopic")) for p in a]
    bad = tmp_path / "broken__clinical.jpg"
    bad.write_bytes(b"not an image")
    out = json.loads(
        mics("predict", "--run", milk_run, *a, bad, *(x for p in (*b, b[0]) for x in ("--partner", p))).stdout
    )
    assert len(out) == 3 and "error" in out[2] and "broken" in out[2]["error"]
    for row in out[:2]:
        assert row["class"] in row["probabilities"]
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
        assert 0.0 <= row["uncertainty"] <= 1.0
    rows = list(
        csv.DictReader(
            io.StringIO(mics("predict", "--run", milk_run, a[0], "--partner", b[0], "--format", "csv").stdout)
        )
    )
    assert rows[0]["class"] == out[0]["class"]


def test_predict_on_real_pairs_requires_partners(milk_run):
    proc = mics("predict", "--run", milk_run, sorted((MILK / "NV").glob("*.jpg"))[0], check=False)
    assert proc.returncode == 2 and "--partner" in proc.stderr and "Traceback" not in proc.stderr


def test_virtual_nbi_run_predicts_from_wli_only(tmp_path):
    out = tmp_path / "gi"
    mics("run", "--data", GI, "--preset", "smoke", "--labels", "0.3", "--out", out, *FAST)
    assert json.loads((out / "run.json").read_text())["pair"] == "virtual-nbi"
    rows = json.loads(mics("predict", "--run", out, sorted((GI / "polyps").glob("*.jpg"))[0]).stdout)
    assert rows[0]["class"] in ("normal-cecum", "polyps") and rows[0]["partner"] is None


def test_stage_commands_rerun_on_a_run_folder(milk_run):
    mics("svd", "--run", milk_run)
    mics("evaluate", "--run", milk_run)
    assert json.loads((milk_run / "metrics.json").read_text())["test"]["n"] > 0


def test_existing_run_folder_needs_resume(milk_run):
    proc = mics("run", "--data", MILK, "--preset", "smoke", "--out", milk_run, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = mics("run", "--data", MILK, "--preset", "smoke", "--out", milk_run, "--resume")
    assert "already done" in proc.stderr


def test_a_run_folder_with_a_pickled_model_runs_no_code(milk_run, tmp_path):
    """A shared run folder whose weights were swapped for a pickle is refused before anything is unpickled."""
    import pickle
    import shutil

    evil_run = tmp_path / "evil"
    shutil.copytree(milk_run, evil_run)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (evil_run / "finetune" / "best.safetensors").write_bytes(pickle.dumps({"model": Payload()}))
    proc = mics(
        "predict",
        "--run",
        evil_run,
        sorted((MILK / "NV").glob("*__clinical.jpg"))[0],
        "--partner",
        sorted((MILK / "NV").glob("*__dermoscopic.jpg"))[0],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "corrupt" in proc.stderr or "safetensors" in proc.stderr
    assert not marker.exists()


def test_yaml_config_with_python_tags_is_refused(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("preset: !!python/object/apply:os.system ['touch " + str(tmp_path / "executed") + "']\n")
    proc = mics("run", "--data", MILK, "--config", bad, "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and not (tmp_path / "executed").exists()


def test_demo_runs_mics_and_supervised_on_the_bundled_sample_and_writes_a_report(tmp_path):
    """`make demo` is `mics demo` at the cpu preset; the same command at the smoke preset, from another
    working directory (the bundled sample is found from the package, not the current folder)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mics", "demo", "--preset", "smoke", "--out", str(out), *FAST],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {"mics", "supervised"} <= set(json.dumps(report).split('"')) and (out / "report.md").exists()
    assert (out / "mics" / "metrics.json").exists() and (out / "supervised" / "metrics.json").exists()
    assert "MICS" in proc.stdout or "mics" in proc.stdout


def test_figures_from_a_results_file(tmp_path):
    from tests.eval.test_figures import fake_bench

    root = fake_bench(tmp_path / "bench")
    proc = mics("figures", "--results", root / "results.csv", "--grid", root / "grid.yaml")
    assert proc.stdout.splitlines() == [str(root / "figures" / "d" / "label_efficiency.png")]
    assert (root / "figures" / "d" / "label_efficiency.png").stat().st_size > 0
    for args, message in (
        ((), "error: give --bench or --results (one of them)"),
        (
            ("--bench", root, "--results", root / "results.csv"),
            "error: give --bench or --results (one of them)",
        ),
        (("--bench", root, "--grid", root / "grid.yaml"), "error: --grid goes with --results"),
        (("--bench", root, "--runs", root / "runs"), "error: --runs goes with --results"),
        (
            ("--results", root / "results.csv", "--runs", tmp_path),
            f"error: {tmp_path} keeps none of the runs of {root / 'results.csv'}'s rows",
        ),
    ):
        proc = mics("figures", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
