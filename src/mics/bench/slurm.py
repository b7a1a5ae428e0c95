"""The ``slurm`` executor: every unfinished cell as a Slurm job through submitit, in job arrays with a
concurrency limit; a MICS cell that reuses another cell's pre-training depends on that cell's job
(``afterok``); jobs are requeued on pre-emption or timeout and resume from the run folder's last epoch
checkpoint. ``mics bench --status`` / ``--cancel`` look at and cancel the jobs of a bench folder.

submitit is an optional dependency (``pip install 'mics[cluster]'``). Its ``local`` and ``debug`` backends
run the same jobs on this machine (what the tests do)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mics.bench.grid import GridError
from mics.bench.launch import CellJob
from mics.bench.paths import run_dir_of
from mics.bench.plan import Task
from mics.bench.run import BenchState, Execution, Outcome, last_error

BACKENDS = ("slurm", "local", "debug")
# sacct states of a job that will still run (a requeued job is PENDING or REQUEUED again)
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def parse_time(text: str) -> int:
    """Slurm's time formats (``90``, ``4:00:00``, ``1-12:00:00``, ``30:00``) in minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not m:
        raise GridError(f"--time {text!r}: use minutes (90), H:MM:SS (4:00:00) or D-HH:MM:SS (1-12:00:00)")
    days, parts = int(m[1] or 0), [int(x) for x in m[2].split(":")]
    if m[1]:  # D-H, D-H:M, D-H:M:S
        h, mi, sec = (parts + [0, 0])[:3]
    elif len(parts) < 3:  # M or M:S
        h, mi, sec = 0, parts[0], parts[1] if len(parts) == 2 else 0
    else:
        h, mi, sec = parts
    return days * 24 * 60 + h * 60 + mi + (1 if sec else 0)


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of every cell's job. ``gpus`` is per node; one task (process) runs per GPU."""

    partition: str | None = None
    time_min: int = 24 * 60
    nodes: int = 1
    gpus: int = 1
    cpus: int = 8  # per task
    mem_gb: int | None = None
    array_limit: int = 32  # jobs of one array running at once
    extra: Mapping[str, str] = field(default_factory=dict)  # further sbatch options (account, qos, ...)

    def __post_init__(self) -> None:
        for name in ("time_min", "nodes", "cpus", "array_limit"):
            if getattr(self, name) < 1:
                raise GridError(f"slurm option {name} must be at least 1, got {getattr(self, name)}")
        if self.gpus < 0:
            raise GridError(f"--gpus must be 0 or more, got {self.gpus}")

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus)

    def parameters(self, name: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus,
            "cpus_per_task": self.cpus,
            "slurm_array_parallelism": self.array_limit,
            "slurm_signal_delay_s": 120,
        }
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        return params


class SlurmExecutor:
    """Submit the tasks, record their job ids in ``bench.json`` and return (``wait``: poll until every
    job has ended, then report what finished and what failed)."""

    name = "slurm"

    def __init__(
        self,
        options: SlurmOptions | None = None,
        *,
        backend: str = "slurm",
        wait: bool = False,
        poll_s: float = 30.0,
    ) -> None:
        if backend not in BACKENDS:
            raise GridError(f"unknown submitit backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.options = options or SlurmOptions()
        self.backend = backend
        self.wait = wait
        self.poll_s = poll_s

    def _executor(self, folder: Path, name: str, dependency: str | None) -> Any:
        try:
            import submitit
        except ImportError:
            raise GridError(
                "the slurm executor needs submitit: pip install 'mics[cluster]' (or pip install submitit)"
            ) from None
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=self.backend)
        params = self.options.parameters(name)
        extra = dict(self.options.extra)
        if dependency:
            params["slurm_dependency"] = dependency
            # a dependency that can never be met (its pre-training failed) cancels the job
            extra.setdefault("kill-on-invalid-dep", "yes")
        if extra:
            params["slurm_additional_parameters"] = extra
        if self.backend != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
            params.pop("nodes", None)
        executor.update_parameters(**params)
        return executor

    def _submit(self, tasks: Sequence[Task], ex: Execution, dependency: str | None) -> dict[str, Any]:
        executor = self._executor(ex.out / "slurm", f"mics-{ex.grid.name}", dependency)
        jobs: dict[str, Any] = {}
        with executor.batch():
            for t in tasks:
                # resume is decided when the job starts (and again after each requeue)
                cmd = t.cell.command(t.run_dir, pretrained=t.pretrained, python=ex.python)
                jobs[t.cell.id] = executor.submit(
                    CellJob(t.cell.id, cmd, str(t.run_dir), str(ex.log_of(t.cell.id)))
                )
        for t in tasks:
            ex.state.update(
                t.cell.id,
                status="submitted",
                executor=f"{self.name}/{self.backend}",
                job_id=str(jobs[t.cell.id].job_id),
                resumed=t.resume,
                pretrained_from=str(t.pretrained) if t.pretrained else None,
                log=str(ex.log_of(t.cell.id)),
                submitted=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
        return jobs

    def _still_queued(self, tasks: Sequence[Task], ex: Execution) -> dict[str, str]:
        """Cell id -> job id of the tasks whose job from an earlier submission is still pending or
        running: submitting the same command again does not run a cell twice."""
        if self.backend != "slurm":
            return {}
        ids = {t.cell.id: str(ex.state.cells.get(t.cell.id, {}).get("job_id") or "") for t in tasks}
        states = _slurm_states([j for j in ids.values() if j])
        return {cid: j for cid, j in ids.items() if j and states.get(j) in _ACTIVE}

    def execute(self, tasks: list[Task], ex: Execution) -> Outcome:
        outcome = Outcome()
        queued = self._still_queued(tasks, ex)
        tasks = [t for t in tasks if t.cell.id not in queued]
        if not tasks:
            outcome.submitted = queued
            return outcome
        first = [t for t in tasks if t.waits_for is None]
        dependents: dict[str, list[Task]] = {}
        for t in tasks:
            if t.waits_for is not None:
                t.pretrained = run_dir_of(ex.out, t.waits_for)
                dependents.setdefault(t.waits_for, []).append(t)
        jobs = self._submit(first, ex, None) if first else {}
        for owner, group in dependents.items():
            if owner in queued:
                owner_id = queued[owner]
            else:
                owner_id = jobs[owner].job_id
                if self.backend != "slurm":
                    # submitit's local backends know no dependencies: wait for the owner here instead
                    _wait_quietly(jobs[owner])
            jobs.update(self._submit(group, ex, f"afterok:{owner_id}"))
        if ex.progress:
            print(
                f"submitted {len(jobs)} cell(s) to {self.backend} (job ids in {ex.state.path}); "
                f"follow with: mics bench --status --out {ex.out}",
                flush=True,
            )
        if not self.wait:
            outcome.submitted = {**queued, **{cid: str(job.job_id) for cid, job in jobs.items()}}
            return outcome
        for cid, job in jobs.items():
            _wait_quietly(job, self.poll_s)
            if (run_dir_of(ex.out, cid) / "metrics.json").exists():
                outcome.ran.append(cid)
                ex.state.update(cid, status="done")
                ex.finished(cid)
            else:
                outcome.failed[cid] = last_error(ex.log_of(cid))
                ex.state.update(cid, status="failed")
        return outcome


def _wait_quietly(job: Any, poll_s: float = 1.0) -> None:
    """Until ``job`` has ended, however it ended (a failure is read from the cell's log)."""
    try:
        while not job.done():  # the debug backend runs the job here
            time.sleep(poll_s)
        job.result()
    except Exception:  # noqa: BLE001 (the reason is in the cell's log; the bench reports it)
        pass


# ------------------------------------------------------------------------------------- status and cancel


def _slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Job id -> Slurm state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``PREEMPTED``, ...) from ``sacct``;
    empty where sacct is not installed."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        if jid:
            states[jid.strip()] = state.split()[0] if state.split() else "?"
    return states


def bench_status(out: str | Path) -> str:
    """``mics bench --status``: one line per cell of a bench folder (done, failed, or its job's state) and
    a count per state."""
    out = Path(out)
    if not (out / "bench.json").exists():
        raise GridError(
            f"{out} is not a bench folder (no bench.json); start one with 'mics bench --grid ...'"
        )
    cells = BenchState(out).cells
    states = _slurm_states([str(c["job_id"]) for c in cells.values() if c.get("job_id")])
    lines = [f"{'cell':<58} {'state':<12} job / log"]
    counts: dict[str, int] = {}
    for cid, info in sorted(cells.items()):
        if (run_dir_of(out, cid) / "metrics.json").exists():
            state = "done"
        else:
            job = str(info.get("job_id") or "")
            state = states.get(job, "").lower() or str(info.get("status", "?"))
        counts[state] = counts.get(state, 0) + 1
        where = f"{info.get('job_id', '-')} {info.get('log', '')}".strip()
        lines.append(f"{cid:<58} {state:<12} {where}")
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def cancel_bench(out: str | Path) -> list[str]:
    """``mics bench --cancel``: ``scancel`` the Slurm jobs of every unfinished cell; returns their ids."""
    out = Path(out)
    state = BenchState(out)
    todo = {
        cid: str(info["job_id"])
        for cid, info in state.cells.items()
        if info.get("job_id")
        and str(info.get("executor", "")).startswith("slurm/slurm")
        and not (run_dir_of(out, cid) / "metrics.json").exists()
        and info.get("status") != "cancelled"
    }
    if not todo:
        return []
    if shutil.which("scancel") is None:
        raise GridError("scancel not found: run --cancel on a machine of the Slurm cluster")
    subprocess.run(["scancel", *sorted(set(todo.values()))], check=True, timeout=120)
    for cid in todo:
        state.update(cid, status="cancelled")
    return sorted(set(todo.values()))
