"""scripts/results_tables.py refuses to render when a grid's data folder is missing, instead of leaving every
row out as if it were of another protocol."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "results_tables.py"


def test_missing_data_folder_is_a_clear_error(tmp_path):
    grid = tmp_path / "grid.yaml"
    absent = tmp_path / "no-such-data"
    grid.write_text(
        "name: t\npreset: smoke\nseeds: [0]\nlabels: [0.1]\nways: [standard]\n"
        f"datasets:\n  - {{name: d, path: {absent}, pair: virtual-nbi}}\n"
        "methods:\n  - {name: supervised, label: Supervised, ways: [standard]}\n"
    )
    results = tmp_path / "table2.csv"
    results.write_text("dataset,method,cell,protocol\nd,supervised,d__supervised-standard__l10__s0,abc\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(results), str(grid)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert "data not found" in proc.stderr and str(absent) in proc.stderr
    assert proc.stdout == ""
