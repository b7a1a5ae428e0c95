"""What the system refuses while a run folder is written: the error names the file mics was writing, and
what was there before (the last good checkpoint, a complete metrics file) is left intact for --resume."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from mics.engine import checkpoint
from mics.engine.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from mics.engine.logging import MetricsLogger, append_line


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 3), value)}, "step": int(value)}


def _disk_full(*args, **kwargs):
    # the text safetensors gives an error of the system (its own exception type, the errno in the text)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last", _state(1.0), info={"epoch": 1})
    monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "last", _state(2.0), info={"epoch": 2})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "last.safetensors")
    assert _leftovers(tmp_path) == []
    state, meta = load_checkpoint(tmp_path / "last")
    assert meta == {"epoch": 1} and torch.equal(state["model"]["w"], torch.full((4, 3), 1.0))


def test_the_real_safetensors_error_becomes_an_oserror(tmp_path):
    # no mocking: safetensors itself fails to create a file in a missing folder
    with pytest.raises(FileNotFoundError) as info:
        checkpoint._save_tensors({"w": torch.zeros(2)}, str(tmp_path / "missing" / "w.safetensors"))
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value.__cause__, SafetensorError)


def test_other_safetensors_errors_are_left_alone(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise SafetensorError("invalid metadata")

    monkeypatch.setattr(checkpoint, "save_file", refuse)
    with pytest.raises(SafetensorError):
        checkpoint._save_tensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))


def test_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"top1": 0.5})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # like a failed write: no file name

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        atomic_write_json(target, {"top1": 0.9})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert _leftovers(tmp_path) == []


def test_a_folder_that_refuses_new_files_is_named(tmp_path, monkeypatch):
    import tempfile

    def mkstemp(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abc" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(PermissionError) as info:
        atomic_write_json(tmp_path / "run.json", {})
    assert info.value.filename == str(tmp_path / "run.json")


def test_a_run_folder_below_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        save_checkpoint(tmp_path / "file" / "run" / "last", _state(1.0))
    assert str(tmp_path / "file") in str(info.value.filename)


def test_a_failed_append_leaves_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as info:
        append_line(path, json.dumps({"step": 2, "loss": 0.25}))
    assert info.value.filename == str(path)
    monkeypatch.undo()
    append_line(path, json.dumps({"step": 2, "loss": 0.5}))  # what a resumed run does next
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1},
        {"step": 2, "loss": 0.5},
    ]


def test_metrics_logger_writes_one_record_per_line(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log("pretrain", 1, {"loss": torch.tensor(0.5), "lr": 1e-3, "bad": float("nan")})
    logger.log("pretrain", 2, {"loss": 0.25})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]
    assert records[0]["bad"] == "nan"
