"""One cell as a submitit job: the rendezvous of a multi-node run from the Slurm environment, and the
checkpointable job that runs the cell's command and is requeued (then resumes) on pre-emption or timeout.

A cell with ``nodes x tasks_per_node > 1`` runs one task per GPU; every task runs this job, which turns
submitit's view of the Slurm environment (``SLURM_JOB_NODELIST``, ``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_JOB_ID``) into torch.distributed's ``env://`` variables (``MASTER_ADDR`` = the
first host of the job, ``MASTER_PORT`` from the job id, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
starts ``python -m mics run|baseline`` with them: the same code path as under ``torchrun``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from mics.bench.run import last_error

_PORTS = (20000, 60000)


class JobEnv(Protocol):
    """What is read of ``submitit.JobEnvironment()``."""

    @property
    def job_id(self) -> str: ...

    @property
    def hostnames(self) -> Any: ...

    @property
    def num_tasks(self) -> int: ...

    @property
    def num_nodes(self) -> int: ...

    @property
    def node(self) -> int: ...

    @property
    def global_rank(self) -> int: ...

    @property
    def local_rank(self) -> int: ...


def rendezvous_env(job_env: JobEnv | None = None) -> dict[str, str]:
    """torch.distributed's ``env://`` variables for this task of a submitit job; empty for a one-task job.
    ``MASTER_PORT`` is taken from the environment when set, else derived from the job id, so that every
    task of a job agrees on it and two jobs sharing a node (array elements) most likely do not."""
    if job_env is None:
        import submitit

        job_env = submitit.JobEnvironment()
    if job_env.num_tasks <= 1:
        return {}
    digest = int(hashlib.sha256(str(job_env.job_id).encode()).hexdigest()[:8], 16)
    port = os.environ.get("MASTER_PORT") or str(_PORTS[0] + digest % (_PORTS[1] - _PORTS[0]))
    return {
        "MASTER_ADDR": str(job_env.hostnames[0]),
        "MASTER_PORT": port,
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(1, job_env.num_nodes)),
        "GROUP_RANK": str(job_env.node),
    }


def _reaped(pid: int) -> bool:
    """Whether the child ``pid`` has ended (reaping it). Used from the signal handler, where the
    ``Popen`` object's own wait may be half-way through in the interrupted frame."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def _heed_interrupts() -> None:
    """Let SIGINT reach the cell: a job started from a shell's background list (``... &`` without job
    control) inherits SIGINT ignored, its cell would inherit that too, and :meth:`CellJob._stop` could then
    only kill it after the grace period instead of letting it stop like a Ctrl-C."""
    if (
        signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        and threading.current_thread() is threading.main_thread()
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


class CellFailed(RuntimeError):
    """A cell's command exited with an error (the reason is the last error line of its log)."""


class CellJob:
    """A cell's command as a submitit job. It decides at start whether to resume (the run folder exists)
    and does nothing when the cell is finished, so running it again is always safe; on pre-emption or
    timeout submitit calls :meth:`checkpoint`, which stops the cell's process (its last epoch checkpoint
    is on disk) and hands back a fresh job for the requeued run."""

    def __init__(self, cell_id: str, command: list[str], run_dir: str, log: str) -> None:
        self.cell_id = cell_id
        self.command = list(command)
        self.run_dir = run_dir
        self.log = log
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = None

    def __call__(self) -> float:
        run_dir = Path(self.run_dir)
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            return float(json.loads(metrics.read_text(encoding="utf-8"))["test"]["top1"])
        dist_env = rendezvous_env()
        rank = int(dist_env.get("RANK", "0"))
        cmd = list(self.command)
        if (run_dir / "run.json").exists() and "--resume" not in cmd:
            cmd.append("--resume")
        log = Path(self.log) if rank == 0 else Path(self.log).with_suffix(f".rank{rank}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        where = f"job {os.environ.get('SLURM_JOB_ID') or os.environ.get('SUBMITIT_LOCAL_JOB_ID') or '-'}"
        if dist_env:
            master = f"{dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']}"
            where += f", rank {rank}/{dist_env['WORLD_SIZE']} via {master}"
        _heed_interrupts()
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n# {where} on {socket.gethostname()}, pid {os.getpid()}\n$ {shlex.join(cmd)}\n")
            fh.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **dist_env},
            )
            # poll, not wait(): the pre-emption handler runs in this thread and stops the process, which
            # would deadlock on the lock a blocking wait() holds
            while (rc := self._proc.poll()) is None:
                time.sleep(0.5)
        self._proc = None
        if rc != 0:
            raise CellFailed(f"{self.cell_id}: exit code {rc}: {last_error(log)}")
        if rank != 0:
            return float("nan")
        if not metrics.exists():
            raise CellFailed(f"{self.cell_id}: finished without {metrics}")
        return float(json.loads(metrics.read_text(encoding="utf-8"))["test"]["top1"])

    def _stop(self, grace_s: float = 60.0) -> None:
        proc = self._proc
        if proc is None or _reaped(proc.pid):
            return
        # SIGINT: the cell stops like a Ctrl-C; everything up to its last epoch checkpoint is kept
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if _reaped(proc.pid):
                return
            time.sleep(0.2)
        proc.kill()
        while not _reaped(proc.pid):
            time.sleep(0.2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on pre-emption / timeout: stop the cell and requeue a fresh job for it."""
        from submitit.helpers import DelayedSubmission

        self._stop()
        return DelayedSubmission(CellJob(self.cell_id, self.command, self.run_dir, self.log))
