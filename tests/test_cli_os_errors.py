"""What the operating system refuses, seen from the command line: one message naming the path and what to
do, exit code 2, no traceback (``--debug`` shows it), and a run that ``--resume`` finishes.

The commands run in this process (``mics.cli.main``), so that the system calls can be made to fail: the
tests run as root, for whom a read-only permission is no obstacle, and a full disk cannot be made here.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mics.cli import main
from tests.conftest import MILK
from tests.test_cli import FAST

SETTINGS = ["--preset", "smoke", "--labels", "0.1", "--seed", "1", *FAST]


def cli(monkeypatch, capsys, *args: object) -> tuple[int, str]:
    """Run ``mics ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mics", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """Every file opened for writing below ``folder`` fails with ``code`` (what a read-only folder, a
    read-only file system or an exhausted file table answer); reads still work."""
    real_open = os.open
    root = str(folder.resolve())

    def fake_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and os.path.abspath(path).startswith(root):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_out_below_a_regular_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", out, "--preset", "smoke")
    assert code == 2 and "Traceback" not in err
    assert f"error: {out}: a part of this path is a regular file, not a folder" in err
    assert "choose another path" in err
    file = tmp_path / "file"
    code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", file, "--preset", "smoke")
    assert code == 2 and f"{file} already exists and is not a folder" in err


def test_debug_shows_the_traceback_and_the_message(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    code, err = cli(monkeypatch, capsys, "--debug", "run", "--data", MILK, "--out", out, "--preset", "smoke")
    assert code == 2 and "Traceback" in err and "NotADirectoryError" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: {out}: a part of this path")


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EROFS, "is on a read-only file system; choose a writable folder"),
        (errno.EACCES, "permission denied: "),
        (errno.EMFILE, "too many open files"),
    ],
)
def test_a_run_folder_that_refuses_files(tmp_path, monkeypatch, capsys, code, says):
    out = tmp_path / "run"
    out.mkdir()
    _refuse_writes_under(monkeypatch, out, code)
    code_, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", out, "--preset", "smoke")
    assert code_ == 2 and "Traceback" not in err and says in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert str(out / "split.json") in line  # the file mics was writing, not its hidden temporary file
    if code == errno.EMFILE:
        assert "ulimit -n" in line and "--resume" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_for_real(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", out, "--preset", "smoke")
    finally:
        out.chmod(0o700)
    assert code == 2 and "permission denied" in err and str(out) in err and "Traceback" not in err


def _disk_full_then_resume(out: Path, monkeypatch, capsys) -> str:
    """Fill the disk while the shift dictionary is saved (after pre-training), check the message and
    that nothing half-written is left, then ``--resume`` with space again; returns the resume's stderr."""
    from safetensors import SafetensorError

    from mics.engine import checkpoint

    real_save = checkpoint.save_file

    def fill_up(tensors, filename, metadata=None):
        if Path(filename).parent.name == "svd":
            # what safetensors raises for a full disk: its own type, the errno in the text
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fill_up)
    code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", out, *SETTINGS)
    assert code == 2 and "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert f"no space left on the disk holding {out / 'svd' / 'dictionary.safetensors'}" in line
    assert "rerun the same command with --resume" in line
    assert sorted(p.name for p in (out / "svd").iterdir()) == []  # no temporary file, no half checkpoint
    assert not (out / "metrics.json").exists()
    encoders = (out / "pretrain" / "encoders.safetensors").read_bytes()

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", out, *SETTINGS, "--resume")
    assert code == 0, err
    assert "[pretrain] already done" in err  # the work done before the disk filled up is kept
    assert (out / "pretrain" / "encoders.safetensors").read_bytes() == encoders
    return err


def test_full_disk_then_resume_finishes_the_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "milk"
    _disk_full_then_resume(out, monkeypatch, capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] > 0 and 0.0 <= metrics["test"]["top1"] <= 1.0
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(stages) == {"pretrain", "finetune"}


@pytest.mark.slow
def test_full_disk_then_resume_gives_the_uninterrupted_metrics(tmp_path, monkeypatch, capsys):
    reference = tmp_path / "uninterrupted"
    assert cli(monkeypatch, capsys, "run", "--data", MILK, "--out", reference, *SETTINGS)[0] == 0
    out = tmp_path / "milk"
    _disk_full_then_resume(out, monkeypatch, capsys)
    got = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for split in ("val", "test"):
        assert got[split]["confusion"] == expected[split]["confusion"]
        assert got[split]["top1"] == expected[split]["top1"]
        assert got[split]["mean_uncertainty"] == expected[split]["mean_uncertainty"]


def test_help_imports_neither_torch_nor_the_pipeline():
    """A wiring check, not a timing test (benchmarks/cli_startup.py times it): the help of the app and of
    every command is answered without importing torch or the heavy part of the package."""
    code = (
        "import sys\n"
        "import mics.cli\n"
        "for args in (['--help'], ['run', '--help'], ['baseline', '--help'], ['predict', '--help'],\n"
        "             ['bench', '--help'], ['figures', '--help'], ['demo', '--help']):\n"
        "    sys.argv = ['mics', *args]\n"
        "    try:\n"
        "        mics.cli.main()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (args, exc.code)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'timm')\n"
        "               or m in ('mics.pipeline', 'mics.bench', 'mics.engine.train'))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert proc.stdout.count("Usage:") == 7
