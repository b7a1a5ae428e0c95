"""Multi-node launch through submitit: torch.distributed's rendezvous from the Slurm environment, and a
real cell trained by 2 processes started as Slurm starts a job's tasks (``srun python -m
submitit.core._submit FOLDER`` with ``SLURM_*`` set), on gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import GI

from mics import bench
from mics.bench.launch import CellJob, rendezvous_env

submitit = pytest.importorskip("submitit")


def _slurm_env(monkeypatch, **values: str) -> None:
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key == "MASTER_PORT":
            monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_rendezvous_of_two_nodes_with_four_gpus_each(monkeypatch):
    envs = []
    for procid in range(8):
        _slurm_env(
            monkeypatch,
            SLURM_JOB_ID="777",
            SLURM_JOB_NODELIST="gpu[011-012]",
            SLURM_JOB_NUM_NODES="2",
            SLURM_NTASKS="8",
            SLURM_PROCID=str(procid),
            SLURM_LOCALID=str(procid % 4),
            SLURM_NODEID=str(procid // 4),
        )
        envs.append(rendezvous_env())
    assert {e["MASTER_ADDR"] for e in envs} == {"gpu011"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and 20000 <= int(envs[0]["MASTER_PORT"]) < 60000
    assert [(e["RANK"], e["LOCAL_RANK"], e["GROUP_RANK"]) for e in envs][4:6] == [
        ("4", "0", "1"),
        ("5", "1", "1"),
    ]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {("8", "4")}
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert rendezvous_env()["MASTER_PORT"] == "29999"


def test_a_one_task_job_needs_no_rendezvous(monkeypatch):
    _slurm_env(monkeypatch, SLURM_JOB_ID="5", SLURM_NTASKS="1")
    assert rendezvous_env() == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
def test_a_cell_trains_on_two_processes_started_as_slurm_starts_them(tmp_path):
    grid = bench.parse_grid(
        {
            "preset": "smoke",
            "labels": [0.5],
            "datasets": [{"name": "gi", "path": str(GI)}],
            "methods": [{"name": "supervised", "ways": ["standard"]}],
            "set": ["ssl.iterations=4", "finetune.epochs=2", "device=cpu"],
        }
    )
    (cell,) = bench.expand_cells(grid)
    out = tmp_path / "bench"
    run_dir, log = bench.run_dir_of(out, cell), out / "logs" / f"{cell.id}.log"
    job = CellJob(cell.id, cell.command(run_dir), str(run_dir), str(log))
    folder = tmp_path / "slurm"
    folder.mkdir()
    submitit.helpers.DelayedSubmission(job).dump(
        submitit.core.utils.JobPaths(folder, "4242").submitted_pickle
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_NTASKS="2",
        MASTER_PORT=str(_free_port()),
        MICS_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", "-m", "submitit.core._submit", str(folder)],
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert (run_dir / "metrics.json").exists()
    assert f"rank 0/2 via localhost:{env['MASTER_PORT']}" in log.read_text()
    rank1 = Path(str(log).replace(".log", ".rank1.log"))
    assert "rank 1/2" in rank1.read_text()
    results = [submitit.core.utils.JobPaths(folder, "4242", task_id=r).result_pickle for r in range(2)]
    assert all(p.exists() for p in results)
