"""scripts/gpu_grid.sh rehearsed on CPU: its dry run lists the missing cells of a results file with the
commands it would start on the GPU, and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_grid.sh"


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
    )


def test_dry_run_lists_the_missing_cells_for_the_gpu(tmp_path):
    results = tmp_path / "table2.csv"
    proc = _script(
        "--dry-run",
        "--jobs",
        "4",
        "configs/table2-smoke.yaml",
        str(results),
        "--",
        "--only",
        "milk10k__mics__*",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "4 cell(s) at once" in lines[0]
    assert any(ln.startswith("milk10k__mics__l10__s0 ") and "--set device=cuda" in ln for ln in lines)
    assert lines[-1].startswith("1 cells: 0 done, 0 to resume, 1 new")
    assert not results.exists() and not (REPO / "runs" / "gpu" / "table2-smoke" / "runs").exists()


def test_usage_errors_exit_2():
    assert _script("--dry-run").returncode == 2
    proc = _script("--dry-run", "configs/nope.yaml", "x.csv")
    assert proc.returncode == 2 and "not found" in proc.stderr
