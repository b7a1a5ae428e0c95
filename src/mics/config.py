"""Typed configuration: one frozen dataclass per stage, three presets, YAML round-trip, dotted overrides.

Every ambiguous choice of the paper (see docs/METHOD.md) is a field here with the project's default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

PresetName = Literal["smoke", "cpu", "paper"]
PRESETS: tuple[str, ...] = ("smoke", "cpu", "paper")


class ConfigError(ValueError):
    """A configuration value or override that cannot be used."""


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 64  # side of the square images fed to the encoders (cache resolution)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test fractions (paper: 6:2:2)
    num_workers: int = 0  # the cache is in memory, so workers rarely pay on CPU
    generator: str = "virtual-nbi"  # partner generator used when a sample has no second image
    # labelled batches of every method alike: "sampler" draws classes uniformly (rare classes repeat),
    # "reweight" weights the labelled losses (CE and evidential) by inverse class frequency, "none" is the
    # plain stream (the first version). Default chosen on val (docs/method.md, "Val ablation"): with
    # finetune.head_lr_mult=10 it gave MICS the best mean of val top-1 and balanced accuracy
    class_balance: Literal["none", "sampler", "reweight"] = "sampler"
    # "shared": the same flip/crop on both images of a pair (co-registered pairs, e.g. virtual NBI)
    paired_aug: Literal["independent", "shared"] = "independent"


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 8
    width: int = 128  # encoder embedding dimension D
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    decoder_width: int = 96
    decoder_depth: int = 2
    decoder_heads: int = 4
    proj_dim: int = 64  # low-dimensional projection for consistency learning (ALBEF: 256)
    gloe_mult: int = 4  # global embedding width = gloe_mult * width (must exceed the encoder width)
    fusion_depth: int = 2  # cross-attention blocks in the fusion encoder
    drop_path: float = 0.0
    # encoder initialisation for every method alike: "" = random (MAE init); a path to a timm-format
    # ViT checkpoint (.safetensors); or "timm:<model name>" (needs internet and the weights in timm's hub)
    init: str = ""


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 40  # label-free, so it sees every training pair; the cpu preset's main cost
    batch_size: int = 64
    lr: float = 1e-4 * 4  # scaled for the small batch and short schedule of the cpu preset
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    warmup_epochs: int = 1
    mask_ratio: float = 0.75  # MAE masking ratio sigma
    norm_pix_loss: bool = False
    momentum: float = 0.995  # EMA of the momentum encoders
    queue_size: int = 512  # K; rounded down to a multiple of the global batch and capped by the data set
    temp: float = 0.07  # learnable temperature, initial value, clamped to [0.001, 0.5]
    alpha: float = 0.4  # momentum-distillation weight, ramped from 0 over the first epoch
    # "index": queue entries of the same sample count as positives (ALBEF idx_queue); "batch": only the
    # current batch's diagonal is positive, so a sample's own earlier feature in the queue is a negative
    queue_positives: Literal["index", "batch"] = "batch"  # "index" not yet confirmed on val
    reconstruction_reduce: Literal["sum", "mean"] = "mean"  # Eq. 6 sums them; "sum" not yet confirmed on val
    w_consistency: float = 1.0  # a_dis
    w_reconstruction: float = 10.0  # a_res (reference code: 10)
    w_alignment: float = 1.0  # a_a
    consistency: bool = True  # ablation switches (Table III)
    reconstruction: bool = True
    alignment: bool = True


@dataclass(frozen=True)
class SVDConfig:
    shifts_per_cluster: int = 64  # P
    shift_mean: Literal["zero_mean", "paper"] = "zero_mean"  # N(0, Sigma_j) vs N(mu_j, Sigma_j)
    prototype: Literal["nearest", "random"] = "nearest"
    shrinkage: float = 1e-3  # eps of Sigma + eps * I, relative to the mean variance
    shift_scale: float = 1.0  # multiplies sampled shifts (1.0 = as the paper)
    # "fused": rescale each shift by mean ||z^f|| / mean ||feature of its modality|| so that shift-to-feature
    # ratio in the fused space equals the one in the encoder space where Sigma_j was estimated
    calibrate: Literal["none", "fused"] = "none"  # "fused" not yet confirmed on val


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4  # the paper's AdamW lr; 4e-4 gave a lower val top-1 on the bundled sample (cpu preset)
    # factor on the lr of every layer that pre-training did not train (fusion encoder, classifier, evidence
    # heads); the pre-trained encoders keep ``lr``. At lr 1e-4 the new evidence heads barely move in the
    # 300 steps of the cpu preset. 10 chosen on val together with class_balance="sampler"; 1 = the paper
    head_lr_mult: float = 10.0
    min_lr: float = 1e-6
    weight_decay: float = 0.02
    warmup_epochs: int = 1
    ema: float = 0.999  # EMA decay of the evaluated weights
    use_nbi: bool = True  # ablation switches (Table IV): NBI encoder + fusion
    use_svd: bool = True
    use_tmc: bool = True
    annealing_epochs: int = 10  # lambda_t = min(1, epoch / annealing_epochs) (TMC: 50, ETMC: 10)
    # "classifier": the fused view's evidence is softplus(classifier(z^f)) (the Eq. 15 classifier) and every
    # view plus the combination gets the evidential loss (ETMC); "head": a separate fused evidence head with
    # no loss of its own (the first version)
    fused_evidence: Literal["classifier", "head"] = "head"  # "classifier" not yet confirmed on val
    predict_from: Literal["combined", "classifier"] = "combined"  # class = argmax of this; u from TMC
    label_smoothing: float = 0.0
    min_steps_per_epoch: int = 10  # few labels make epochs of one step: cycle the labelled set up to this


@dataclass(frozen=True)
class SSLConfig:
    iterations: int = 0  # 0 = match MICS's pre-training + fine-tuning budget (see docs/baselines.md)
    batch_size: int = 32  # labelled batch
    uratio: int = 3  # unlabelled batch = uratio * batch_size (USB: 7)
    lr: float = 1e-4 * 4
    min_lr: float = 1e-6
    weight_decay: float = 0.02
    warmup_iterations: int = 50
    ema: float = 0.999
    lambda_u: float = 1.0
    threshold: float = 0.95  # FixMatch tau
    temperature: float = 0.5  # sharpening T
    randaugment_ops: int = 2
    randaugment_magnitude: int = 10
    params: dict[str, float] = field(default_factory=dict)  # method-specific overrides by name


@dataclass(frozen=True)
class RunConfig:
    preset: str = "cpu"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # bf16 autocast on CUDA and CPU; auto: bf16 where the device computes it natively (CUDA with bf16, a CPU
    # with AMX or AVX512-BF16), else fp32 (engine.train.resolve_precision; the choice is in run.json)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    compile: bool = False  # torch.compile the encoders
    eval_every: int = 1  # epochs between val evaluations
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    svd: SVDConfig = field(default_factory=SVDConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)


def preset(name: str) -> RunConfig:
    """The named preset: ``smoke`` (seconds, tests), ``cpu`` (minutes on 2 cores), ``paper`` (GPUs)."""
    if name == "cpu":
        return RunConfig(preset="cpu")
    if name == "smoke":
        return RunConfig(
            preset="smoke",
            data=DataConfig(image_size=32),
            model=ModelConfig(
                patch_size=8,
                width=32,
                depth=1,
                heads=2,
                decoder_width=32,
                decoder_depth=1,
                decoder_heads=2,
                proj_dim=16,
                fusion_depth=1,
            ),
            pretrain=PretrainConfig(epochs=1, batch_size=16, queue_size=32),
            svd=SVDConfig(shifts_per_cluster=8),
            finetune=FinetuneConfig(epochs=2, batch_size=8, annealing_epochs=1),
            ssl=SSLConfig(iterations=4, batch_size=4, uratio=2, warmup_iterations=1),
        )
    if name == "paper":
        return RunConfig(
            preset="paper",
            precision="bf16",
            data=DataConfig(image_size=256, num_workers=8),
            model=ModelConfig(
                patch_size=16,
                width=768,
                depth=12,
                heads=12,
                decoder_width=512,
                decoder_depth=8,
                decoder_heads=16,
                proj_dim=256,
                gloe_mult=4,
                fusion_depth=6,
                drop_path=0.1,
            ),
            pretrain=PretrainConfig(epochs=100, batch_size=64, lr=1e-4, warmup_epochs=5, queue_size=4096),
            svd=SVDConfig(shifts_per_cluster=256),
            # one lr for every layer, as the paper: head_lr_mult=10 was chosen on val at the cpu preset only
            finetune=FinetuneConfig(
                epochs=50, batch_size=32, lr=1e-4, warmup_epochs=2, annealing_epochs=10, head_lr_mult=1.0
            ),
            ssl=SSLConfig(batch_size=32, uratio=7, lr=1e-4, warmup_iterations=500),
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) suitable for YAML/JSON."""
    out = dataclasses.asdict(cfg)
    return _listify(out)


def _listify(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_listify(v) for v in x]
    return x


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a (possibly partial) nested dict, on top of ``base`` or its preset."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections to values")
    if base is None:
        base = preset(str(data.get("preset", "cpu")))
    return _merge(base, data, prefix="")


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix + key!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key!r} is a section; give it a mapping")
            changes[key] = _merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key)
    return replace(obj, **changes)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {str(k): float(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        return str(value)
    return value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings (value parsed as YAML), e.g. ``pretrain.epochs=5``."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _merge(cfg, tree, prefix="")


def load_yaml(path: str | Path) -> RunConfig:
    """Load a config written by :func:`dump_yaml` (or a partial one) with YAML's safe loader."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        # safe_load refuses python-object tags: a config file cannot run code
        raise ConfigError(f"config {path} is not plain YAML: {err}") from None
    return from_dict(data)


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    # atomic: a config.yaml cut short by a full disk would stop every later --resume
    from mics.files import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
