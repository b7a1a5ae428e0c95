"""Which split each stage reads, by spying on the image arrays: no val or test image reaches a training
batch (pre-training, SVD, fine-tuning, baselines), and model selection reads the val split, never test."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mics import pipeline
from mics.config import preset
from mics.engine.train import Schedule
from mics.methods.budget import finetune_steps_per_epoch, pretrain_steps_per_epoch
from tests.conftest import GI
from tests.pipeline_spies import Reads, phased_fit, recording

SMOKE = preset("smoke")
CFG = replace(
    SMOKE,
    pretrain=replace(SMOKE.pretrain, epochs=1),
    finetune=replace(SMOKE.finetune, epochs=2, min_steps_per_epoch=2),
)


def _spied_context(data: Path, run_dir: Path, reads: Reads) -> pipeline.RunContext:
    ctx = pipeline.init_run(data, run_dir, cfg=CFG, labels=0.2, seed=1)
    ctx.arrays_a = recording(ctx.arrays_a, reads)
    ctx.arrays_b = recording(ctx.arrays_b, reads)
    return ctx


def _splits(ctx: pipeline.RunContext) -> tuple[set[int], set[int], set[int], set[int]]:
    s = ctx.split
    return set(s.train), set(s.val), set(s.test), set(ctx.labelled)


def _recorded_schedules(monkeypatch: pytest.MonkeyPatch) -> list[Schedule]:
    schedules: list[Schedule] = []

    def recording(*args: Any, **kwargs: Any) -> Schedule:
        schedules.append(Schedule(*args, **kwargs))
        return schedules[-1]

    monkeypatch.setattr(pipeline, "Schedule", recording)
    return schedules


def test_mics_stages_read_only_their_split(tmp_path, monkeypatch, capsys):
    reads = Reads()
    monkeypatch.setattr(pipeline, "fit", phased_fit(pipeline.fit, reads))
    schedules = _recorded_schedules(monkeypatch)
    ctx = _spied_context(GI, tmp_path / "run", reads)
    train, val, test, labelled = _splits(ctx)
    assert labelled < train and not train & val and not train & test and not val & test

    pipeline.pretrain(ctx)
    assert set(reads.by_phase) == {"train"}, "pre-training read images outside its batches"
    seen = reads.get("train")
    assert seen <= train
    # one epoch of drop-last batches covers all but fewer than a batch of the training pairs
    assert len(train) - len(seen) < CFG.pretrain.batch_size

    reads.clear()
    capsys.readouterr()
    assert pipeline.build_svd(ctx) == ctx.run_dir / "svd" / "dictionary"
    assert reads.all() == train, "the SVD must encode every training image and nothing else"
    bars = capsys.readouterr().err
    assert "svd a:" in bars and "svd b:" in bars, "each modality's encoding has its own progress bar"
    info = json.loads((ctx.run_dir / "svd" / "dictionary.json").read_text(encoding="utf-8"))["info"]
    assert info == {
        "stage": "svd",
        "clusters": ctx.num_classes,
        "shifts_per_cluster": CFG.svd.shifts_per_cluster,
    }

    reads.clear()
    pipeline.finetune(ctx)
    assert set(reads.by_phase) == {"train", "select"}
    tuned = reads.get("train")
    assert tuned <= labelled, "fine-tuning batches must be labelled training pairs"
    assert len(tuned) > len(labelled) // 2
    assert reads.get("select") == val, "model selection must read the val split"
    assert not reads.all() & test
    # fine-tuning evaluates (and selects) the EMA weights at the configured decay
    assert schedules[-1].ema == CFG.finetune.ema is not None

    reads.clear()
    metrics = pipeline.evaluate(ctx)
    assert reads.all() == val | test  # the test split is read here, once the model is chosen
    saved = json.loads((ctx.run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(metrics)), "evaluate writes what it returns into metrics.json"
    assert (saved["method"], saved["labels"], saved["seed"]) == ("mics", 0.2, 1)
    # both splits' metrics include how well TMC's uncertainty u separates errors (the bench's u-AUROC)
    for name, split in (("val", val), ("test", test)):
        u = np.load(ctx.run_dir / f"{name}_predictions.npz")["uncertainty"]
        assert u.shape == (len(split),) and "uncertainty_auroc" in metrics[name]
        assert metrics[name]["mean_uncertainty"] == pytest.approx(float(u.mean()))
    # the features of the test split, for the UMAP figure, and the predictions of both splits
    saved = np.load(ctx.run_dir / "test_features.npz")
    assert saved["labels"].tolist() == ctx.labels[np.asarray(ctx.split.test)].tolist()
    assert saved["features"].shape[0] == len(test)
    for name, split in (("val", val), ("test", test)):
        assert np.load(ctx.run_dir / f"{name}_predictions.npz")["labels"].shape == (len(split),)
    # fit's selection score and logged values: top-1 and balanced accuracy on val of the model it scores
    model, _ = pipeline.load_finetuned(ctx.run_dir, ctx.device)
    scored = pipeline.val_scorer(ctx)(model)
    assert scored == {
        "score": metrics["val"]["top1"],
        "top1": metrics["val"]["top1"],
        "balanced_accuracy": metrics["val"]["balanced_accuracy"],
    }


@pytest.mark.parametrize("way", ["standard", "multimodal"])
def test_baseline_trains_on_train_and_selects_on_val(tmp_path, monkeypatch, way):
    reads = Reads()
    contexts: list[pipeline.RunContext] = []
    init_run = pipeline.init_run

    def spied_init_run(*args, **kwargs):
        ctx = init_run(*args, **kwargs)
        ctx.arrays_a = recording(ctx.arrays_a, reads)
        ctx.arrays_b = recording(ctx.arrays_b, reads)
        contexts.append(ctx)
        return ctx

    monkeypatch.setattr(pipeline, "init_run", spied_init_run)
    monkeypatch.setattr(pipeline, "fit", phased_fit(pipeline.fit, reads))
    schedules = _recorded_schedules(monkeypatch)
    fit_calls: list[dict[str, Any]] = []
    phased = pipeline.fit

    fit_results: list[Any] = []

    def spied_fit(*args: Any, **kwargs: Any) -> Any:
        fit_calls.append(kwargs)
        fit_results.append(phased(*args, **kwargs))
        return fit_results[-1]

    monkeypatch.setattr(pipeline, "fit", spied_fit)
    cfg = replace(CFG, ssl=replace(CFG.ssl, iterations=6), eval_every=2)
    started = time.time()
    results = pipeline.baseline(GI, tmp_path / "run", method="fixmatch", way=way, cfg=cfg, labels=0.2, seed=1)
    elapsed = time.time() - started
    (ctx,) = contexts
    train, val, test, _ = _splits(ctx)
    seen = reads.get("train")
    assert seen and seen <= train, "a baseline's training batch read a val or test image"
    assert reads.get("select") == val
    assert not (seen | reads.get("select") | reads.get("fit")) & test
    assert reads.get(None) == val | test  # the final metrics, after training
    # the run folder says which baseline made it (bench rows and `mics report` read it from there)
    meta = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert meta["method"] == f"fixmatch/{way}"
    assert schedules[-1].ema == cfg.ssl.ema is not None
    assert fit_calls[-1]["eval_every"] == 2  # the config's, not fit's default of 1
    # what the bench reads back: the method, the budget and the wall time in tenths of a second
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(results))
    assert (saved["method"], saved["way"], saved["seed"], saved["iterations"]) == ("fixmatch", way, 1, 6)
    assert saved["best_epoch"] == fit_results[-1].best_epoch is not None
    assert isinstance(saved["wall_s"], float) and saved["wall_s"] == round(saved["wall_s"], 1) > 0
    assert saved["wall_s"] <= elapsed + 0.05
    assert meta["git_commit"] == pipeline.git_commit()


def test_supervised_baseline_reads_only_labelled_images(tmp_path, monkeypatch):
    reads = Reads()
    contexts: list[pipeline.RunContext] = []
    init_run = pipeline.init_run

    def spied_init_run(*args, **kwargs):
        ctx = init_run(*args, **kwargs)
        ctx.arrays_a = recording(ctx.arrays_a, reads)
        ctx.arrays_b = recording(ctx.arrays_b, reads)
        contexts.append(ctx)
        return ctx

    monkeypatch.setattr(pipeline, "init_run", spied_init_run)
    monkeypatch.setattr(pipeline, "fit", phased_fit(pipeline.fit, reads))
    cfg = replace(CFG, ssl=replace(CFG.ssl, iterations=6))
    pipeline.baseline(GI, tmp_path / "run", method="supervised", cfg=cfg, labels=0.2, seed=1)
    (ctx,) = contexts
    _, val, _, labelled = _splits(ctx)
    assert reads.get("train") and reads.get("train") <= labelled
    assert reads.get("select") == val


def test_labelled_subset_is_drawn_from_train_only(tmp_path):
    # (the run folder's parents are created too: --out runs/<experiment>/<run> on a fresh checkout)
    ctx = pipeline.init_run(GI, tmp_path / "runs" / "grid" / "run", cfg=CFG, labels=1.0, seed=1)
    assert (tmp_path / "runs" / "grid" / "run" / "split.json").exists()
    train, val, test, labelled = _splits(ctx)
    assert labelled == train  # 100 % labels: all of train, and still nothing of val or test
    assert np.isin(list(labelled), list(val | test)).sum() == 0


def test_git_commit_is_the_short_hash_of_the_checkout(tmp_path, monkeypatch) -> None:
    here = Path(pipeline.__file__).resolve().parent
    monkeypatch.chdir(tmp_path)  # the package's checkout, wherever the run is started from
    probe = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    if probe.returncode != 0:
        pytest.skip("the package is not inside a git checkout (installed from a wheel)")
    commit = pipeline.git_commit()
    assert commit == probe.stdout.strip() and len(commit) < 40


def test_each_stage_hands_fit_the_runs_settings(tmp_path, monkeypatch):
    """Stage name, seed, device, checkpoint folder, precision, compile, evaluation and the schedule of each
    stage come from the run's config (values unlike every default, so that a dropped one shows)."""
    cfg = replace(
        CFG,
        precision="bf16",
        compile=True,
        eval_every=2,
        pretrain=replace(CFG.pretrain, epochs=2, lr=3e-4, min_lr=2e-6, weight_decay=0.07, warmup_epochs=1),
        finetune=replace(
            CFG.finetune, epochs=2, lr=5e-5, min_lr=3e-7, weight_decay=0.03, warmup_epochs=1, ema=0.9
        ),
        ssl=replace(CFG.ssl, iterations=6, lr=7e-4, min_lr=4e-6, weight_decay=0.01, warmup_iterations=2),
    )
    schedules = _recorded_schedules(monkeypatch)
    calls: list[dict[str, Any]] = []
    results: list[Any] = []
    fit = pipeline.fit

    def spied_fit(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        # trained in fp32 without compiling, to stay fast: what was asked for is what is checked
        results.append(fit(*args, **{**kwargs, "precision": "fp32", "compile": False}))
        return results[-1]

    monkeypatch.setattr(pipeline, "fit", spied_fit)
    ctx = pipeline.init_run(GI, tmp_path / "run", cfg=cfg, labels=0.2, seed=5)
    pipeline.pretrain(ctx)
    pipeline.build_svd(ctx)
    pipeline.finetune(ctx)
    pipeline.baseline(GI, tmp_path / "base", method="fixmatch", way="multimodal", cfg=cfg, labels=0.2, seed=5)
    pre, tune, base = calls
    n_train, n_labelled = len(ctx.split.train), len(ctx.labelled)
    for call, stage, folder in (
        (pre, "pretrain", tmp_path / "run" / "pretrain"),
        (tune, "finetune", tmp_path / "run" / "finetune"),
        (base, "fixmatch-multimodal", tmp_path / "base" / "baseline"),
    ):
        assert (call["stage"], call["seed"], call["device"], call["ckpt_dir"]) == (
            stage,
            5,
            ctx.device,
            folder,
        )
        assert (call["precision"], call["compile"], call["resume"]) == ("bf16", True, False)
    assert pre.get("evaluate") is None, "pre-training has no labels to select with"
    assert tune["evaluate"] is not None and tune["eval_every"] == 2
    spe = pretrain_steps_per_epoch(cfg, n_train)
    assert schedules[0] == Schedule(2, spe, 3e-4, 2e-6, 0.07, warmup_steps=spe)
    spe = finetune_steps_per_epoch(cfg, n_labelled)
    assert schedules[1] == Schedule(2, spe, 5e-5, 3e-7, 0.03, warmup_steps=spe, ema=0.9)
    # the baseline: 6 iterations over min(finetune.epochs, 6) epochs, warm-up in iterations
    assert schedules[2] == Schedule(2, 3, 7e-4, 4e-6, 0.01, warmup_steps=2, ema=cfg.ssl.ema)
    done = json.loads((tmp_path / "run" / "finetune" / "done.json").read_text(encoding="utf-8"))
    assert done == {"best_epoch": results[1].best_epoch, "best_val_top1": results[1].best_score}
    assert done["best_epoch"] is not None


def test_machine_description_names_processor_threads_and_gpu(monkeypatch) -> None:
    import platform

    cpu = platform.processor() or platform.machine()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.machine_description() == f"{cpu}, {torch.get_num_threads()} threads, no GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    assert pipeline.machine_description() == f"{cpu}, {torch.get_num_threads()} threads, GPU 0"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert pipeline.machine_description().startswith(f"{platform.machine()}, ")


def _bound(function: Any, calls: list[dict[str, Any]]) -> Any:
    """A spy that records each call's arguments by name (defaults filled in) and calls ``function``."""
    import inspect

    signature = inspect.signature(function)

    def spied(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return function(*args, **kwargs)

    return spied


@pytest.mark.parametrize("use_nbi", [True, False])
def test_each_stage_builds_its_batches_and_class_weights_from_the_config(tmp_path, monkeypatch, use_nbi):
    import mics.methods.baseline as baseline_module
    import mics.methods.ssl as ssl_module
    from mics.methods.pretrain import class_weights

    cfg = replace(
        CFG,
        data=replace(CFG.data, class_balance="reweight", paired_aug="shared"),
        finetune=replace(CFG.finetune, use_nbi=use_nbi),
        ssl=replace(CFG.ssl, iterations=2),
    )
    pairs: list[dict[str, Any]] = []
    labelled_calls: list[dict[str, Any]] = []
    ssl_calls: list[dict[str, Any]] = []
    algorithms: list[Any] = []
    monkeypatch.setattr(pipeline, "pair_batches", _bound(pipeline.pair_batches, pairs))
    monkeypatch.setattr(pipeline, "labelled_batches", _bound(pipeline.labelled_batches, labelled_calls))
    monkeypatch.setattr(baseline_module, "ssl_batches", _bound(baseline_module.ssl_batches, ssl_calls))
    build = ssl_module.build_algorithm
    monkeypatch.setattr(
        ssl_module, "build_algorithm", lambda *a, **k: algorithms.append(build(*a, **k)) or algorithms[-1]
    )
    init_run = pipeline.init_run

    def unequal_classes(*args: Any, **kwargs: Any) -> pipeline.RunContext:
        # the bundled sample's labelled subsets are stratified, so equal: 6 labelled images of one class, 2
        # of the other make the class weights differ
        ctx = init_run(*args, **kwargs)
        by_class = [[i for i in ctx.split.train if ctx.labels[i] == c] for c in (0, 1)]
        ctx.labelled = tuple(sorted(by_class[0][:6] + by_class[1][:2]))
        return ctx

    monkeypatch.setattr(pipeline, "init_run", unequal_classes)
    ctx = pipeline.init_run(GI, tmp_path / "run", cfg=cfg, labels=0.2, seed=6)
    train, labelled = np.asarray(ctx.split.train), np.asarray(ctx.labelled)
    weights = class_weights(ctx.labels, labelled, ctx.num_classes)
    assert not np.allclose(weights.numpy(), weights.numpy()[0])

    pipeline.pretrain(ctx)
    (p,) = pairs
    assert p["arrays_a"] is ctx.arrays_a and p["arrays_b"] is ctx.arrays_b
    assert p["indices"].tolist() == train.tolist() and p["batch_size"] == cfg.pretrain.batch_size
    assert (p["device"], p["seed"], p["drop_last"], p["shared_aug"]) == (ctx.device, 6, True, True)

    pipeline.build_svd(ctx)
    pipeline.finetune(ctx)
    (f,) = labelled_calls
    assert f["arrays_a"] is ctx.arrays_a and f["arrays_b"] is (ctx.arrays_b if use_nbi else None)
    assert f["labels"] is not None and f["labels"].tolist() == ctx.labels.tolist()
    assert f["indices"].tolist() == labelled.tolist() and f["batch_size"] == cfg.finetune.batch_size
    assert (f["device"], f["seed"], f["balance"], f["shared_aug"]) == (ctx.device, 6, "reweight", True)
    model, _ = pipeline.load_finetuned(ctx.run_dir, ctx.device)
    assert torch.allclose(model.class_weights, weights)

    pipeline.baseline(GI, tmp_path / "base", method="fixmatch", way="multimodal", cfg=cfg, labels=0.2, seed=6)
    (s,) = ssl_calls
    assert s["labelled"].tolist() == labelled.tolist() and s["unlabelled"].tolist() == train.tolist()
    assert s["labels"].tolist() == ctx.labels.tolist() and s["cfg"] == cfg.ssl and s["way"] == "multimodal"
    assert (s["seed"], s["use_unlabelled"], s["balance"]) == (6, True, "reweight")
    (algorithm,) = algorithms
    assert torch.allclose(torch.as_tensor(algorithm.class_weights), weights)


def test_git_commit_gives_up_on_a_git_that_hangs_or_is_missing(monkeypatch) -> None:
    def hanging(cmd: list[str], **kwargs: Any) -> Any:
        # a run must not wait on git: it is asked with a short timeout, and one that expires gives no hash
        assert 0 < kwargs["timeout"] <= 10
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(pipeline.subprocess, "run", hanging)
    assert pipeline.git_commit() is None

    def missing(cmd: list[str], **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(pipeline.subprocess, "run", missing)
    assert pipeline.git_commit() is None
