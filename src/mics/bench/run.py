"""Running a bench: expand and plan the cells, hand the unfinished ones to an executor (``local``: a
process pool on this machine; ``slurm``: jobs through submitit), keep ``OUT/bench.json``, and write the
results of every finished cell."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mics.bench.cells import expand_cells, select_cells
from mics.bench.grid import Grid
from mics.bench.paths import run_dir_of, write_text
from mics.bench.plan import Task, plan_cells, reusable_pretrainings
from mics.bench.results import write_results


@dataclass
class BenchResult:
    done: list[str]  # cells finished before or during this bench
    ran: list[str]  # cells finished by this bench
    failed: dict[str, str]  # cell id -> reason
    results_csv: Path
    results_md: Path
    submitted: dict[str, str] = field(default_factory=dict)  # cell id -> job id, still queued or running


_ERROR_LINE = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")


def last_error(log: Path) -> str:
    """The line of a cell's log that says why it failed: the CLI's ``error: ...`` message or the last
    exception of a traceback (the log ends with the traceback of a crash)."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if ln]
    found = next((ln for ln in reversed(lines) if _ERROR_LINE.match(ln)), lines[-1] if lines else "empty log")
    return found[:300]


class BenchState:
    """``OUT/bench.json``: per-cell bookkeeping kept across benches (where a cell's pre-training came from,
    its last exit status and log, the executor and job id that ran it)."""

    def __init__(self, out: Path, grid: Grid | None = None, command: str = "") -> None:
        self.path = out / "bench.json"
        old = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        self.data: dict[str, Any] = {
            "grid": grid.name if grid else old.get("grid"),
            "grid_file": (str(grid.source) if grid.source else None) if grid else old.get("grid_file"),
            "command": command or old.get("command", ""),
            "cells": old.get("cells", {}),
        }

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def update(self, cell_id: str, **values: Any) -> None:
        # re-read first: benches over disjoint --only selections may share the folder (one per GPU)
        if self.path.exists():
            self.data["cells"] = json.loads(self.path.read_text(encoding="utf-8")).get("cells", {})
        self.data["cells"].setdefault(cell_id, {}).update(values)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_text(self.path, json.dumps(self.data, indent=2) + "\n")


@dataclass
class Execution:
    """What an executor is given besides the tasks: the bench folder and its bookkeeping."""

    grid: Grid
    out: Path
    state: BenchState
    python: str | None = None  # the interpreter of the cells (tests use a fake one)
    progress: bool = True

    def log_of(self, cell_id: str) -> Path:
        return self.out / "logs" / f"{cell_id}.log"


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)


class Executor(Protocol):
    """Runs (or submits) the unfinished cells of a bench. A task's ``waits_for`` names the cell whose
    pre-training it reuses: it must not start before that cell's encoders exist, and it cannot run when
    that cell failed."""

    name: str

    def execute(self, tasks: list[Task], ex: Execution) -> Outcome: ...


def check_data(tasks: Sequence[Task], grid: Grid) -> None:
    missing = {}
    for t in tasks:
        if not Path(t.cell.data).is_dir() and not Path(t.cell.data).is_file():
            missing[t.cell.dataset] = t.cell.data
    if missing:
        from mics.data.errors import DataError

        hints = "; ".join(
            f"{name}: {path!r} (grid path {grid.dataset(name).path!r})" for name, path in missing.items()
        )
        raise DataError(
            f"data not found for {hints}. Set the environment variable named in the grid or pass "
            "--set-data NAME=PATH"
        )


def run_bench(
    grid: Grid,
    out: str | Path,
    *,
    jobs: int = 1,
    only: Sequence[str] = (),
    overrides: Sequence[str] = (),
    data_paths: Mapping[str, str] | None = None,
    reuse: Sequence[str | Path] = (),
    python: str | None = None,
    poll_s: float = 0.5,
    progress: bool = True,
    command: str = "",
    executor: Executor | None = None,
) -> BenchResult:
    """Run every unfinished cell of ``grid`` (those matching ``only``) into ``out/runs`` with ``executor``
    (default: the local one, ``jobs`` cells at a time; MICS cells reuse matching pre-trainings found in
    ``reuse``), then write ``out/results.csv`` and ``out/results.md`` from all finished cells of the
    grid."""
    from mics.bench.local import LocalExecutor

    executor = executor or LocalExecutor(jobs=jobs, poll_s=poll_s)
    out = Path(out)
    all_cells = expand_cells(grid, data_paths=data_paths, overrides=overrides)
    cells = select_cells(all_cells, only)
    plan = plan_cells(cells, out, all_cells=all_cells, reuse=reusable_pretrainings(reuse))
    check_data(plan.tasks, grid)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        (out / "grid.yaml").write_text(grid.source.read_text(encoding="utf-8"), encoding="utf-8")
    state = BenchState(out, grid, command)
    state.save()
    if plan.done and progress:
        import sys

        print(f"{len(plan.done)} cell(s) already finished; skipped", file=sys.stderr)
    outcome = executor.execute(
        list(plan.tasks), Execution(grid, out, state, python=python, progress=progress)
    )
    csv_path, md_path = write_results(grid, out, all_cells)
    done = [c.id for c in all_cells if (run_dir_of(out, c) / "metrics.json").exists()]
    return BenchResult(
        done=done,
        ran=outcome.ran,
        failed=outcome.failed,
        results_csv=csv_path,
        results_md=md_path,
        submitted=outcome.submitted,
    )
