"""Results-level resume: a protocol key per cell, and a results file (``--results``) that records one row
per finished cell with its key, so a grid continues on any machine from the committed file alone.

The key is a hash of everything that decides a cell's numbers: the resolved config (preset, overrides,
seed; not :data:`NOT_LEARNT`, such as the device), the data (a manifest: every file's relative path and
size), the pairing, method, way, label ratio, seed and :data:`mics.version.TRAINING_CODE_VERSION`. A row
whose key differs from its cell's current key is *stale*: it is reported and the cell is run again."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from mics.bench.cells import Cell
from mics.bench.grid import CSV_COLUMNS
from mics.bench.paths import write_text
from mics.config import to_dict
from mics.version import TRAINING_CODE_VERSION

PROTOCOL_COLUMN = "protocol"
RESULTS_COLUMNS = (*CSV_COLUMNS, PROTOCOL_COLUMN)
# the value order of label ratios: the smallest-label comparisons first (the paper's point), then the
# large ratios; fully supervised (100 %) runs with the first group, as the reference of every comparison
# config fields that decide where and how fast a cell runs, not what it learns: a row computed on a GPU
# answers for the same cell on a CPU (add a field here when it is of that kind)
NOT_LEARNT = ("device", "compile", "data.num_workers")
_RATIO_ORDER = {0.1: (0, 0), 0.05: (0, 1), 1.0: (0, 2), 0.5: (1, 0), 0.3: (1, 1)}


@lru_cache(maxsize=64)
def data_manifest(path: str) -> str:
    """Hash of a data folder's file list with sizes (a single file: its name and size)."""
    root = Path(path)
    if not root.exists():
        # os.walk of a missing folder yields nothing: every row would look stale and its finished run
        # folder would be set aside before the cells could fail on the missing data
        from mics.data.errors import DataError

        raise DataError(
            f"data not found: {path!r}. A results row's protocol key hashes the data it was made on: "
            "point the grid's path (or mics bench --set-data NAME=PATH) at that data set's folder"
        )
    entries: list[tuple[str, int]] = []
    if root.is_file():
        entries = [(root.name, root.stat().st_size)]
    else:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                full = Path(folder) / name
                entries.append((str(full.relative_to(root)), full.stat().st_size))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


def _learnt_config(cell: Cell) -> dict[str, Any]:
    config = to_dict(replace(cell.config(), seed=cell.seed))
    for dotted in NOT_LEARNT:
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return config


def protocol_key(cell: Cell) -> str:
    """The cell's protocol key (see the module docstring)."""
    payload = {
        "config": _learnt_config(cell),
        "data": data_manifest(cell.data),
        "pair": cell.pair,
        "skip_bad": cell.skip_bad,
        "method": cell.method,
        "way": cell.way or "",
        "labels": cell.labels,
        "seed": cell.seed,
        "training_code": TRAINING_CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def order_by_value(cells: Sequence[Cell]) -> list[Cell]:
    """Cells in the order that makes partial results complete comparisons soonest: 10 % and 5 % (and fully
    supervised) before 50 % and 30 %, one full seed of every data set at those ratios before the next
    seed; the grid's order within a group (so a MICS pre-training is still made by the first cell)."""
    index = {c.id: i for i, c in enumerate(cells)}
    datasets = list(dict.fromkeys(c.dataset for c in cells))

    def key(c: Cell) -> tuple[Any, ...]:
        group, rank = next((v for r, v in _RATIO_ORDER.items() if abs(r - c.labels) < 1e-9), (2, -c.labels))
        return (group, c.seed, rank, datasets.index(c.dataset), index[c.id])

    return sorted(cells, key=key)


class ResultsFile:
    """A results CSV with a ``protocol`` column (``results/<dataset>/table2.csv``), appended to one row at
    a time under a file lock, each write atomic (a temporary file and a rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8", newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]

    def status(self, keys: Mapping[str, str]) -> tuple[set[str], list[str]]:
        """For cell id -> current key: the cells the file holds at their current key, and the cells with
        a row of another (older) protocol only (stale: to run again)."""
        rows = self.rows()
        current = {r.get("cell", "") for r in rows if keys.get(r.get("cell", "")) == r.get(PROTOCOL_COLUMN)}
        stale = sorted({r["cell"] for r in rows if r.get("cell") in keys} - current)
        return current, stale

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, row: Mapping[str, Any], key: str) -> None:
        """Add a cell's row with its protocol key, replacing that cell's rows of an older protocol."""
        with self._locked():
            rows: list[Mapping[str, Any]] = [r for r in self.rows() if r.get("cell") != row["cell"]]
            rows.append({**row, PROTOCOL_COLUMN: key})
            buf = io.StringIO()
            writer = csv.DictWriter(
                buf, fieldnames=list(RESULTS_COLUMNS), extrasaction="ignore", lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(rows)
            write_text(self.path, buf.getvalue())
