"""Resuming a run folder continues each stage where it stopped: the epochs before the checkpoint are not
trained again (the batch function is never asked for them), finished stages are skipped, and
``metrics.jsonl`` holds each epoch once."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mics import pipeline
from mics.config import preset
from mics.engine.logging import last_elapsed
from tests.conftest import GI

SMOKE = preset("smoke")
CFG = replace(
    SMOKE,
    pretrain=replace(SMOKE.pretrain, epochs=2),
    finetune=replace(SMOKE.finetune, epochs=2, min_steps_per_epoch=2),
)


class Killed(Exception):
    """Stands for the process dying in the middle of an epoch."""


def _spy(calls: list[int], stop_at: int | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wraps a batch-function factory so that the epochs asked for are recorded (and one can fail)."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        def make(*args: Any, **kwargs: Any) -> Callable[..., Iterator[Any]]:
            batches = factory(*args, **kwargs)

            def spied(epoch: int, generator: Any) -> Iterator[Any]:
                calls.append(epoch)
                for i, batch in enumerate(batches(epoch, generator)):
                    if epoch == stop_at and i == 1:
                        raise Killed
                    yield batch

            return spied

        return make

    return wrap


def _epochs(run_dir: Path, stage: str) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [int(r["epoch"]) for r in map(json.loads, lines) if r["stage"] == stage]


def _set_last_elapsed(metrics: Path, value: float) -> float:
    """Rewrite the last record's ``elapsed_s`` (as if the run had been killed later); returns the old one."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    old = records[-1]["elapsed_s"]
    records[-1]["elapsed_s"] = value
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return old


@pytest.mark.parametrize(
    ("stage", "factory"), [("pretrain", "pair_batches"), ("finetune", "labelled_batches")]
)
def test_resumed_stage_skips_the_epochs_already_trained(tmp_path, monkeypatch, stage, factory):
    run_dir = tmp_path / "run"
    ctx = pipeline.init_run(GI, run_dir, cfg=CFG, labels=0.2, seed=4)
    original = getattr(pipeline, factory)
    if stage == "finetune":
        ctx.cfg = replace(ctx.cfg, pretrain=replace(ctx.cfg.pretrain, epochs=1))
        pipeline.pretrain(ctx)
        pipeline.build_svd(ctx)
    calls: list[int] = []
    monkeypatch.setattr(pipeline, factory, _spy(calls, stop_at=1)(original))
    with pytest.raises(Killed):
        getattr(pipeline, stage)(ctx)
    assert calls == [0, 1]
    assert _epochs(run_dir, stage) == [1]

    # the killed process had run for 1000 s when epoch 1 was checkpointed: the resumed run's clock goes on
    # from there rather than from 0
    metrics = run_dir / "metrics.jsonl"
    assert _set_last_elapsed(metrics, 1000.0) > 0

    calls.clear()
    monkeypatch.setattr(pipeline, factory, _spy(calls)(original))
    ctx = pipeline.open_run(run_dir)
    made = getattr(pipeline, stage)(ctx, resume=True)
    assert calls == [1], "a resumed stage trained epochs that were already checkpointed"
    assert _epochs(run_dir, stage) == [1, 2]
    resumed = json.loads(metrics.read_text().splitlines()[-1])
    assert 1000.0 < resumed["elapsed_s"] < 1000.0 + 600
    assert made == run_dir / stage / {"pretrain": "encoders", "finetune": "best"}[stage]

    calls.clear()
    assert getattr(pipeline, stage)(ctx, resume=True) == made, "a skipped stage returns what it made"
    assert calls == [], "a finished stage was trained again on resume"
    assert _epochs(run_dir, stage) == [1, 2]


def test_a_finished_run_resumes_without_training(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    cfg = replace(CFG, pretrain=replace(CFG.pretrain, epochs=1), finetune=replace(CFG.finetune, epochs=1))
    first = pipeline.run(GI, run_dir, cfg=cfg, labels=0.2, seed=4)
    calls: list[int] = []
    for factory in ("pair_batches", "labelled_batches"):
        monkeypatch.setattr(pipeline, factory, _spy(calls)(getattr(pipeline, factory)))
    built: list[Any] = []
    build_dictionary = pipeline.build_dictionary
    monkeypatch.setattr(
        pipeline, "build_dictionary", lambda *a, **k: built.append(1) or build_dictionary(*a, **k)
    )
    capsys.readouterr()
    started = time.time()
    again = pipeline.run(GI, run_dir, cfg=cfg, labels=0.2, seed=4, resume=True)
    elapsed = time.time() - started
    assert calls == [] and built == []
    # and says so, stage by stage
    said = capsys.readouterr().err.splitlines()
    for stage in ("pretrain", "svd", "finetune"):
        assert f"[{stage}] already done; skipping" in said
    # a skipped stage still returns what it made, as run() passes it on
    ctx = pipeline.open_run(run_dir)
    assert pipeline.pretrain(ctx, resume=True) == run_dir / "pretrain" / "encoders"
    assert pipeline.build_svd(ctx, resume=True) == run_dir / "svd" / "dictionary"
    assert pipeline.finetune(ctx, resume=True) == run_dir / "finetune" / "best"
    assert again["test"]["confusion"] == first["test"]["confusion"]
    # the wall time of the run, in tenths of a second, also in the run's metrics.json: the first call's
    # time up to its last checkpointed epoch plus the resumed call's
    assert isinstance(again["wall_s"], float) and again["wall_s"] == round(again["wall_s"], 1) > 0
    trained = last_elapsed(run_dir / "metrics.jsonl")
    assert 0 < trained <= first["wall_s"]
    assert trained <= again["wall_s"] <= trained + elapsed + 0.15
    saved = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(again))


def test_a_run_folder_is_reopened_only_for_its_own_data(tmp_path):
    run_dir = tmp_path / "run"
    pipeline.init_run(GI, run_dir, cfg=CFG, labels=0.2, seed=4)
    held = f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
    with pytest.raises(pipeline.RunError, match="^" + re.escape(held) + "$"):
        pipeline.init_run(GI, run_dir, cfg=CFG, labels=0.2, seed=4)
    other = tmp_path / "other"
    shutil.copytree(GI, other)
    made_for = f"{run_dir} was made for data {GI.resolve()}, not {other}"
    with pytest.raises(pipeline.RunError, match="^" + re.escape(made_for) + "$"):
        pipeline.init_run(other, run_dir, cfg=CFG, labels=0.2, seed=4, resume=True)
    # the same data under another spelling of its path is the same data
    ctx = pipeline.init_run(GI / ".." / GI.name, run_dir, cfg=CFG, labels=0.5, seed=9, resume=True)
    assert (ctx.labels_ratio, ctx.cfg.seed) == (0.2, 4), "a reopened run keeps its own labels and seed"


def test_a_new_run_folder_records_what_it_was_made_with(tmp_path):
    from mics import __version__
    from mics.config import load_yaml
    from mics.data.splits import load_split
    from mics.engine.train import resolve_precision

    run_dir = tmp_path / "nested" / "run"
    ctx = pipeline.init_run(GI, run_dir, cfg=CFG, labels=0.2, seed=4, method="dash/multimodal")
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    created = meta.pop("created")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", created)
    split = ctx.split
    assert meta == {
        "method": "dash/multimodal",
        "data": str(GI.resolve()),
        "pair": ctx.images.pair_mode,
        "classes": list(ctx.images.classes),
        "modalities": list(ctx.images.modalities),
        "labels": 0.2,
        "seed": 4,
        "preset": "smoke",
        "precision": resolve_precision(CFG.precision, ctx.device),
        "mics_version": __version__,
        "git_commit": pipeline.git_commit(),
        "n_samples": len(ctx.images),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "n_labelled": len(ctx.labelled),
    }
    assert ctx.cfg == replace(CFG, seed=4) == load_yaml(run_dir / "config.yaml")
    assert load_split(run_dir / "split.json", ctx.images) == split
    assert not (run_dir / "dropped.csv").exists(), "no sample was dropped, so there is no list of them"
    labelled = json.loads((run_dir / "labelled.json").read_text(encoding="utf-8"))
    root = ctx.images.root
    assert labelled == {
        "ratio": 0.2,
        "seed": 4,
        "indices": list(ctx.labelled),
        "paths": [str(ctx.images.samples[i].path_a.relative_to(root)) for i in ctx.labelled],
    }
    # reopened, the folder keeps its record (creation time included) and its split
    again = pipeline.open_run(run_dir)
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["created"] == created
    assert again.split == split and again.labelled == ctx.labelled


@pytest.mark.parametrize("labels", [0.0, -0.1, 1.5])
def test_the_label_ratio_must_be_a_fraction(tmp_path, labels):
    message = f"--labels must be a fraction in (0, 1], got {labels}"
    with pytest.raises(pipeline.DataError, match="^" + re.escape(message) + "$"):
        pipeline.init_run(GI, tmp_path / "run", cfg=CFG, labels=labels)
    assert not (tmp_path / "run").exists()
    assert pipeline.init_run(GI, tmp_path / "all", cfg=CFG, labels=1.0).labels_ratio == 1.0


def test_run_reuses_given_encoders_and_skips_the_svd_when_unused(tmp_path, monkeypatch):
    cfg = replace(CFG, pretrain=replace(CFG.pretrain, epochs=1), finetune=replace(CFG.finetune, epochs=1))
    source = pipeline.init_run(GI, tmp_path / "source", cfg=cfg, labels=0.2, seed=4)
    encoders = pipeline.pretrain(source)
    calls: list[tuple[str, Any]] = []
    for stage in ("pretrain", "build_svd", "finetune"):
        original = getattr(pipeline, stage)

        def spied(ctx, *args, _stage=stage, _original=original, **kwargs):
            calls.append((_stage, kwargs.get("pretrained")))
            return _original(ctx, *args, **kwargs)

        monkeypatch.setattr(pipeline, stage, spied)
    # a pre-training folder or the encoders' own path: the same encoders, no pre-training
    for name, given in (("from-folder", tmp_path / "source" / "pretrain"), ("from-file", encoders)):
        calls.clear()
        metrics = pipeline.run(GI, tmp_path / name, cfg=cfg, labels=0.2, seed=4, pretrained=given)
        assert calls == [("build_svd", encoders), ("finetune", encoders)]
        assert (metrics["method"], metrics["labels"], metrics["seed"]) == ("mics", 0.2, 4)
    calls.clear()
    plain = replace(cfg, finetune=replace(cfg.finetune, use_svd=False))
    pipeline.run(GI, tmp_path / "no-svd", cfg=plain, labels=0.2, seed=4, pretrained=encoders)
    assert calls == [("finetune", encoders)], "a run without shifts built a dictionary"
    assert not (tmp_path / "no-svd" / "svd").exists()
    calls.clear()
    pipeline.run(GI, tmp_path / "own", cfg=cfg, labels=0.2, seed=4)
    own = tmp_path / "own" / "pretrain" / "encoders"
    assert calls == [("pretrain", None), ("build_svd", own), ("finetune", own)]


def test_a_resumed_baseline_counts_the_time_before_its_checkpoint(tmp_path):
    run_dir = tmp_path / "fixmatch"
    cfg = replace(SMOKE, ssl=replace(SMOKE.ssl, iterations=3))
    first = pipeline.baseline(GI, run_dir, method="fixmatch", cfg=cfg, labels=0.2, seed=4)
    # as if the process had been killed after 500 s, just after its last checkpoint
    assert 0 < _set_last_elapsed(run_dir / "metrics.jsonl", 500.0) <= first["wall_s"]
    again = pipeline.baseline(GI, run_dir, method="fixmatch", cfg=cfg, labels=0.2, seed=4, resume=True)
    assert 500.0 <= again["wall_s"] < 500.0 + 300
    assert json.loads((run_dir / "metrics.json").read_text())["wall_s"] == again["wall_s"]
