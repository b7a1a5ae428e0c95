"""The slurm executor without a cluster: the sbatch files submitit writes (a fake ``sbatch`` on PATH),
the jobs run by submitit's local backend (a fake ``python`` that plays ``mics``, and one real cell on the
bundled sample that is pre-empted and resumes from its checkpoint), ``--status`` and ``--cancel``."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import GI
from tests.test_bench import FAKE_MICS, _calls, _fake_grid, _main

from mics import bench
from mics.bench.slurm import SlurmExecutor, SlurmOptions, bench_status, cancel_bench, parse_time

pytest.importorskip("submitit")

FAKE_SBATCH = """#!/bin/sh
# plays sbatch: keeps the script, answers with the next job id
n=$(ls "$SBATCH_DIR" | wc -l)
cp "$1" "$SBATCH_DIR/$((n + 100)).sh"
echo "Submitted batch job $((n + 100))"
"""

FAKE_SACCT = """#!/bin/sh
# plays sacct: every job of the first array runs, the others are pending
echo "100_0|RUNNING"
echo "100_1|PREEMPTED"
echo "101|PENDING"
echo "103_0|PREEMPTED"
"""


@pytest.fixture()
def fake_python(tmp_path, monkeypatch) -> Path:
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_MICS.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    return exe


FAKE_SCANCEL = """#!/bin/sh
echo "$@" >> "$SBATCH_DIR/scancel.txt"
"""


def _tool(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``sbatch``, ``sacct`` and ``scancel`` on PATH; returns the folder that collects the sbatch files."""
    scripts = tmp_path / "sbatch"
    scripts.mkdir()
    bin_dir = tmp_path / "bin"
    _tool(bin_dir, "sbatch", FAKE_SBATCH)
    _tool(bin_dir, "sacct", FAKE_SACCT)
    _tool(bin_dir, "scancel", FAKE_SCANCEL)
    _tool(bin_dir, "srun", "#!/bin/sh\nexit 1\n")  # submitit looks for it; never run here
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_DIR", str(scripts))
    return scripts


def test_slurm_time_formats():
    assert [parse_time(t) for t in ("90", "4:00:00", "1-12:00:00", "30:00", "2-0")] == [
        90,
        240,
        2160,
        30,
        2880,
    ]
    with pytest.raises(bench.GridError, match="--time"):
        parse_time("two hours")


def test_cells_are_submitted_as_arrays_and_shared_pretrainings_as_dependencies(tmp_path, fake_slurm):
    out = tmp_path / "bench"
    options = SlurmOptions(
        partition="gpu", time_min=90, gpus=1, cpus=6, array_limit=3, extra={"account": "p1"}
    )
    result = bench.run_bench(_fake_grid(tmp_path), out, executor=SlurmExecutor(options), progress=False)
    scripts = sorted(fake_slurm.glob("*.sh"))
    # one array of the cells that need nothing (2 MICS pre-trainings + 4 FixMatch cells), then one job per
    # pre-training for the MICS cells that reuse it
    assert len(scripts) == 3
    first, *deps = (s.read_text() for s in scripts)
    for line in ("--partition=gpu", "--array=0-5%3", "--time=90", "--cpus-per-task=6", "--account=p1"):
        assert f"#SBATCH {line}" in first
    assert "--gpus-per-node=1" in first and "--dependency" not in first
    assert "#SBATCH --signal=USR2@120" in first  # time to checkpoint before pre-emption or the time limit
    assert {re.search(r"--dependency=(\S+)", d)[1] for d in deps} == {"afterok:100_0", "afterok:100_3"}
    assert all("#SBATCH --kill-on-invalid-dep=yes" in d for d in deps)
    state = json.loads((out / "bench.json").read_text())["cells"]
    assert state["good__mics__l50__s0"]["job_id"] == "100_0"
    assert state["good__mics__l10__s1"]["job_id"] in ("101", "102")
    assert state["good__mics__l10__s0"]["pretrained_from"] == str(
        bench.run_dir_of(out, "good__mics__l50__s0")
    )
    assert len(result.submitted) == 8 and not result.ran and not result.failed
    assert "Not finished (8)" in result.results_md.read_text()

    # the same command again: the running and pending cells' jobs are left alone, the others resubmitted
    again = bench.run_bench(_fake_grid(tmp_path), out, executor=SlurmExecutor(options), progress=False)
    assert {again.submitted[c] for c in ("good__mics__l50__s0", "good__mics__l10__s0")} == {"100_0", "101"}
    new = sorted(fake_slurm.glob("*.sh"))[3:]
    assert len(new) == 2 and "--array=0-4%3" in new[0].read_text()
    assert "--dependency=afterok:103_2" in new[1].read_text()
    status = bench_status(out)
    assert re.search(r"good__mics__l50__s0 +running +100_0", status)
    assert re.search(r"good__mics__l10__s0 +(pending|submitted) ", status)
    assert "preempted" in status and status.splitlines()[-1].startswith("8 cells:")

    cancelled = cancel_bench(out)
    assert len(cancelled) == 8  # every unfinished cell's job (the latest of each), array elements included
    assert (fake_slurm / "scancel.txt").read_text().split() == sorted(cancelled)
    assert cancel_bench(out) == []  # nothing left to cancel


def test_a_multi_node_cell_asks_for_nodes_and_one_task_per_gpu(tmp_path, fake_slurm):
    grid = _fake_grid(tmp_path, seeds=[0], labels=[0.1], methods=["mics"])
    options = SlurmOptions(nodes=2, gpus=4, mem_gb=200)
    bench.run_bench(grid, tmp_path / "bench", executor=SlurmExecutor(options), progress=False)
    (script,) = fake_slurm.glob("*.sh")
    text = script.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--mem=200GB"):
        assert f"#SBATCH {line}" in text
    assert "srun" in text and "submitit.core._submit" in text


def test_cli_submits_and_reports_status(tmp_path, fake_slurm, monkeypatch, capsys):
    grid = tmp_path / "g.yaml"
    (tmp_path / "d").mkdir()
    grid.write_text(f"preset: smoke\ndatasets: [{{name: d, path: {tmp_path / 'd'}}}]\nmethods: [mics]\n")
    code = _main(
        monkeypatch,
        "bench",
        "--grid",
        grid,
        "--out",
        tmp_path / "b",
        "--executor",
        "slurm",
        "--partition",
        "p",
    )
    assert code == 0 and "1 cell(s) submitted" in capsys.readouterr().out
    assert "#SBATCH --partition=p" in next(fake_slurm.glob("*.sh")).read_text()
    assert _main(monkeypatch, "bench", "--out", tmp_path / "b", "--status") == 0
    assert "d__mics__l10__s0" in capsys.readouterr().out
    assert _main(monkeypatch, "bench", "--out", tmp_path / "b", "--executor", "pbs", "--grid", grid) == 2
    assert _main(monkeypatch, "bench", "--out", tmp_path / "nothing", "--status") == 2


def test_local_backend_runs_the_jobs_and_dependents_after_their_pretraining(tmp_path, fake_python):
    grid = _fake_grid(tmp_path, seeds=[0], methods=["mics", {"name": "fixmatch", "ways": ["standard"]}])
    out = tmp_path / "bench"
    executor = SlurmExecutor(backend="local", wait=True, poll_s=0.2)
    result = bench.run_bench(grid, out, executor=executor, python=str(fake_python), progress=False)
    assert sorted(result.ran) == sorted(c.id for c in bench.expand_cells(grid)) and not result.failed
    calls = {c["cell"]: c for c in _calls(tmp_path)}
    owner = calls["good__mics__l50__s0"]
    assert owner["pretrained"] is None
    assert calls["good__mics__l10__s0"]["pretrained"] == str(bench.run_dir_of(out, "good__mics__l50__s0"))
    assert calls["good__mics__l10__s0"]["t"] >= owner["t"]
    assert len(bench.read_csv(result.results_csv)) == 4
    assert "# job " in (out / "logs" / "good__mics__l50__s0.log").read_text()


def _task_pid(log: Path, attempt: int) -> int | None:
    pids = re.findall(r"^# job .*, pid (\d+)$", log.read_text(), flags=re.M) if log.exists() else []
    return int(pids[attempt]) if len(pids) > attempt else None


def _only_child(pid: int) -> int:
    children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
    assert len(children) == 1, children
    return children[0]


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` has stopped."""
    states = [
        re.search(r"^State:\s*(\S)", f.read_text(), flags=re.M)[1]
        for f in Path(f"/proc/{pid}/task").glob("*/status")
    ]
    return bool(states) and set(states) == {"T"}


def _pending(pid: int) -> int:
    """The signals pending for process ``pid`` (its own and its threads' shared set), as a bit mask."""
    status_file = Path(f"/proc/{pid}/status")
    assert status_file.exists(), f"process {pid} has ended (killed, not interrupted)"
    status = status_file.read_text()
    return int(re.search(r"^ShdPnd:\s*([0-9a-f]+)$", status, flags=re.M)[1], 16) | int(
        re.search(r"^SigPnd:\s*([0-9a-f]+)$", status, flags=re.M)[1], 16
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_preempted_cell_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """A real baseline cell (smoke preset, bundled sample) through submitit's local backend: once its first
    epoch checkpoint exists, the job gets the pre-emption signal; submitit checkpoints (stops the cell) and
    requeues it, and the requeued job continues the run folder instead of starting again.

    No race with the clock: the cell's process is frozen (SIGSTOP) before the job gets the signal and thawed
    only once the handler's SIGINT is pending for it, so it cannot finish in between however fast it is.
    The job is submitted with SIGINT ignored, as from a shell's background list (``make test &``): the
    cell must heed the handler's SIGINT all the same (an ignored signal is dropped, never pending)."""
    epochs = 12
    grid = bench.parse_grid(
        {
            "preset": "smoke",
            "labels": [0.5],
            "datasets": [{"name": "gi", "path": str(GI)}],
            "methods": [{"name": "supervised", "ways": ["standard"]}],
            "set": [f"ssl.iterations={epochs}", f"finetune.epochs={epochs}"],
        }
    )
    out = tmp_path / "bench"
    cid = "gi__supervised-standard__l50__s0"
    executor = SlurmExecutor(backend="local", wait=False)
    heeded = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = bench.run_bench(grid, out, executor=executor, progress=False)
    finally:
        signal.signal(signal.SIGINT, heeded)
    assert list(result.submitted) == [cid]
    run_dir, log = bench.run_dir_of(out, cid), out / "logs" / f"{cid}.log"
    deadline = time.time() + 600
    while not (run_dir / "baseline" / "last.json").exists():
        assert time.time() < deadline and not (run_dir / "metrics.json").exists(), log.read_text()
        time.sleep(0.05)
    job = _task_pid(log, 0)
    cell = _only_child(job)
    os.kill(cell, signal.SIGSTOP)
    while not _stopped(cell):  # the stop takes effect: a signal sent now stays pending, not handled
        assert time.time() < deadline, log.read_text()
        time.sleep(0.01)
    assert not (run_dir / "metrics.json").exists()
    os.kill(job, signal.SIGUSR2)  # what Slurm sends before it pre-empts the job
    while not _pending(cell) & (1 << (signal.SIGINT - 1)):
        assert time.time() < deadline, log.read_text()
        time.sleep(0.05)
    os.kill(cell, signal.SIGCONT)
    while not (run_dir / "metrics.json").exists():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.5)
    text = log.read_text()
    commands = [ln for ln in text.splitlines() if ln.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith("--resume")
    assert _task_pid(log, 1) != _task_pid(log, 0)  # the requeued job is a new process
    resumed = re.search(r"resuming after epoch (\d+) of 12", text)
    assert resumed and int(resumed[1]) >= 1
    epochs_logged = [json.loads(ln)["epoch"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1))  # no epoch trained twice: resumed, not restarted
    # a bench over the folder now finds the cell finished
    again = bench.run_bench(grid, out, executor=SlurmExecutor(backend="local", wait=True), progress=False)
    assert again.done == [cid] and not again.submitted


def test_the_slurm_executor_needs_submitit(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(bench.GridError, match=r"mics\[cluster\]"):
        SlurmExecutor()._executor(tmp_path, "x", None)
