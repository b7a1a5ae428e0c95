"""The public Python API: one function per stage, each operating on a run folder.

    from mics.pipeline import run
    metrics = run("data/sample/milk10k-5class", "runs/demo", preset="cpu", labels=0.1)

A run folder holds ``config.yaml`` (resolved), ``run.json`` (data, classes, ratio, seed), ``split.json``,
``labelled.json``, one sub-folder per stage (``pretrain/``, ``svd/``, ``finetune/`` with checkpoints),
``metrics.jsonl`` + ``tb/`` (training curves), ``metrics.json`` (val + test) and ``report.md``/``.json``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mics import __version__
from mics.config import RunConfig, dump_yaml, load_yaml
from mics.config import preset as preset_config
from mics.data.cache import load_arrays
from mics.data.errors import DataError
from mics.data.layouts import ImageSet, discover
from mics.data.splits import Split, labelled_subset, load_split, make_split, save_split
from mics.data.validate import validate, write_dropped
from mics.engine import distributed as dist
from mics.engine.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from mics.engine.logging import MetricsLogger, RunClock, info, last_elapsed
from mics.engine.train import Schedule, fit, resolve_device, resolve_precision, seed_all
from mics.eval.metrics import classification_metrics
from mics.methods.budget import finetune_steps_per_epoch, pretrain_steps_per_epoch
from mics.methods.finetune import FusionFinetuning, labelled_batches
from mics.methods.pretrain import SynergisticPretraining, build_encoder, class_weights, pair_batches
from mics.methods.svd import ShiftDictionary, build_dictionary, encode_features
from mics.models.init import init_encoders
from mics.nbi import get_generator

STAGES = ("pretrain", "svd", "finetune", "evaluate")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (missing stage, mismatched data or config)."""


@dataclass
class RunContext:
    """Everything a stage needs, loaded once: config, data, split, decoded images, device."""

    run_dir: Path
    cfg: RunConfig
    images: ImageSet
    split: Split
    labelled: tuple[int, ...]
    labels_ratio: float
    arrays_a: np.ndarray  # uint8 [N, 3, S, S]
    arrays_b: np.ndarray  # uint8 [N, 3, S, S] (generated partner where the data has none)
    device: torch.device
    clock: RunClock = field(default_factory=RunClock)  # the run's wall time, resumes included

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels()

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"


def init_run(
    data: str | Path,
    run_dir: str | Path,
    *,
    pair: str = "auto",
    cfg: RunConfig | None = None,
    labels: float = 0.1,
    seed: int | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    method: str = "mics",
) -> RunContext:
    """Create (or, with ``resume``, reopen) a run folder for ``data`` and load everything stages need."""
    clock = RunClock()
    run_dir = Path(run_dir)
    cfg = cfg or preset_config("cpu")
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    if not 0.0 < labels <= 1.0:
        raise DataError(f"--labels must be a fraction in (0, 1], got {labels}")
    # under torchrun: join the process group before the folder is read or written, so that only rank 0
    # writes and every rank has checked the folder before rank 0 fills it
    dist.init_from_env(resolve_device(cfg.device))
    existing = run_dir / "run.json"
    held = existing.exists()
    dist.barrier()
    if held and not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if held:
        meta = json.loads(existing.read_text(encoding="utf-8"))
        if Path(meta["data"]).resolve() != Path(data).resolve():
            raise RunError(f"{run_dir} was made for data {meta['data']}, not {data}")
        cfg = load_yaml(run_dir / "config.yaml")
        labels = float(meta["labels"])
        clock.base_s = last_elapsed(run_dir / "metrics.jsonl")
    # an unusable --out (under a file, read-only) fails now, not after every image has been checked
    run_dir.mkdir(parents=True, exist_ok=True)
    images = discover(data, pair=pair)
    images, dropped = validate(images, skip_bad=skip_bad, progress=dist.is_main())
    if dropped and dist.is_main():
        write_dropped(dropped, run_dir / "dropped.csv")
        info(f"dropped {len(dropped)} bad samples; list written to {run_dir / 'dropped.csv'}")
    split_path = run_dir / "split.json"
    if split_path.exists():
        split = load_split(split_path, images)
    else:
        split = make_split(
            images.labels(),
            images.groups(),
            seed=cfg.seed,
            fractions=cfg.data.split,
            class_names=images.classes,
        )
        if dist.is_main():
            save_split(split, images, split_path)
    labelled = labelled_subset(images.labels(), split.train, labels, seed=cfg.seed)
    if dist.is_main():
        dump_yaml(cfg, run_dir / "config.yaml")
        atomic_write_json(
            run_dir / "labelled.json",
            {
                "ratio": labels,
                "seed": cfg.seed,
                "indices": list(labelled),
                "paths": [str(images.samples[i].path_a.relative_to(images.root)) for i in labelled],
            },
        )
        if not existing.exists():
            atomic_write_json(
                existing,
                {
                    "method": method,
                    "data": str(Path(data).resolve()),
                    "pair": images.pair_mode,
                    "classes": list(images.classes),
                    "modalities": list(images.modalities),
                    "labels": labels,
                    "seed": cfg.seed,
                    "preset": cfg.preset,
                    "precision": resolve_precision(cfg.precision, resolve_device(cfg.device)),
                    "mics_version": __version__,
                    "git_commit": git_commit(),
                    "n_samples": len(images),
                    "n_train": len(split.train),
                    "n_val": len(split.val),
                    "n_test": len(split.test),
                    "n_labelled": len(labelled),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
    device = resolve_device(cfg.device)
    generator = get_generator(cfg.data.generator)
    with dist.main_first():
        arrays_a, arrays_b = load_arrays(images, cfg.data.image_size, generator, progress=dist.is_main())
    return RunContext(run_dir, cfg, images, split, labelled, labels, arrays_a, arrays_b, device, clock)


def open_run(run_dir: str | Path) -> RunContext:
    """Reopen an existing run folder (its data must still be where it was)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise RunError(f"{run_dir} is not a run folder (no run.json); create one with 'mics run'")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return init_run(
        meta["data"],
        run_dir,
        pair=meta["pair"],
        cfg=load_yaml(run_dir / "config.yaml"),
        labels=float(meta["labels"]),
        resume=True,
        method=meta.get("method", "mics"),
    )


def pretrain(ctx: RunContext, resume: bool = False) -> Path:
    """Stage 1 on every training pair (labels unused); writes ``pretrain/encoders.safetensors``."""
    cfg = ctx.cfg
    out = ctx.run_dir / "pretrain"
    final = out / "encoders"
    if resume and (final.with_suffix(".json")).exists():
        info("[pretrain] already done; skipping")
        return final
    train = np.asarray(ctx.split.train)
    world = dist.world_size()
    if cfg.pretrain.batch_size % world:
        raise RunError(
            f"pretrain.batch_size {cfg.pretrain.batch_size} must be divisible by {world} processes"
        )
    if len(train) < cfg.pretrain.batch_size:
        raise RunError(
            f"pre-training needs at least pretrain.batch_size={cfg.pretrain.batch_size} training pairs, "
            f"the split has {len(train)}; lower pretrain.batch_size"
        )
    seed_all(cfg.seed)
    model = SynergisticPretraining(
        cfg.model, cfg.pretrain, cfg.data.image_size, len(train), cfg.pretrain.batch_size
    )
    spe = pretrain_steps_per_epoch(cfg, len(train))
    schedule = Schedule(
        cfg.pretrain.epochs,
        spe,
        cfg.pretrain.lr,
        cfg.pretrain.min_lr,
        cfg.pretrain.weight_decay,
        warmup_steps=cfg.pretrain.warmup_epochs * spe,
    )
    init_encoders(model, cfg.model.init)
    batches = pair_batches(
        ctx.arrays_a,
        ctx.arrays_b,
        train,
        cfg.pretrain.batch_size // world,
        ctx.device,
        seed=cfg.seed,
        shared_aug=cfg.data.paired_aug == "shared",
    )
    logger = MetricsLogger(ctx.run_dir, clock=ctx.clock)
    fit(
        model,
        batches,
        schedule,
        stage="pretrain",
        seed=cfg.seed,
        device=ctx.device,
        ckpt_dir=out,
        logger=logger,
        precision=cfg.precision,
        compile=cfg.compile,
        resume=resume,
    )
    logger.close()
    if dist.is_main():
        save_checkpoint(
            final,
            {"enc_a": model.enc_a.state_dict(), "enc_b": model.enc_b.state_dict()},
            info={"stage": "pretrain", "epochs": cfg.pretrain.epochs},
        )
    dist.barrier()
    return final


def load_encoders(path: Path, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    state, _ = load_checkpoint(path, map_location=device)
    return state


def build_svd(ctx: RunContext, resume: bool = False, pretrained: Path | None = None) -> Path:
    """Stage 2: shift vector dictionaries of both modalities from the pre-trained encoders."""
    cfg = ctx.cfg
    out = ctx.run_dir / "svd" / "dictionary"
    if resume and out.with_suffix(".json").exists():
        info("[svd] already done; skipping")
        return out
    encoders = load_encoders(pretrained or ctx.run_dir / "pretrain" / "encoders", ctx.device)
    train = np.asarray(ctx.split.train)
    state: dict[str, Any] = {}
    for which, arrays, key in (("a", ctx.arrays_a, "enc_a"), ("b", ctx.arrays_b, "enc_b")):
        encoder = build_encoder(cfg.model, cfg.data.image_size).to(ctx.device)
        encoder.load_state_dict(encoders[key])
        feats = encode_features(encoder, arrays, train, ctx.device, desc=f"svd {which}")
        d = build_dictionary(feats, ctx.num_classes, cfg.svd, seed=cfg.seed)
        state[which] = {"prototypes": d.prototypes, "shifts": d.shifts}
    if dist.is_main():
        save_checkpoint(
            out,
            state,
            info={
                "stage": "svd",
                "clusters": ctx.num_classes,
                "shifts_per_cluster": cfg.svd.shifts_per_cluster,
            },
        )
    dist.barrier()
    return out


@torch.no_grad()
def predict_arrays(
    model: torch.nn.Module,
    arrays_a: np.ndarray,
    arrays_b: np.ndarray | None,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """probs [n, C], uncertainty [n], features [n, D] of the selected samples (no augmentation), for any
    model with ``predict(a, b) -> Prediction`` and ``uses_partner`` (MICS and the baselines)."""
    from mics.data.views import to_float

    def load(arrays: np.ndarray, sel: np.ndarray) -> torch.Tensor:
        return to_float(torch.from_numpy(np.ascontiguousarray(arrays[sel])).to(device))

    model.eval()
    probs, unc, feats = [], [], []
    for start in range(0, len(indices), batch_size):
        sel = np.asarray(indices[start : start + batch_size])
        b = load(arrays_b, sel) if arrays_b is not None and model.uses_partner else None
        p = model.predict(load(arrays_a, sel), b)  # type: ignore[operator]
        probs.append(p.probs.cpu().numpy())
        unc.append(p.uncertainty.cpu().numpy())
        feats.append(p.features.cpu().numpy())
    model.train()
    if not probs:
        return np.zeros((0, model.num_classes)), np.zeros(0), np.zeros((0, 0))  # type: ignore[arg-type]
    return np.concatenate(probs), np.concatenate(unc), np.concatenate(feats)


def val_scorer(ctx: RunContext) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The model-selection score on the val split (top-1), as ``fit`` expects it."""
    val = np.asarray(ctx.split.val)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        probs, _, _ = predict_arrays(m, ctx.arrays_a, ctx.arrays_b, val, ctx.device)
        met = classification_metrics(ctx.labels[val], probs, ctx.images.classes)
        return {"score": met["top1"], "top1": met["top1"], "balanced_accuracy": met["balanced_accuracy"]}

    return evaluate


def split_metrics(ctx: RunContext, model: torch.nn.Module) -> dict[str, Any]:
    """Val and test metrics of a selected model; saves the test features for the UMAP figures."""
    results: dict[str, Any] = {}
    for name in ("val", "test"):
        idx = np.asarray(getattr(ctx.split, name))
        probs, unc, feats = predict_arrays(model, ctx.arrays_a, ctx.arrays_b, idx, ctx.device)
        results[name] = classification_metrics(ctx.labels[idx], probs, ctx.images.classes, uncertainty=unc)
        if dist.is_main():
            # the low-confidence threshold (chosen on val) and the model card read these
            np.savez_compressed(
                ctx.run_dir / f"{name}_predictions.npz", probs=probs, uncertainty=unc, labels=ctx.labels[idx]
            )
        if name == "test" and dist.is_main():
            np.savez_compressed(ctx.run_dir / "test_features.npz", features=feats, labels=ctx.labels[idx])
    return results


def finetune(ctx: RunContext, resume: bool = False, pretrained: Path | None = None) -> Path:
    """Stage 3 on the labelled pairs; model selection on val; writes ``finetune/best``."""
    cfg = ctx.cfg
    out = ctx.run_dir / "finetune"
    if resume and (out / "done.json").exists():
        info("[finetune] already done; skipping")
        return out / "best"
    seed_all(cfg.seed)
    # the SVD dictionaries are set below, from the stage's checkpoint, before fit() builds the EMA copy
    model = FusionFinetuning(cfg.model, cfg.finetune, cfg.svd, cfg.data.image_size, ctx.num_classes)
    encoders = load_encoders(pretrained or ctx.run_dir / "pretrain" / "encoders", torch.device("cpu"))
    model.enc_a.load_state_dict(encoders["enc_a"])
    if cfg.finetune.use_nbi:
        model.enc_b.load_state_dict(encoders["enc_b"])
    if cfg.finetune.use_svd:
        svd_state, _ = load_checkpoint(ctx.run_dir / "svd" / "dictionary")
        model.set_dictionaries(
            ShiftDictionary(**svd_state["a"]),
            ShiftDictionary(**svd_state["b"]) if cfg.finetune.use_nbi else None,
        )
    labelled = np.asarray(ctx.labelled)
    if cfg.data.class_balance == "reweight":
        model.class_weights.copy_(class_weights(ctx.labels, labelled, ctx.num_classes))
    spe = finetune_steps_per_epoch(cfg, len(labelled))
    schedule = Schedule(
        cfg.finetune.epochs,
        spe,
        cfg.finetune.lr,
        cfg.finetune.min_lr,
        cfg.finetune.weight_decay,
        warmup_steps=cfg.finetune.warmup_epochs * spe,
        ema=cfg.finetune.ema,
    )
    batches = labelled_batches(
        ctx.arrays_a,
        ctx.arrays_b if cfg.finetune.use_nbi else None,
        ctx.labels,
        labelled,
        cfg.finetune.batch_size // dist.world_size(),
        spe,
        ctx.device,
        seed=cfg.seed,
        balance=cfg.data.class_balance,
        shared_aug=cfg.data.paired_aug == "shared",
    )
    logger = MetricsLogger(ctx.run_dir, clock=ctx.clock)
    result = fit(
        model,
        batches,
        schedule,
        stage="finetune",
        seed=cfg.seed,
        device=ctx.device,
        ckpt_dir=out,
        logger=logger,
        evaluate=val_scorer(ctx),
        eval_every=cfg.eval_every,
        precision=cfg.precision,
        compile=cfg.compile,
        resume=resume,
    )
    logger.close()
    if dist.is_main():
        atomic_write_json(
            out / "done.json", {"best_epoch": result.best_epoch, "best_val_top1": result.best_score}
        )
    dist.barrier()
    return out / "best"


def load_finetuned(
    run_dir: Path, device: torch.device | None = None
) -> tuple[FusionFinetuning, dict[str, Any]]:
    """The selected fine-tuned model of a run folder, for evaluation and prediction."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    cfg = load_yaml(run_dir / "config.yaml")
    device = device or resolve_device(cfg.device)
    state, _ = load_checkpoint(run_dir / "finetune" / "best", map_location="cpu")
    weights = state["model"]
    if "evidence_f.fc.weight" in weights and cfg.finetune.fused_evidence != "head":
        # a run folder of the first version (separate fused evidence head) predates the config field
        cfg = replace(cfg, finetune=replace(cfg.finetune, fused_evidence="head"))
    weights.setdefault("class_weights", torch.ones(len(meta["classes"])))
    model = FusionFinetuning(cfg.model, cfg.finetune, cfg.svd, cfg.data.image_size, len(meta["classes"]))
    if cfg.finetune.use_svd:
        model.set_dictionaries(
            ShiftDictionary(weights["svd_a_prototypes"], weights["svd_a_shifts"]),
            ShiftDictionary(weights["svd_b_prototypes"], weights["svd_b_shifts"])
            if cfg.finetune.use_nbi
            else None,
        )
    model.load_state_dict(weights)
    return model.to(device).eval(), {"meta": meta, "cfg": cfg}


def evaluate(ctx: RunContext) -> dict[str, Any]:
    """Val and test metrics of the selected model; the test split is used here only, once."""
    model, _ = load_finetuned(ctx.run_dir, ctx.device)
    results = split_metrics(ctx, model)
    results["method"] = "mics"
    results["labels"] = ctx.labels_ratio
    results["seed"] = ctx.cfg.seed
    if dist.is_main():
        atomic_write_json(ctx.run_dir / "metrics.json", results)
    return results


def run(
    data: str | Path,
    run_dir: str | Path,
    *,
    pair: str = "auto",
    cfg: RunConfig | None = None,
    labels: float = 0.1,
    seed: int | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    pretrained: str | Path | None = None,
) -> dict[str, Any]:
    """The whole MICS pipeline: split, pre-train (or reuse ``pretrained`` encoders), SVD, fine-tune,
    evaluate."""
    ctx = init_run(
        data, run_dir, pair=pair, cfg=cfg, labels=labels, seed=seed, skip_bad=skip_bad, resume=resume
    )
    encoders = Path(pretrained) if pretrained else None
    if encoders is not None and encoders.is_dir():
        encoders = encoders / "encoders"
    if encoders is None:
        encoders = pretrain(ctx, resume=resume)
    if ctx.cfg.finetune.use_svd:
        build_svd(ctx, resume=resume, pretrained=encoders)
    finetune(ctx, resume=resume, pretrained=encoders)
    results = evaluate(ctx)
    results["wall_s"] = round(ctx.clock.elapsed(), 1)
    if dist.is_main():
        atomic_write_json(ctx.run_dir / "metrics.json", results)
    return results


BASELINE_METHODS = ("supervised", "fixmatch", "flexmatch", "dash", "freematch", "softmatch", "habit", "siabc")
WAYS = ("standard", "multimodal")


def baseline(
    data: str | Path,
    run_dir: str | Path,
    *,
    method: str,
    way: str = "standard",
    pair: str = "auto",
    cfg: RunConfig | None = None,
    labels: float = 0.1,
    seed: int | None = None,
    skip_bad: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one semi-supervised baseline on the same split and budget as MICS; writes ``metrics.json``."""
    from mics.methods.baseline import SSLTraining, ssl_batches, ssl_iterations
    from mics.methods.ssl import build_algorithm

    if method not in BASELINE_METHODS:
        raise RunError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINE_METHODS)}")
    if way not in WAYS:
        raise RunError(f"unknown way {way!r}; choose 'standard' or 'multimodal'")
    ctx = init_run(
        data,
        run_dir,
        pair=pair,
        cfg=cfg,
        labels=labels,
        seed=seed,
        skip_bad=skip_bad,
        resume=resume,
        method=f"{method}/{way}",
    )
    cfg = ctx.cfg
    out = ctx.run_dir / "baseline"
    train, labelled = np.asarray(ctx.split.train), np.asarray(ctx.labelled)
    # USB's convention: every training image (labelled ones included) is in the unlabelled stream
    unlabelled = train
    if cfg.ssl.batch_size % dist.world_size():
        raise RunError(
            f"ssl.batch_size {cfg.ssl.batch_size} must be divisible by {dist.world_size()} processes"
        )
    total = ssl_iterations(cfg, len(train), len(labelled))
    epochs = max(1, min(cfg.finetune.epochs, total))
    spe = math.ceil(total / epochs)
    seed_all(cfg.seed)
    algorithm = build_algorithm(method, ctx.num_classes, len(unlabelled), cfg.ssl)
    if cfg.data.class_balance == "reweight":
        algorithm.class_weights = class_weights(ctx.labels, labelled, ctx.num_classes)
    model = SSLTraining(cfg.model, cfg.data.image_size, ctx.num_classes, algorithm)
    init_encoders(model, cfg.model.init)
    schedule = Schedule(
        epochs,
        spe,
        cfg.ssl.lr,
        cfg.ssl.min_lr,
        cfg.ssl.weight_decay,
        warmup_steps=min(cfg.ssl.warmup_iterations, epochs * spe),
        ema=cfg.ssl.ema,
    )
    batches = ssl_batches(
        ctx.arrays_a,
        ctx.arrays_b,
        ctx.labels,
        labelled,
        unlabelled,
        cfg.ssl,
        way,  # type: ignore[arg-type]
        spe,
        ctx.device,
        seed=cfg.seed,
        use_unlabelled=method != "supervised",
        balance=cfg.data.class_balance,
    )

    logger = MetricsLogger(ctx.run_dir, clock=ctx.clock)
    result = fit(
        model,
        batches,
        schedule,
        stage=f"{method}-{way}",
        seed=cfg.seed,
        device=ctx.device,
        ckpt_dir=out,
        logger=logger,
        evaluate=val_scorer(ctx),
        eval_every=cfg.eval_every,
        precision=cfg.precision,
        compile=cfg.compile,
        resume=resume,
        extra=algorithm,
    )
    logger.close()
    results = split_metrics(ctx, model)
    results.update(
        method=method,
        way=way,
        labels=ctx.labels_ratio,
        seed=cfg.seed,
        iterations=total,
        best_epoch=result.best_epoch,
        wall_s=round(ctx.clock.elapsed(), 1),
    )
    if dist.is_main():
        atomic_write_json(ctx.run_dir / "metrics.json", results)
    return results
