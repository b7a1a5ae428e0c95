"""The ``local`` executor: each cell in its own process on this machine, ``jobs`` at a time, the CPU
cores shared out between them, with a progress bar. A crash in one cell does not stop the bench, and every
cell returns its memory."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from mics.bench.grid import GridError
from mics.bench.paths import has_encoders, run_dir_of
from mics.bench.plan import Task
from mics.bench.run import Execution, Outcome, last_error


def _threads(jobs: int) -> int:
    if os.environ.get("MICS_THREADS", "").isdigit():
        return max(1, int(os.environ["MICS_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // jobs)


def child_env(jobs: int) -> dict[str, str]:
    """The environment of a cell's process: with several jobs, the cores are shared out between them
    (torch sizes its thread pool from OMP_NUM_THREADS), so 2 jobs on 2 cores do not fight over 4 threads."""
    env = dict(os.environ)
    if jobs > 1 or "MICS_THREADS" in os.environ:
        n = str(_threads(jobs))
        env.update(MICS_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    return env


_Running = dict[str, tuple[subprocess.Popen, Task, float, IO[str]]]


class LocalExecutor:
    """Poll a pool of ``jobs`` cell processes every ``poll_s`` seconds; a MICS cell that waits for
    another cell's pre-training starts as soon as its encoders are written."""

    name = "local"

    def __init__(self, jobs: int = 1, poll_s: float = 0.5) -> None:
        if jobs < 1:
            raise GridError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.poll_s = poll_s

    def execute(self, tasks: list[Task], ex: Execution) -> Outcome:
        from tqdm.auto import tqdm

        out, state = ex.out, ex.state
        env = child_env(self.jobs)
        pending = list(tasks)
        running: _Running = {}
        outcome = Outcome()
        failed = outcome.failed
        bar = tqdm(
            total=len(pending),
            desc=f"bench {ex.grid.name}",
            unit="cell",
            disable=not ex.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )

        def finish(cid: str, rc: int) -> None:
            proc, task, start, log = running.pop(cid)
            log.close()
            metrics = task.run_dir / "metrics.json"
            wall = round(time.time() - start, 1)
            if rc == 0 and metrics.exists():
                outcome.ran.append(cid)
                top1 = json.loads(metrics.read_text(encoding="utf-8"))["test"]["top1"]
                state.update(cid, status="done", returncode=rc, wall_s=wall)
                bar.write(f"done   {cid}: test top-1 {100 * top1:.2f} % ({wall:.0f} s)")
                ex.finished(cid)
            else:
                reason = f"exit code {rc}: {last_error(ex.log_of(cid))}"
                failed[cid] = reason
                state.update(cid, status="failed", returncode=rc, wall_s=wall)
                bar.write(f"FAILED {cid} ({reason}); log: {ex.log_of(cid)}")
            bar.update(1)

        def start(task: Task) -> None:
            cmd = task.cell.command(
                task.run_dir, resume=task.resume, pretrained=task.pretrained, python=ex.python
            )
            log = open(ex.log_of(task.cell.id), "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            task.run_dir.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
            running[task.cell.id] = (proc, task, time.time(), log)
            state.update(
                task.cell.id,
                status="running",
                executor=self.name,
                resumed=task.resume,
                pretrained_from=str(task.pretrained)
                if task.pretrained
                else state.cells.get(task.cell.id, {}).get("pretrained_from"),
                log=str(ex.log_of(task.cell.id)),
            )

        def ready(task: Task) -> bool | None:
            """True: can start; False: waiting; None: can never start (its pre-training failed)."""
            if task.waits_for is None:
                return True
            owner_dir = run_dir_of(out, task.waits_for)
            if has_encoders(owner_dir):
                task.pretrained, task.waits_for = owner_dir, None
                return True
            if task.waits_for in failed or (
                task.waits_for not in running and all(t.cell.id != task.waits_for for t in pending)
            ):
                return None
            return False

        try:
            while pending or running:
                for cid, (proc, _, _, _) in list(running.items()):
                    rc = proc.poll()
                    if rc is not None:
                        finish(cid, rc)
                for task in list(pending):
                    if len(running) >= self.jobs:
                        break
                    status = ready(task)
                    if status is None:
                        pending.remove(task)
                        failed[task.cell.id] = f"its pre-training cell {task.waits_for} failed"
                        bar.write(f"SKIP   {task.cell.id}: pre-training cell {task.waits_for} failed")
                        bar.update(1)
                    elif status:
                        pending.remove(task)
                        start(task)
                bar.set_postfix_str(f"running {len(running)}, failed {len(failed)}", refresh=False)
                if running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            _stop(running)
            raise
        finally:
            bar.close()
        return outcome


def _stop(running: Mapping[str, tuple[subprocess.Popen, Any, float, IO[str]]], grace_s: float = 30.0) -> None:
    """Stop the cells' processes: a Ctrl-C in a terminal has reached them already (same process group),
    so give them a moment, then interrupt the others once (they stop at a checkpoint boundary) and kill
    what is left after ``grace_s``."""
    procs = [(proc, log) for proc, _, _, log in running.values()]
    deadline = time.time() + 2.0
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.01, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
