"""Grouped, stratified train/val/test split (paper: 6:2:2) and the labelled subset of the train split.

Groups (lesions, patients) never cross splits: each group is assigned whole. Stratification is by
the group's class (the most frequent label among its samples), so class proportions hold per split
up to the rounding of group counts. Everything is a pure function of (labels, groups, seed).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mics.data.errors import DataError
from mics.data.layouts import ImageSet
from mics.files import atomic_write_text

SPLIT_FORMAT = 1
PARTS: tuple[str, str, str] = ("train", "val", "test")
_SPLIT_STREAM = 0
_LABELLED_STREAM = 1


@dataclass(frozen=True)
class Split:
    """Indices into ``ImageSet.samples`` of each part, sorted ascending."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    seed: int
    fractions: tuple[float, float, float]


def make_split(
    labels: np.ndarray,
    groups: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    class_names: Sequence[str] | None = None,
) -> Split:
    """Split samples into train/val/test by whole groups, per class, reproducibly from ``seed``.

    labels: int [N]; groups: [N] group ids. Each class needs at least 3 groups so that every part gets
    one; its groups are shuffled (seeded per class) and cut by largest-remainder rounding of
    ``fractions * n_groups``.
    """
    labels = np.asarray(labels)
    fractions = _check_fractions(fractions)
    if labels.ndim != 1 or len(labels) != len(groups):
        raise ValueError(f"labels {labels.shape} and groups ({len(groups)}) must be 1-D and of equal length")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(members):
        votes = Counter(int(labels[i]) for i in members[g]).most_common()
        top = max(c for _, c in votes)
        by_class[min(lab for lab, c in votes if c == top)].append(g)
    parts: list[list[int]] = [[], [], []]
    for label in sorted(by_class):
        class_groups = by_class[label]
        if len(class_groups) < len(PARTS):
            name = class_names[label] if class_names is not None else f"with label {label}"
            raise DataError(
                f"class {name} has {len(class_groups)} group(s) (lesions/patients/images); a train/val/test "
                f"split needs at least {len(PARTS)} so that each part gets one: add images to it"
            )
        order = _rng(seed, _SPLIT_STREAM, label).permutation(len(class_groups))
        counts = _allocate(len(class_groups), fractions)
        start = 0
        for part, count in enumerate(counts):
            for k in order[start : start + count]:
                parts[part] += members[class_groups[k]]
            start += count
    train, val, test = (tuple(sorted(p)) for p in parts)
    return Split(train=train, val=val, test=test, seed=seed, fractions=fractions)


def _rng(seed: int, stream: int, label: int) -> np.random.Generator:
    """Independent stream per (seed, purpose, class): one class's draw never shifts another's."""
    return np.random.default_rng([int(seed) % 2**64, stream, int(label)])


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f <= 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise DataError(f"split fractions must be three positive numbers that sum to 1, got {fractions}")
    return values[0], values[1], values[2]


def _allocate(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding of ``fractions * n``, then at least one per part (n >= 3)."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        while counts[i] == 0:
            donor = max(range(3), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def labelled_subset(labels: np.ndarray, train: Sequence[int], ratio: float, seed: int) -> tuple[int, ...]:
    """Indices of the labelled part of ``train``: per class ``max(1, round(ratio * n_class))``.

    Seeded per class; for one seed a smaller ratio gives a subset of a larger one's selection.
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise DataError(f"label ratio must be in (0, 1], got {ratio!r}")
    labels = np.asarray(labels)
    train_idx = np.asarray(sorted(train), dtype=np.int64)
    chosen: list[int] = []
    for label in np.unique(labels).tolist():
        members = train_idx[labels[train_idx] == label]
        if len(members) == 0:
            raise DataError(
                f"class with label {label} has no training sample, so none can be labelled; "
                "add images to it or use a different split"
            )
        k = max(1, int(round(ratio * len(members))))
        order = _rng(seed, _LABELLED_STREAM, label).permutation(len(members))
        chosen += members[order[:k]].tolist()
    return tuple(sorted(chosen))


def save_split(split: Split, images: ImageSet, path: Path) -> None:
    """Write the split as JSON, indices with their relative paths, atomically."""
    record: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "seed": split.seed,
        "fractions": list(split.fractions),
        "pair_mode": images.pair_mode,
        "classes": list(images.classes),
        "num_samples": len(images),
    }
    for name in PARTS:
        record[name] = [
            {"index": i, "path": images.relpath(images.samples[i].path_a), "label": images.samples[i].label}
            for i in getattr(split, name)
        ]
    atomic_write_text(Path(path), json.dumps(record, indent=1))


def load_split(path: Path, images: ImageSet) -> Split:
    """Read a split written by :func:`save_split`; DataError if it no longer matches ``images``."""
    path = Path(path)
    stale = f"delete {path} to make a new split, or point at the data it was made for"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        parts = {name: record[name] for name in PARTS}
        seed = int(record["seed"])
        fractions = tuple(float(f) for f in record["fractions"])
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"split file {path} is unreadable ({type(err).__name__}: {err}); {stale}") from None
    if list(record.get("classes", [])) != list(images.classes):
        raise DataError(
            f"split file {path} was made for classes {record.get('classes')}, the data has "
            f"{list(images.classes)}; {stale}"
        )
    index_of = {images.relpath(s.path_a): i for i, s in enumerate(images.samples)}
    out: dict[str, tuple[int, ...]] = {}
    seen = 0
    for name in PARTS:
        indices = []
        for entry in parts[name]:
            rel = entry.get("path") if isinstance(entry, dict) else None
            if rel not in index_of:
                raise DataError(f"split file {path} lists {rel!r}, which is no longer in the data; {stale}")
            i = index_of[rel]
            if images.samples[i].label != entry.get("label"):
                raise DataError(f"split file {path}: {rel!r} changed class since the split was made; {stale}")
            indices.append(i)
        out[name] = tuple(sorted(indices))
        seen += len(indices)
    if seen != len(images) or len({i for v in out.values() for i in v}) != seen:
        raise DataError(
            f"split file {path} covers {seen} samples but the data now has {len(images)}; {stale}"
        )
    if len(fractions) != 3:
        raise DataError(f"split file {path} has {len(fractions)} fractions instead of 3; {stale}")
    return Split(
        train=out["train"],
        val=out["val"],
        test=out["test"],
        seed=seed,
        fractions=(fractions[0], fractions[1], fractions[2]),
    )
