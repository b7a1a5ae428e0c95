"""Check every image before training: decode it, convert it to RGB, reject what cannot be used.

Every problem names the file. :func:`load_rgb` is the only place where images are opened, so the
checks and the cache see the same pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from mics.data.errors import DataError
from mics.data.layouts import ImageSet
from mics.errors import naming

# 8192 x 8192: far above any endoscopic or dermoscopic frame, small enough that a corrupt header
# claiming a gigapixel image is refused before its buffer is allocated.
MAX_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Formats PIL may try; limiting them keeps random bytes away from obscure, permissive decoders.
Image.init()  # register every plugin, so that Image.open(formats=...) knows the names below
FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "GIF") if f in Image.OPEN
)
SHOW_BAD = 5
SPLIT_PARTS = 3  # train / val / test: each class needs at least one sample in each

T = TypeVar("T")
R = TypeVar("R")


class _BadImage(Exception):
    """Internal: why a file cannot be used (without the path, which the caller adds)."""


@dataclass
class Dropped:
    """A file left out by ``validate(..., skip_bad=True)`` and why."""

    path: Path
    reason: str


def load_rgb(path: Path, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image, upright (EXIF orientation applied).

    Grayscale, palette, 16-bit, CMYK and alpha images are converted (alpha is composited on black).
    ``draft_size`` lets JPEG decoding use a DCT scale whose result is still at least
    ``draft_size`` pixels on each side (much faster for large files that are resized anyway).
    Raises :class:`DataError` naming the file for anything that is not a usable image.
    """
    try:
        return _decode(Path(path), draft_size)[0]
    except _BadImage as err:
        raise DataError(f"{path}: {err}; fix or remove the file (or pass --skip-bad)") from None


def check_image(path: Path, min_size: int = 16) -> str | None:
    """``None`` if ``path`` decodes to an RGB image at least ``min_size`` px on each side, else why not."""
    try:
        _, (width, height) = _decode(Path(path), draft_size=min_size)
    except _BadImage as err:
        return str(err)
    if min(width, height) < min_size:
        return f"too small ({width}x{height} px, need at least {min_size} px on each side)"
    return None


def _decode(path: Path, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, (width, height) of the full-resolution upright image)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _BadImage("file not found") from None
    except OSError as err:
        raise _BadImage(f"cannot read the file ({err.strerror or err})") from None
    if size == 0:
        raise _BadImage("empty file (0 bytes)")
    too_large = f"image too large (more than {MAX_PIXELS} pixels)"
    try:
        # (no warnings.catch_warnings here: it is not thread-safe, and validate() decodes on threads)
        with Image.open(path, formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS:
                raise _BadImage(too_large)
            full_size = _oriented_size(image)
            if draft_size is not None and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            rgb = _to_rgb(_upright(image))
    except UnidentifiedImageError:
        raise _BadImage("not an image, or a format other than JPEG/PNG/BMP/TIFF/WebP") from None
    except Image.DecompressionBombError:
        raise _BadImage(too_large) from None
    except MemoryError:
        raise _BadImage("image too large to decode in memory") from None
    except _BadImage:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        TypeError,
        KeyError,
        ZeroDivisionError,
    ) as err:
        raise _BadImage(f"corrupt or truncated image data ({type(err).__name__}: {err})") from None
    return rgb, full_size


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # any failure inside the EXIF parser only loses the orientation
        return image


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block only loses the orientation, like exif_transpose does
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; high bit depths are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return image
        mode = "RGBA"
    if mode in ("LA", "La"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "RGBX"):
        if mode == "RGBX":
            return image.convert("RGB")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # composite on black
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    raise _BadImage(f"unsupported pixel mode {mode!r}")


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8 [H, W]; 16-bit ranges map 65535 -> 255."""
    if array.dtype.kind == "f":
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        if hi <= 1.0 and lo >= 0.0:
            return np.round(finite * 255.0).astype(np.uint8)
        span = hi - lo if hi > lo else 1.0
        return np.round((finite - lo) / span * 255.0).astype(np.uint8)
    values = array.astype(np.int64)
    if values.max(initial=0) > 255:
        values = values // 257
    return np.clip(values, 0, 255).astype(np.uint8)


def _parallel_map(fn: Callable[[T], R], items: Sequence[T], desc: str, progress: bool) -> Iterator[R]:
    """``map(fn, items)`` on threads (PIL decodes without the GIL), results in order, with a bar."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for result in pool.map(fn, items, chunksize=16):
            bar.update(1)
            yield result


def validate(
    images: ImageSet,
    *,
    min_size: int = 16,
    skip_bad: bool = False,
    min_per_class: int = 5,
    progress: bool = True,
) -> tuple[ImageSet, list[Dropped]]:
    """Decode every image of both modalities; refuse (or drop, ``skip_bad``) pairs with a bad file.

    Returns the usable ImageSet and the dropped files. Raises :class:`DataError` listing the first bad
    files when ``skip_bad`` is False, and when a class is left with fewer than ``min_per_class`` samples.
    """
    files = [p for s in images.samples for p in (s.path_a, s.path_b) if p is not None]
    reasons = dict(
        zip(
            files,
            _parallel_map(lambda p: check_image(p, min_size), files, "checking images", progress),
            strict=True,
        )
    )
    bad = [(p, r) for p, r in reasons.items() if r is not None]
    if bad and not skip_bad:
        shown = "\n".join(f"  {p}: {r}" for p, r in bad[:SHOW_BAD])
        more = f"\n  ... and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
        raise DataError(
            f"{len(bad)} of {len(files)} image files cannot be used:\n{shown}{more}\n"
            "Fix or remove them, or pass --skip-bad to drop them (and their partners)."
        )
    dropped: list[Dropped] = []
    kept = []
    for sample in images.samples:
        problems = [(p, reasons[p]) for p in (sample.path_a, sample.path_b) if p is not None and reasons[p]]
        if problems:
            dropped += [Dropped(path=p, reason=str(r)) for p, r in problems]
        else:
            kept.append(sample)
    result = dataclasses.replace(images, samples=tuple(kept))
    _check_class_sizes(result, min_per_class, dropped_any=bool(dropped))
    return result, dropped


def _check_class_sizes(images: ImageSet, min_per_class: int, dropped_any: bool) -> None:
    for name, count in images.class_counts().items():
        if count < min_per_class:
            after = " after dropping bad files" if dropped_any else ""
            raise DataError(
                f"class {name!r} has {count} usable sample(s){after}; at least {min_per_class} are needed "
                f"for a 6:2:2 train/val/test split (each of the {SPLIT_PARTS} parts needs one of every "
                "class): add images to it or remove the class folder"
            )


def write_dropped(dropped: Iterable[Dropped], path: Path) -> None:
    """Write the dropped files as a CSV with columns ``path,reason``."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "reason"])
            writer.writerows([str(d.path), d.reason] for d in dropped)
