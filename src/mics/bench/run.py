"""Running a bench: expand and plan the cells, hand the unfinished ones to an executor (``local``: a
process pool on this machine; ``slurm``: jobs through submitit), keep ``OUT/bench.json``, and write the
results of every finished cell."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mics.bench.cells import Cell, expand_cells, select_cells
from mics.bench.grid import Grid, GridError
from mics.bench.paths import run_dir_of, write_text
from mics.bench.plan import Plan, Task, plan_cells, reusable_pretrainings
from mics.bench.protocol import ResultsFile, order_by_value, protocol_key
from mics.bench.results import collect_rows, write_results


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
    on_done: Callable[[str], None] | None = None  # called with a cell's id as soon as it has finished

    def finished(self, cell_id: str) -> None:
        if self.on_done is not None:
            self.on_done(cell_id)

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


def plan_bench(
    grid: Grid,
    out: Path,
    state: BenchState,
    *,
    only: Sequence[str] = (),
    overrides: Sequence[str] = (),
    data_paths: Mapping[str, str] | None = None,
    reuse: Sequence[str | Path] = (),
    results: str | Path | None = None,
    order: str = "grid",
    progress: bool = True,
    dry_run: bool = False,
) -> tuple[list[Cell], Plan, Callable[[str], None] | None]:
    """Every cell of the grid, the plan of the selected ones (in ``order``, less those ``results`` holds),
    and the hook that records a finished cell in ``results``. ``dry_run`` changes nothing on disk."""
    all_cells = expand_cells(grid, data_paths=data_paths, overrides=overrides)
    cells = select_cells(all_cells, only)
    if order not in ("grid", "value"):
        raise GridError(f"--order {order!r}: choose grid or value")
    if order == "value":
        cells = order_by_value(cells)
    on_done = None
    if results is not None:
        cells, on_done = _results_resume(cells, out, ResultsFile(results), state, progress, dry_run)
    plan = plan_cells(cells, out, all_cells=all_cells, reuse=reusable_pretrainings(reuse))
    return all_cells, plan, on_done


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
    results: str | Path | None = None,
    order: str = "grid",
) -> BenchResult:
    """Run every unfinished cell of ``grid`` (those matching ``only``) into ``out/runs`` with ``executor``
    (default: the local one, ``jobs`` cells at a time; MICS cells reuse matching pre-trainings found in
    ``reuse``), then write ``out/results.csv`` and ``out/results.md`` from all finished cells of the
    grid. ``order="value"`` runs the cells in :func:`~mics.bench.protocol.order_by_value`'s order;
    ``results`` (a CSV with protocol keys, e.g. ``results/milk10k/table2.csv``) skips the cells it holds at
    their current protocol and gets a row as each cell finishes (see :mod:`mics.bench.protocol`)."""
    from mics.bench.local import LocalExecutor

    executor = executor or LocalExecutor(jobs=jobs, poll_s=poll_s)
    out = Path(out)
    state = BenchState(out, grid, command)
    all_cells, plan, on_done = plan_bench(
        grid,
        out,
        state,
        only=only,
        overrides=overrides,
        data_paths=data_paths,
        reuse=reuse,
        results=results,
        order=order,
        progress=progress,
    )
    check_data(plan.tasks, grid)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        (out / "grid.yaml").write_text(grid.source.read_text(encoding="utf-8"), encoding="utf-8")
    state.save()
    if plan.done and progress:
        print(f"{len(plan.done)} cell(s) already finished; skipped", file=sys.stderr)
    outcome = executor.execute(
        list(plan.tasks), Execution(grid, out, state, python=python, progress=progress, on_done=on_done)
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


def _results_resume(
    cells: Sequence[Cell], out: Path, results: ResultsFile, state: BenchState, progress: bool, dry_run: bool
) -> tuple[list[Cell], Callable[[str], None]]:
    """The cells ``results`` does not hold at their current protocol key, and the hook that appends a
    finished cell's row. A run folder made under another protocol (or under none recorded) is moved
    aside to ``<cell>.stale`` so that the cell runs afresh; a finished one of the current protocol just
    gets its row."""
    keys = {c.id: protocol_key(c) for c in cells}
    by_id = {c.id: c for c in cells}
    current, stale = results.status(keys)

    def on_done(cid: str) -> None:
        rows = collect_rows([by_id[cid]], out)
        if rows:
            results.append(rows[0], keys[cid])

    todo = []
    for c in cells:
        if c.id in current:
            continue
        rd = run_dir_of(out, c)
        recorded = state.cells.get(c.id, {}).get("protocol")
        if dry_run:
            todo.append(c)
            continue
        if rd.exists() and recorded != keys[c.id]:
            target = rd.with_name(f"{rd.name}.stale")
            if target.exists():
                shutil.rmtree(target)
            rd.rename(target)
        elif (rd / "metrics.json").exists():
            on_done(c.id)
            continue
        state.cells.setdefault(c.id, {})["protocol"] = keys[c.id]
        todo.append(c)
    if progress:
        print(
            f"{results.path}: {len(current)} of {len(cells)} cell(s) done at the current protocol; "
            f"{len(stale)} stale (older protocol, run again){': ' + ', '.join(stale[:5]) if stale else ''}"
            f"{' ...' if len(stale) > 5 else ''}",
            file=sys.stderr,
        )
    return todo, on_done
