"""What the stages refuse, with the whole message a user reads: a folder that is no run, a batch that
the processes cannot share, too few training pairs for one batch, an unknown baseline or way."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mics import pipeline
from mics.config import preset
from tests.conftest import GI

SMOKE = preset("smoke")


def _refused(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_open_run_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(
        pipeline.RunError,
        match=_refused(f"{tmp_path} is not a run folder (no run.json); create one with 'mics run'"),
    ):
        pipeline.open_run(tmp_path)


def test_pretraining_batch_must_split_evenly_across_processes(tmp_path, monkeypatch) -> None:
    ctx = pipeline.init_run(GI, tmp_path / "run", cfg=SMOKE, labels=0.2, seed=0)
    monkeypatch.setattr(pipeline.dist, "world_size", lambda: 3)
    with pytest.raises(
        pipeline.RunError, match=_refused("pretrain.batch_size 16 must be divisible by 3 processes")
    ):
        pipeline.pretrain(ctx)


def test_pretraining_needs_one_batch_of_training_pairs(tmp_path) -> None:
    ctx = pipeline.init_run(GI, tmp_path / "run", cfg=SMOKE, labels=0.2, seed=0)
    n = len(ctx.split.train)
    ctx.cfg = replace(SMOKE, pretrain=replace(SMOKE.pretrain, batch_size=n + 1))
    message = (
        f"pre-training needs at least pretrain.batch_size={n + 1} training pairs, "
        f"the split has {n}; lower pretrain.batch_size"
    )
    with pytest.raises(pipeline.RunError, match=_refused(message)):
        pipeline.pretrain(ctx)
    ctx.cfg = replace(SMOKE, pretrain=replace(SMOKE.pretrain, batch_size=n, epochs=1))
    pipeline.pretrain(ctx)  # exactly one batch is enough


def test_baseline_batch_must_split_evenly_across_processes(tmp_path, monkeypatch) -> None:
    init_run = pipeline.init_run

    def joined_by_three(*args, **kwargs):
        ctx = init_run(*args, **kwargs)
        monkeypatch.setattr(pipeline.dist, "world_size", lambda: 3)  # after the folder is written
        return ctx

    monkeypatch.setattr(pipeline, "init_run", joined_by_three)
    with pytest.raises(
        pipeline.RunError, match=_refused("ssl.batch_size 4 must be divisible by 3 processes")
    ):
        pipeline.baseline(GI, tmp_path / "run", method="fixmatch", cfg=SMOKE, labels=0.2, seed=0)


def test_baseline_names_the_methods_and_ways_it_knows(tmp_path) -> None:
    known = "supervised, fixmatch, flexmatch, dash, freematch, softmatch, habit, siabc"
    with pytest.raises(
        pipeline.RunError, match=_refused(f"unknown baseline 'mixmatch'; choose one of {known}")
    ):
        pipeline.baseline(GI, tmp_path / "a", method="mixmatch", cfg=SMOKE)
    with pytest.raises(
        pipeline.RunError, match=_refused("unknown way 'both'; choose 'standard' or 'multimodal'")
    ):
        pipeline.baseline(GI, tmp_path / "b", method="fixmatch", way="both", cfg=SMOKE)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "a refused call made a folder"


def test_pretraining_and_baselines_start_from_the_configs_encoder_weights(tmp_path) -> None:
    from mics.models.init import InitError

    missing = tmp_path / "vit.safetensors"
    cfg = replace(SMOKE, model=replace(SMOKE.model, init=str(missing)))
    message = f"model.init={str(missing)!r}: no such file; give a .safetensors ViT checkpoint or timm:<name>"
    ctx = pipeline.init_run(GI, tmp_path / "run", cfg=cfg, labels=0.2, seed=0)
    with pytest.raises(InitError, match=_refused(message)):
        pipeline.pretrain(ctx)
    with pytest.raises(InitError, match=_refused(message)):
        pipeline.baseline(GI, tmp_path / "base", method="fixmatch", cfg=cfg, labels=0.2, seed=0)


class _Stop(Exception):
    """Raised by a spy once it has what the test asks about."""


def test_the_public_entry_points_default_to_ten_percent_labels_and_auto_pairing(
    tmp_path, monkeypatch
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def stop(*args: Any, **kwargs: Any) -> None:
        seen.append((args, kwargs))
        raise _Stop

    monkeypatch.setattr(pipeline, "init_run", stop)
    with pytest.raises(_Stop):
        pipeline.run(GI, tmp_path / "run")
    with pytest.raises(_Stop):
        pipeline.baseline(GI, tmp_path / "base", method="dash")
    (_, run_kwargs), (_, base_kwargs) = seen
    defaults = {"pair": "auto", "cfg": None, "labels": 0.1, "seed": None, "skip_bad": False, "resume": False}
    assert run_kwargs == defaults
    assert base_kwargs == {**defaults, "method": "dash/standard"}


def test_init_run_defaults_to_the_cpu_preset_ten_percent_labels_and_mics(tmp_path) -> None:
    import json

    from mics.data.layouts import discover

    ctx = pipeline.init_run(GI, tmp_path / "run")
    assert ctx.cfg == preset("cpu") and ctx.labels_ratio == 0.1
    meta = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert (meta["method"], meta["pair"], meta["labels"]) == (
        "mics",
        discover(GI, pair="auto").pair_mode,
        0.1,
    )
