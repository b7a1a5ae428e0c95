"""Paths of the bundled real images and helpers to copy them into test layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
MILK = SAMPLE / "milk10k-5class"
GI = SAMPLE / "hyperkvasir-2class"


def gi_images(cls: str, n: int, start: int = 0) -> list[Path]:
    """The first n (after ``start``) bundled HyperKvasir frames of ``cls`` (polyps | normal-cecum)."""
    files = sorted((GI / cls).glob("*.jpg"))[start : start + n]
    assert len(files) == n, f"bundled sample lacks {n} images of {cls}"
    return files


def milk_lesions(cls: str, n: int) -> list[str]:
    """The first n MILK10k lesion ids of ``cls`` (each has __clinical and __dermoscopic files)."""
    ids = sorted({p.name.split("__")[0] for p in (MILK / cls).glob("*__clinical.jpg")})[:n]
    assert len(ids) == n
    return ids


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
