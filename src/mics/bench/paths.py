"""Files of a bench folder: where a cell's run folder is, whether its pre-training is finished, and an
atomic text write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mics.bench.cells import Cell


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file (the bench's own
    helper: mics.engine.checkpoint has one too, but importing it starts torch in the bench process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir_of(out: Path, cell: Cell | str) -> Path:
    return Path(out) / "runs" / (cell if isinstance(cell, str) else cell.id)


def has_encoders(run_dir: Path) -> bool:
    # the JSON half of a checkpoint is written last, so its presence means the weights are complete
    return (run_dir / "pretrain" / "encoders.json").exists()
