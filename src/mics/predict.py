"""Prediction on image files with a finished run: class, probabilities and TMC uncertainty per image.

Each image is validated and decoded exactly as in training (same crop, size and, when no partner is
given, the same generated partner). A bad image yields an error entry; the others are still predicted.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mics.data.cache import square_resize
from mics.data.errors import DataError
from mics.data.validate import load_rgb
from mics.data.views import to_float
from mics.engine.train import resolve_device
from mics.nbi import get_generator


def _decode(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] or DataError naming the file."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return square_resize(load_rgb(path, draft_size=size), size)


def predict_files(
    run_dir: str | Path,
    images: Sequence[Path],
    partners: Sequence[Path] | None = None,
    device: str | None = None,
    batch_size: int = 64,
    engine: str = "torch",
    onnx_path: Path | None = None,
) -> list[dict[str, Any]]:
    """One dict per input: ``image``, ``partner``, ``class``, ``probabilities``, ``uncertainty``
    (or ``error``). ``engine="onnx"`` runs the run's exported graph (``onnx_path``, default
    RUN/model.onnx, written by ``mics export``) with onnxruntime instead of the PyTorch model."""
    from mics.pipeline import RunError, load_finetuned

    run_dir = Path(run_dir)
    if engine == "onnx":
        return _predict_onnx(run_dir, images, partners, onnx_path or run_dir / "model.onnx", batch_size)
    if engine != "torch":
        raise RunError(f"unknown engine {engine!r}; choose 'torch' or 'onnx'")
    if not (run_dir / "finetune" / "best.json").exists():
        raise RunError(
            f"{run_dir} has no fine-tuned model (finetune/best); finish the run with 'mics run' first"
        )
    if partners and len(partners) != len(images):
        raise DataError(
            f"got {len(images)} images but {len(partners)} --partner images; give one partner per image "
            "or none (then the partner is generated as in training)"
        )
    model, loaded = load_finetuned(run_dir, resolve_device(device or "auto"))
    cfg, meta = loaded["cfg"], loaded["meta"]
    classes: list[str] = meta["classes"]
    size = cfg.data.image_size
    generator = get_generator(cfg.data.generator)
    paired_data = meta.get("pair", "virtual-nbi") != "virtual-nbi"
    if paired_data and not partners and cfg.finetune.use_nbi:
        raise DataError(
            f"this model was trained on real pairs ({meta['pair']}): give each image's partner with --partner"
        )
    rows: list[dict[str, Any]] = []
    ready: list[tuple[int, np.ndarray, np.ndarray]] = []
    for i, path in enumerate(images):
        row: dict[str, Any] = {"image": str(path), "partner": str(partners[i]) if partners else None}
        rows.append(row)
        try:
            a = _decode(Path(path), size)
            b = _decode(Path(partners[i]), size) if partners else generator(a[None])[0]
        except DataError as err:
            row["error"] = str(err)
            continue
        ready.append((i, a, b))
    device_t = next(model.parameters()).device
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        xa = torch.from_numpy(np.stack([c[1] for c in chunk])).permute(0, 3, 1, 2).contiguous().to(device_t)
        xb = torch.from_numpy(np.stack([c[2] for c in chunk])).permute(0, 3, 1, 2).contiguous().to(device_t)
        pred = model.predict(to_float(xa), to_float(xb) if cfg.finetune.use_nbi else None)
        for j, (i, _, _) in enumerate(chunk):
            probs = pred.probs[j].cpu().tolist()
            rows[i].update(
                {
                    "class": classes[int(np.argmax(probs))],
                    "probabilities": {c: round(p, 6) for c, p in zip(classes, probs, strict=True)},
                    "uncertainty": round(float(pred.uncertainty[j]), 6),
                }
            )
    return rows


def _predict_onnx(
    run_dir: Path,
    images: Sequence[Path],
    partners: Sequence[Path] | None,
    onnx_path: Path,
    batch_size: int,
) -> list[dict[str, Any]]:
    """:func:`predict_files` through the exported graph; images are decoded by the same code as training."""
    from mics.onnx_predict import OnnxModel
    from mics.pipeline import RunError

    if not onnx_path.is_file():
        raise RunError(f"{onnx_path} does not exist; write it with 'mics export --run {run_dir}' first")
    try:
        model = OnnxModel(onnx_path)
    except ImportError:
        raise RunError("the onnx engine needs onnxruntime: pip install 'mics[export]'") from None
    except ValueError as err:
        raise RunError(f"{err}; write it again with 'mics export --run {run_dir}'") from None
    if partners and len(partners) != len(images):
        raise DataError(
            f"got {len(images)} images but {len(partners)} --partner images; give one partner per image"
        )
    if model.needs_partner and not partners:
        raise DataError("this model was trained on real pairs: give each image's partner with --partner")
    if partners and model.info["partner"] == "generated":
        raise DataError(
            f"{onnx_path} generates the partner inside the graph and takes no --partner; "
            "drop --partner or use --engine torch"
        )
    use_partners = partners if model.needs_partner else None
    size = model.image_size
    rows: list[dict[str, Any]] = []
    ready: list[tuple[int, np.ndarray, np.ndarray | None]] = []
    for i, path in enumerate(images):
        rows.append({"image": str(path), "partner": str(partners[i]) if partners else None})
        try:
            a = _decode(Path(path), size)
            b = _decode(Path(use_partners[i]), size) if use_partners else None
        except DataError as err:
            rows[i]["error"] = str(err)
            continue
        ready.append((i, a, b))
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        out = model.predict(
            np.stack([c[1] for c in chunk]),
            np.stack([c[2] for c in chunk if c[2] is not None]) if use_partners else None,
        )
        for j, (i, _, _) in enumerate(chunk):
            probs = [float(p) for p in out["probabilities"][j]]
            rows[i].update(
                {
                    "class": model.classes[int(np.argmax(probs))],
                    "probabilities": {c: round(p, 6) for c, p in zip(model.classes, probs, strict=True)},
                    "uncertainty": round(float(out["uncertainty"][j]), 6),
                }
            )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV with one column per class probability; errors in their own column."""
    classes = next((list(r["probabilities"]) for r in rows if "probabilities" in r), [])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "partner", "class", "uncertainty", *[f"p_{c}" for c in classes], "error"])
    for r in rows:
        probs = r.get("probabilities", {})
        writer.writerow(
            [
                r["image"],
                r.get("partner") or "",
                r.get("class", ""),
                r.get("uncertainty", ""),
                *[probs.get(c, "") for c in classes],
                r.get("error", ""),
            ]
        )
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
