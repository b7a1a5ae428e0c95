"""Shared fixtures: paths of the real images bundled in the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
MILK = SAMPLE / "milk10k-5class"
GI = SAMPLE / "hyperkvasir-2class"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # tests must not read or write the user's image cache
    os.environ["MICS_CACHE"] = str(tmp_path_factory.mktemp("mics-cache"))


@pytest.fixture(scope="session")
def milk_dir() -> Path:
    return MILK


@pytest.fixture(scope="session")
def gi_dir() -> Path:
    return GI


def run_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a fixture trains its run: a fresh temporary folder, or, when ``MICS_TEST_RUN_CACHE`` names a
    folder, ``<that folder>/<name>``, kept across pytest sessions (a finished run there is used as it is).
    ``scripts/mutation.py`` sets it for modules that take no part in training a run (``predict``), so that
    the tests of each mutant reuse one run instead of training it again."""
    cache = os.environ.get("MICS_TEST_RUN_CACHE")
    return Path(cache) / name if cache else tmp_path_factory.mktemp("smoke-runs") / name


def _smoke_run(out: Path, data: Path, labels: str) -> Path:
    """A finished smoke-preset MICS run (seconds): for tests that need a trained run folder."""
    import subprocess
    import sys

    if (out / "metrics.json").exists():  # only in MICS_TEST_RUN_CACHE (see run_folder)
        return out

    fast = [
        "--set",
        "pretrain.epochs=1",
        "--set",
        "finetune.epochs=1",
        "--set",
        "finetune.min_steps_per_epoch=2",
    ]
    args = ["run", "--data", str(data), "--preset", "smoke", "--labels", labels, "--out", str(out), *fast]
    proc = subprocess.run([sys.executable, "-m", "mics", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"mics {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def gi_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke run on the HyperKvasir sample: white-light images with a generated (virtual NBI) partner."""
    return _smoke_run(run_folder(tmp_path_factory, "gi"), GI, "0.3")


@pytest.fixture(scope="session")
def milk_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke run on the MILK10k sample: real clinical + dermoscopic pairs."""
    return _smoke_run(run_folder(tmp_path_factory, "milk"), MILK, "0.1")
