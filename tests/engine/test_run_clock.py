"""The run clock: ``elapsed_s`` on each metrics record, and where a resumed run takes it up."""

from __future__ import annotations

import json

from mics.engine.logging import MetricsLogger, RunClock, last_elapsed


def test_records_carry_the_clock_and_a_resume_continues_from_the_last(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, clock=RunClock(base_s=40.0))
    logger.log("pretrain", 1, {"loss": 1.0})
    logger.log("pretrain", 2, {"loss": 0.5})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["pretrain", "pretrain"]
    assert 40.0 <= records[0]["elapsed_s"] <= records[1]["elapsed_s"] < 40.0 + 60
    assert last_elapsed(tmp_path / "metrics.jsonl") == records[1]["elapsed_s"]
    later = RunClock(base_s=last_elapsed(tmp_path / "metrics.jsonl"))
    assert later.elapsed() >= records[1]["elapsed_s"]


def test_without_a_clock_records_have_no_elapsed_field(tmp_path):
    MetricsLogger(tmp_path, tensorboard=False).log("svd", 0, {"k": 3})
    assert "elapsed_s" not in json.loads((tmp_path / "metrics.jsonl").read_text())


def test_last_elapsed_is_zero_for_a_missing_file_or_an_older_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_elapsed(path) == 0.0
    path.write_text(json.dumps({"stage": "finetune", "step": 1}) + "\n")
    assert last_elapsed(path) == 0.0


def test_last_elapsed_skips_a_torn_or_invalid_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps({"stage": "pretrain", "elapsed_s": 12.5}),
        json.dumps({"stage": "pretrain", "elapsed_s": "NaN"}),
        json.dumps({"stage": "pretrain", "elapsed_s": -3}),
        '{"stage": "pre',
    ]
    path.write_text("\n".join(lines) + "\n")
    assert last_elapsed(path) == 12.5
