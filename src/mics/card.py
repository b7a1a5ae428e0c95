"""A model card per run (``RUN/model_card.md``): what was trained on what, how well it does, what its
uncertainty is worth, and what it must not be used for.

Everything comes from the run folder (run.json, config.yaml, split.json, labelled.json, metrics.json,
report.json, finetune/best.json, uncertainty_threshold.json), so ``mics card --run RUN`` rewrites the same
card at any time. Written at the end of ``mics run`` and ``mics evaluate``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mics import __version__

CARD_FILE = "model_card.md"
SMALL_TEST = 200  # below this many test images the card warns that the metrics are imprecise


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensible for small n and proportions near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _class_counts(split: dict[str, Any] | None, classes: list[str], labelled: set[int]) -> list[str]:
    if not split:
        return []
    rows = ["| class | train | labelled | val | test |", "| --- | ---: | ---: | ---: | ---: |"]
    for k, name in enumerate(classes):

        def count(part: str, k: int = k) -> int:
            return sum(1 for s in split.get(part, []) if s["label"] == k)

        n_lab = sum(1 for s in split.get("train", []) if s["label"] == k and s["index"] in labelled)
        counts = [count("train"), n_lab, count("val"), count("test")]
        rows.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    return rows


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    rows = [
        "| split | n | top-1 | balanced accuracy | macro-F1 | ECE | mean u | uncertainty AUROC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("val", "test"):
        m = metrics.get(split)
        if not m:
            continue
        rows.append(
            f"| {split} | {m['n']} | {_pct(m['top1'])} | {_pct(m['balanced_accuracy'])} | "
            f"{_pct(m['macro_f1'])} | {_num(m.get('ece'))} | {_num(m.get('mean_uncertainty'))} | "
            f"{_num(m.get('uncertainty_auroc'))} |"
        )
    return rows


def _per_class(test: dict[str, Any]) -> list[str]:
    rows = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in test.get("per_class", {}).items():
        rows.append(
            f"| {name} | {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} | {m['support']} |"
        )
    return rows


def _confusion(test: dict[str, Any], classes: list[str]) -> list[str]:
    matrix = test.get("confusion")
    if not matrix:
        return []
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "| --- |" + " ---: |" * len(classes)]
    rows += [
        f"| {name} | " + " | ".join(str(v) for v in row) + " |"
        for name, row in zip(classes, matrix, strict=False)
    ]
    return rows


def _threshold_lines(record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return [
            "No low-confidence threshold: this run has no saved val predictions (evaluated by an older "
            "version). Run `mics evaluate --run RUN` to save them and choose one."
        ]
    lines = [
        f"Low-confidence flag: u > **{record['threshold']:.4f}**, chosen on val. Rule: {record['rule']}.",
        "",
        "| split | images | wrong | flagged | wrong among flagged | wrong among not flagged "
        "| errors caught |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("val", "test"):
        s = record.get(split)
        if s:
            lines.append(
                f"| {split} | {s['n']} | {s['errors']} | {s['flagged']} | {_pct(s['error_rate_flagged'])} | "
                f"{_pct(s['error_rate_not_flagged'])} | {_pct(s['errors_caught'])} |"
            )
    return lines


def model_card(run_dir: str | Path) -> str:
    """The Markdown model card of a finished run folder."""
    from mics.config import load_yaml
    from mics.eval.threshold import read_threshold, write_threshold
    from mics.pipeline import RunError

    run_dir = Path(run_dir)
    meta = _read_json(run_dir / "run.json")
    metrics = _read_json(run_dir / "metrics.json")
    if meta is None or metrics is None:
        raise RunError(
            f"{run_dir} has no run.json or metrics.json; a model card needs a finished, evaluated run"
        )
    cfg = load_yaml(run_dir / "config.yaml")
    split = _read_json(run_dir / "split.json")
    labelled_rec = _read_json(run_dir / "labelled.json") or {}
    report = _read_json(run_dir / "report.json") or {}
    best = _read_json(run_dir / "finetune" / "best.json") or {}
    threshold = read_threshold(run_dir) or write_threshold(run_dir)
    classes: list[str] = list(meta["classes"])
    modalities = list(meta.get("modalities") or ["A", "B"])
    method = meta.get("method", "mics")
    generated = meta.get("pair") == "virtual-nbi"
    seed = metrics.get("seed", meta.get("seed"))
    m = cfg.model
    test = metrics.get("test", {})

    lines = [
        f"# Model card: `{run_dir.name}`",
        "",
        f"Written by mics {__version__} on {time.strftime('%Y-%m-%d')} from the files of this run folder "
        "(rewrite it with `mics card --run RUN`).",
        "",
        "## Model",
        "",
    ]
    if method == "mics":
        lines.append(
            "MICS (multimodal semi-supervised classification, arXiv 2509.17492): two ViT encoders "
            f"({modalities[0]} and {modalities[1]}) pre-trained on all training pairs without labels, a "
            "cross-attention fusion encoder, fine-tuned on the labelled pairs"
            + (" with shift vectors (SVD)" if cfg.finetune.use_svd else "")
            + (" and evidential (TMC) fusion of the per-view opinions." if cfg.finetune.use_tmc else ".")
        )
    else:
        lines.append(f"Semi-supervised baseline `{method}` on the MICS backbone.")
    lines += [
        "",
        f"- Backbone: ViT width {m.width}, depth {m.depth}, {m.heads} heads, patch {m.patch_size}, "
        f"input {cfg.data.image_size} x {cfg.data.image_size} px; fusion depth {m.fusion_depth}.",
        f"- Preset: `{meta.get('preset')}`; seed {seed}; selected checkpoint: epoch "
        f"{best.get('info', {}).get('epoch', '?')} (val top-1 {_pct(best.get('info', {}).get('score'))}).",
        f"- Partner image ({modalities[1]}): "
        + (
            f"generated from the {modalities[0]} image by the `{cfg.data.generator}` transform (virtual NBI)."
            if generated
            else f"a real second image of each sample ({meta.get('pair')})."
        ),
        f"- Output: class probabilities over {len(classes)} classes and an uncertainty u in [0, 1] "
        + (
            "(TMC: u = C / S of the combined Dirichlet opinion)."
            if cfg.finetune.use_tmc
            else "(1 - max prob)."
        )
        + "",
        f"- Code: mics {meta.get('mics_version')}, commit {meta.get('git_commit') or 'unknown'}.",
    ]
    if report.get("command"):
        lines.append(f"- Command: `{report['command']}`")
    lines += [
        "",
        "## Data and split",
        "",
        f"- Data: `{meta.get('data')}` ({meta.get('n_samples')} samples, pairing `{meta.get('pair')}`).",
        f"- Classes: {', '.join(classes)}.",
        f"- Split (train / val / test, seed {split.get('seed') if split else '?'}): {meta.get('n_train')} / "
        f"{meta.get('n_val')} / {meta.get('n_test')}, grouped (a lesion or patient never crosses splits) "
        "and stratified by class"
        + (f", fractions {tuple(split['fractions'])}." if split and "fractions" in split else "."),
        f"- Label ratio: {100 * float(meta.get('labels', 0)):g} % of the training split labelled "
        f"({meta.get('n_labelled')} images, seed {labelled_rec.get('seed', seed)}); the rest was used "
        "without labels in pre-training.",
        "",
        *_class_counts(split, classes, set(labelled_rec.get("indices", []))),
        "",
        f"## Metrics (seed {seed})",
        "",
        "Model selection on val; test evaluated once, afterwards.",
        "",
        *_metrics_table(metrics),
        "",
    ]
    if test:
        correct = round(float(test["top1"]) * int(test["n"]))
        lo, hi = wilson_interval(correct, int(test["n"]))
        lines += [
            f"Test top-1 95 % interval (Wilson): {_pct(lo)} to {_pct(hi)} ({correct} of {test['n']} right).",
            "",
            "Per class (test):",
            "",
            *_per_class(test),
            "",
            "Confusion matrix (test, counts; rows = true class):",
            "",
            *_confusion(test, classes),
            "",
        ]
    lines += [
        "## Calibration and uncertainty",
        "",
        f"- ECE (expected calibration error, 15 equal-width confidence bins; 0 = the top probability matches "
        f"the accuracy): val {_num(metrics.get('val', {}).get('ece'))}, test {_num(test.get('ece'))}.",
        "- Uncertainty AUROC (how well u ranks wrong predictions above right ones; 0.5 = no better than "
        f"chance, 1 = every wrong prediction more uncertain than every right one): val "
        f"{_num(metrics.get('val', {}).get('uncertainty_auroc'))}, "
        f"test {_num(test.get('uncertainty_auroc'))}.",
        "",
        *_threshold_lines(threshold),
        "",
        "## Intended use and limits",
        "",
        "- **Research use only.** Not a medical device, not validated for diagnosis or any clinical "
        "decision.",
        f"- Trained and tested only on the data above ({meta.get('n_samples')} samples, {len(classes)} "
        "classes). Images from other devices, sites, populations or classes are out of scope; the model "
        "always answers with one of its classes, even for images of something else.",
    ]
    if generated:
        lines.append(
            f"- The {modalities[1]} partner is **virtual NBI**: a fixed colour transform of the "
            f"{modalities[0]} image, not real narrow-band imaging. It adds no information the "
            f"{modalities[0]} image does not hold, and real NBI images must not be fed in its place."
        )
    if int(test.get("n", 0)) < SMALL_TEST:
        lines.append(
            f"- The test split has only {test.get('n', 0)} images: the metrics above are imprecise (see the "
            "interval) and come from one seed."
        )
    lines.append(
        "- The low-confidence flag is a screening aid chosen on val, not a guarantee: confident "
        "predictions can be wrong."
    )
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``RUN/model_card.md`` (and the val-chosen uncertainty threshold it reports)."""
    from mics.engine.checkpoint import atomic_write_text
    from mics.eval.threshold import write_threshold

    run_dir = Path(run_dir)
    write_threshold(run_dir)
    path = run_dir / CARD_FILE
    atomic_write_text(path, model_card(run_dir))
    return path
