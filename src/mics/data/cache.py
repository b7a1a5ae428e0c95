"""Decode every image once into uint8 arrays, cached on disk and memory-mapped on reuse.

Each image goes through :func:`load_rgb` -> centre square crop -> resize to ``size`` x ``size``
(PIL bilinear with antialiasing). A sample without a modality-B file gets its partner from the
partner generator, applied to the resized modality-A image. The cache key hashes everything the
pixels depend on: the file list with sizes and modification times, the size, the generator's name
and :data:`CACHE_FORMAT`, so stale arrays are never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mics.data.errors import DataError
from mics.data.layouts import ImageSet
from mics.data.validate import load_rgb
from mics.nbi.base import PartnerGenerator, check_batch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the decoding pipeline changes
GENERATOR_CHUNK = 256  # images per generator call (bounds the float working memory)
DECODE_CHUNK = 64


def default_cache_dir() -> Path:
    """``$MICS_CACHE`` if set, else ``~/.cache/mics``."""
    env = os.environ.get("MICS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mics"


def cache_key(images: ImageSet, size: int, generator_name: str) -> str:
    """Hex digest identifying the arrays of ``images`` at ``size`` with ``generator_name``."""
    files: list[list[Any]] = []
    for s in images.samples:
        entry: list[Any] = []
        for p in (s.path_a, s.path_b):
            if p is None:
                entry.append(None)
                continue
            try:
                st = p.stat()
            except OSError as err:
                raise DataError(
                    f"{p}: cannot read the file ({err.strerror or err}); re-run validation"
                ) from None
            entry.append([images.relpath(p), st.st_size, st.st_mtime_ns])
        files.append(entry)
    record: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "root": str(images.root),
        "size": size,
        "generator": generator_name,
        "files": files,
    }
    return hashlib.sha256(json.dumps(record, separators=(",", ":")).encode()).hexdigest()[:32]


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop (short side) and resize: PIL RGB image -> uint8 [size, size, 3]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop first: resize(box=...) would let the filter reach pixels outside the square
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _decode(path: Path, size: int) -> np.ndarray:
    return square_resize(load_rgb(path, draft_size=size), size)


def load_arrays(
    images: ImageSet,
    size: int,
    generator: PartnerGenerator,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Modality A and B as uint8 [N, 3, size, size] arrays (read-only memory maps when cached)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(images, size, generator.name)
    paths = {m: folder / f"{key}-{m}.npy" for m in ("a", "b")}
    if all(p.is_file() for p in paths.values()):
        try:
            return _open(paths["a"], len(images), size), _open(paths["b"], len(images), size)
        except (OSError, ValueError) as err:
            log.warning("cache %s is unreadable (%s); rebuilding it", paths["a"], err)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _build_files(images, size, generator, paths, progress)
    except OSError as err:
        log.warning("cannot write the image cache in %s (%s); keeping the arrays in memory only", folder, err)
        shape = (len(images), 3, size, size)
        a, b = np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=np.uint8)
        _fill(images, size, generator, a, b, progress)
        return a, b
    return _open(paths["a"], len(images), size), _open(paths["b"], len(images), size)


def _open(path: Path, n: int, size: int) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    if array.dtype != np.uint8 or array.shape != (n, 3, size, size):
        raise ValueError(f"unexpected array {array.dtype} {array.shape}")
    return array


def _build_files(
    images: ImageSet, size: int, generator: PartnerGenerator, paths: dict[str, Path], progress: bool
) -> None:
    """Decode into temporary .npy memory maps next to the targets, then rename them into place."""
    shape = (len(images), 3, size, size)
    tmps: dict[str, str] = {}
    try:
        for m, target in paths.items():
            fd, tmps[m] = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".npy")
            os.close(fd)
        arrays = {
            m: np.lib.format.open_memmap(tmps[m], mode="w+", dtype=np.uint8, shape=shape) for m in paths
        }
        _fill(images, size, generator, arrays["a"], arrays["b"], progress)
        for array in arrays.values():
            array.flush()
        arrays.clear()  # drop the memory maps before the files are renamed
        for m in ("b", "a"):  # "a" last: its presence is what a reader checks first
            os.replace(tmps[m], paths[m])
    finally:
        for tmp in tmps.values():
            Path(tmp).unlink(missing_ok=True)


def _fill(
    images: ImageSet,
    size: int,
    generator: PartnerGenerator,
    out_a: np.ndarray,
    out_b: np.ndarray,
    progress: bool,
) -> None:
    """Write every sample into out_a / out_b [N, 3, size, size]; generated partners in chunks."""
    jobs = [
        (i, m, p) for i, s in enumerate(images.samples) for m, p in (("a", s.path_a), ("b", s.path_b)) if p
    ]
    targets = {"a": out_a, "b": out_b}
    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(jobs), desc="decoding images", unit="img", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, len(jobs), DECODE_CHUNK):
            chunk = jobs[start : start + DECODE_CHUNK]
            for (i, m, _), pixels in zip(
                chunk, pool.map(lambda job: _decode(job[2], size), chunk), strict=True
            ):
                targets[m][i] = pixels.transpose(2, 0, 1)
                bar.update(1)
    missing = [i for i, s in enumerate(images.samples) if s.path_b is None]
    for start in range(0, len(missing), GENERATOR_CHUNK):
        idx = np.asarray(missing[start : start + GENERATOR_CHUNK])
        batch = np.ascontiguousarray(np.asarray(out_a[idx]).transpose(0, 2, 3, 1))
        made = check_batch(generator(batch))
        if made.shape != batch.shape:
            raise ValueError(f"partner generator {generator.name!r} returned {made.shape} for {batch.shape}")
        out_b[idx] = made.transpose(0, 3, 1, 2)
