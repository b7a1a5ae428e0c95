"""Crash safety: a run killed with SIGKILL and resumed reaches exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import MILK

SETTINGS = [
    "--preset",
    "smoke",
    "--labels",
    "0.2",
    "--seed",
    "3",
    "--set",
    "pretrain.epochs=3",
    "--set",
    "finetune.epochs=3",
    "--set",
    "finetune.min_steps_per_epoch=3",
]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mics", "run", "--data", str(MILK), "--out", str(out), *SETTINGS, *extra]


def _epochs_logged(out: Path, stage: str) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(json.loads(line)["stage"] == stage for line in path.read_text().splitlines() if line.strip())


def _assert_no_epoch_trained_twice(out: Path) -> None:
    """Each epoch is logged once it is checkpointed, so a resumed run that started a stage over would log
    its early epochs a second time (an epoch killed between its checkpoint and its record is not logged)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = [(r["stage"], r["epoch"]) for r in records]
    assert len(keys) == len(set(keys)), f"epochs logged twice: {keys}"
    assert {k[0] for k in keys} == {"pretrain", "finetune"}


def _kill_after(out: Path, stage: str, epochs: int) -> None:
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _epochs_logged(out, stage) < epochs and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_then_resume_gives_identical_metrics(tmp_path):
    subprocess.run(_cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())

    cut = tmp_path / "cut"
    _kill_after(cut, "pretrain", 1)  # in the middle of pre-training
    assert not (cut / "metrics.json").exists()
    subprocess.run(_cmd(cut, "--resume"), check=True, capture_output=True, timeout=300)
    got = json.loads((cut / "metrics.json").read_text())
    _assert_no_epoch_trained_twice(cut)
    for split in ("val", "test"):
        assert got[split]["confusion"] == expected[split]["confusion"]
        assert got[split]["top1"] == expected[split]["top1"]
        assert got[split]["mean_uncertainty"] == expected[split]["mean_uncertainty"]


def test_kill_9_during_finetuning_then_resume(tmp_path):
    subprocess.run(_cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = tmp_path / "cut"
    _kill_after(cut, "finetune", 1)
    subprocess.run(_cmd(cut, "--resume"), check=True, capture_output=True, timeout=300)
    got = json.loads((cut / "metrics.json").read_text())
    _assert_no_epoch_trained_twice(cut)
    assert got["test"]["confusion"] == expected["test"]["confusion"]
    assert got["test"]["mean_uncertainty"] == expected["test"]["mean_uncertainty"]
