"""Planning: which cells are finished, which resume, and which pre-training each MICS cell uses (its
own, one that another cell of the grid is making, or a finished one found by ``--reuse``)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mics.bench.cells import Cell, _pretrain_key
from mics.bench.grid import MICS, GridError
from mics.bench.paths import has_encoders, run_dir_of
from mics.config import ConfigError, load_yaml


def recorded_pretrain_key(run_dir: Path) -> str | None:
    """The pre-training key of a MICS run folder with finished encoders, from what the run recorded
    (``run.json`` and the resolved ``config.yaml``); None for anything else. A run that dropped bad files
    counts as ``--skip-bad``; one that did not matches only cells without it, so a key never matches a
    pre-training on other data."""
    run_dir = Path(run_dir)
    if not has_encoders(run_dir) or not (run_dir / "config.yaml").is_file():
        return None
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        if info.get("method") != MICS:
            return None
        return _pretrain_key(
            str(info["data"]),
            str(info["pair"]),
            int(info["seed"]),
            (run_dir / "dropped.csv").exists(),
            load_yaml(run_dir / "config.yaml"),
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None


def reusable_pretrainings(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Pre-training key -> run folder, over finished MICS pre-trainings in ``paths`` (bench folders, whose
    ``runs/*`` are scanned, or single run folders), for ``mics bench --reuse``."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / "run.json").is_file():
            candidates = [path]
        elif (path / "runs").is_dir():
            candidates = sorted(p for p in (path / "runs").iterdir() if p.is_dir())
        else:
            raise GridError(
                f"--reuse {path}: neither a bench folder (with runs/) nor a run folder (with run.json)"
            )
        for rd in candidates:
            key = recorded_pretrain_key(rd)
            if key is not None:
                found.setdefault(key, rd)
    return found


@dataclass
class Task:
    """A cell that still has to run, and where its pre-trained encoders come from."""

    cell: Cell
    run_dir: Path
    resume: bool  # the run folder exists: continue it
    pretrained: Path | None = None  # a finished pre-training to reuse
    waits_for: str | None = None  # the id of the cell whose pre-training this one will reuse

    @property
    def role(self) -> str:
        if self.cell.method != MICS:
            return "-"
        if self.pretrained is not None:
            return f"reuses {self.pretrained.name}"
        if self.waits_for is not None:
            return f"reuses {self.waits_for}"
        if self.cell.config().pretrain.epochs == 0:
            return "no pre-training (random init)"
        return "pre-trains"


@dataclass
class Plan:
    done: list[Cell]
    tasks: list[Task]

    @property
    def n_pretrainings(self) -> int:
        return sum(1 for t in self.tasks if t.cell.method == MICS and t.role == "pre-trains")


def plan_cells(
    cells: Sequence[Cell],
    out: Path,
    *,
    all_cells: Sequence[Cell] | None = None,
    reuse: Mapping[str, Path] | None = None,
) -> Plan:
    """Which cells are finished, which resume, and which pre-training each MICS cell uses.

    A finished pre-training of any grid cell (``all_cells``, not only the selected ones) or of ``reuse``
    (key -> run folder elsewhere, see :func:`reusable_pretrainings`) with the same pre-training key is
    reused; otherwise the first selected cell of that key pre-trains and the others wait for its encoders.
    """
    out = Path(out)
    own: dict[str, Path] = {}
    for c in all_cells if all_cells is not None else cells:
        if c.pretrain_key and c.pretrain_key not in own and has_encoders(run_dir_of(out, c)):
            own[c.pretrain_key] = run_dir_of(out, c)
    sources = {**(reuse or {}), **own}
    owners: dict[str, str] = {}
    done: list[Cell] = []
    tasks: list[Task] = []
    for c in cells:
        rd = run_dir_of(out, c)
        if (rd / "metrics.json").exists():
            done.append(c)
            continue
        task = Task(c, rd, resume=(rd / "run.json").exists())
        if c.pretrain_key is not None and not has_encoders(rd):
            if c.pretrain_key in sources:
                task.pretrained = sources[c.pretrain_key]
            elif c.pretrain_key in owners:
                task.waits_for = owners[c.pretrain_key]
            else:
                owners[c.pretrain_key] = c.id
        tasks.append(task)
    return Plan(done, tasks)


def describe_plan(plan: Plan, out: Path, *, python: str | None = None) -> str:
    """The ``--dry-run`` listing: one line per cell with its state and command, then a summary."""
    lines = [f"{'cell':<58} {'state':<7} pre-training / command"]
    for c in plan.done:
        lines.append(f"{c.id:<58} {'done':<7} {run_dir_of(out, c) / 'metrics.json'}")
    for t in plan.tasks:
        pretrained = t.pretrained or (run_dir_of(out, t.waits_for) if t.waits_for else None)
        cmd = shlex.join(t.cell.command(t.run_dir, resume=t.resume, pretrained=pretrained, python=python))
        lines.append(f"{t.cell.id:<58} {'resume' if t.resume else 'new':<7} [{t.role}] {cmd}")
    n_resume = sum(t.resume for t in plan.tasks)
    lines.append(
        f"{len(plan.done) + len(plan.tasks)} cells: {len(plan.done)} done, {n_resume} to resume, "
        f"{len(plan.tasks) - n_resume} new; {plan.n_pretrainings} MICS pre-training(s) to run"
    )
    return "\n".join(lines)
