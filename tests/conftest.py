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
