"""Crash-safe checkpoints: safetensors weights + JSON metadata, written atomically, checksummed.

A checkpoint ``NAME`` is two files: ``NAME.safetensors`` (tensors only: model, optimiser and EMA state,
torch RNG states) and ``NAME.json`` (step, epoch, numpy/python RNG states, the sha256 of the weights file).
Both are written to a temporary file and renamed, the JSON last, so a reader sees either the previous
complete checkpoint or the new one, never half of one. Nothing here unpickles: weights come from
safetensors only, so a checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mics.errors import naming
from mics.files import atomic_write_bytes as atomic_write_bytes
from mics.files import atomic_write_json as atomic_write_json
from mics.files import atomic_write_text as atomic_write_text


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or not ours."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_state(prefix: str, state: Any, out: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Split a nested state (dicts/lists of tensors and plain values) into tensors and JSON values."""
    if isinstance(state, torch.Tensor):
        out[prefix] = state.detach().contiguous().cpu()
    elif isinstance(state, dict):
        for k, v in state.items():
            flatten_state(f"{prefix}/{k}" if prefix else str(k), v, out, meta)
    elif isinstance(state, (list, tuple)):
        meta[prefix + "#len"] = len(state)
        meta[prefix + "#type"] = "list"
        for i, v in enumerate(state):
            flatten_state(f"{prefix}/{i}", v, out, meta)
    elif state is None or isinstance(state, (bool, int, float, str)):
        meta[prefix] = state
    else:
        raise TypeError(f"cannot checkpoint value of type {type(state).__name__} at {prefix!r}")


def unflatten_state(prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
    """Inverse of :func:`flatten_state` for one prefix."""
    if prefix in tensors:
        return tensors[prefix]
    if prefix in meta:
        return meta[prefix]
    if meta.get(prefix + "#type") == "list":
        return [unflatten_state(f"{prefix}/{i}", tensors, meta) for i in range(meta[prefix + "#len"])]
    head = prefix + "/" if prefix else ""
    keys = {k[len(head) :].split("/")[0] for k in list(tensors) + list(meta) if k.startswith(head)}
    keys = {k.split("#")[0] for k in keys}
    if not keys:
        raise CheckpointError(f"checkpoint has no entry {prefix!r}")
    result: dict[Any, Any] = {}
    for k in sorted(keys):
        value = unflatten_state(head + k, tensors, meta)
        int_keys = bool(meta.get(prefix + "#intkeys"))
        result[int(k) if int_keys else k] = value
    return result


def _mark_int_keys(prefix: str, state: Any, meta: dict[str, Any]) -> None:
    if isinstance(state, dict):
        if state and all(isinstance(k, int) for k in state):
            meta[prefix + "#intkeys"] = True
        for k, v in state.items():
            _mark_int_keys(f"{prefix}/{k}" if prefix else str(k), v, meta)
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            _mark_int_keys(f"{prefix}/{i}", v, meta)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch (CPU and CUDA), numpy, python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = (
            torch.stack(list(torch.cuda.get_rng_state_all())) if torch.cuda.device_count() else None
        )
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state["numpy"] = {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    py = random.getstate()
    state["python"] = {
        "version": py[0],
        "internal": torch.tensor(py[1], dtype=torch.int64),
        "gauss": py[2] if py[2] is None else float(py[2]),
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"].to(torch.uint8)))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def save_checkpoint(path_stem: Path, state: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """Save a nested ``state`` as ``<stem>.safetensors`` + ``<stem>.json`` atomically (weights first)."""
    path_stem = Path(path_stem)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    _mark_int_keys("", state, meta)
    flatten_state("", state, tensors, meta)
    weights = path_stem.with_suffix(".safetensors")
    with naming(weights):
        weights.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", suffix=".tmp", dir=weights.parent)
        os.close(fd)
        try:
            _save_tensors(_dedupe_storage(tensors), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(Path(tmp))
            os.replace(tmp, weights)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    atomic_write_json(
        path_stem.with_suffix(".json"),
        {
            "format": "mics-checkpoint-v1",
            "weights": weights.name,
            "sha256": digest,
            "info": info or {},
            "values": meta,
        },
    )


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    try:
        save_file(tensors, path, metadata={"format": "mics-checkpoint-v1"})
    except Exception as err:
        # safetensors reports the system's errors (a full disk...) as its own type, the errno only in the
        # text ("I/O error: No space left on device (os error 28)"): give them back their OSError
        found = None if isinstance(err, OSError) else _OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), path) from err


def _dedupe_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights, views): give each its own storage
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or t.storage_offset() != 0 or not t.is_contiguous():
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def load_checkpoint(path_stem: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`; returns (state, info)."""
    path_stem = Path(path_stem)
    meta_path = path_stem.with_suffix(".json")
    weights = path_stem.with_suffix(".safetensors")
    if not meta_path.exists() or not weights.exists():
        raise CheckpointError(f"no checkpoint at {path_stem} (expected {weights.name} and {meta_path.name})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_path} is unreadable: {err}") from None
    if meta.get("format") != "mics-checkpoint-v1":
        raise CheckpointError(f"{meta_path} is not a mics checkpoint")
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {weights} is corrupt: its sha256 does not match {meta_path.name}")
    tensors = load_weights(weights, map_location)
    return unflatten_state("", tensors, meta["values"]), meta.get("info", {})


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file; anything else (a pickle) is refused."""
    path = Path(path)
    # safetensors = 8-byte little-endian header length, then a JSON header; a pickle or a torch.save zip
    # looks different, and is refused before anything could unpickle it
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or not 0 < header_len <= size - 8 or head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is not a safetensors file (pickled checkpoints are refused: they can run code)"
        )
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None
