"""Run logging: JSON-lines metrics, TensorBoard scalars and progress bars (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mics.engine.distributed import is_main
from mics.errors import naming


class RunClock:
    """Wall time of a run folder across resumes, in seconds.

    Every record of ``metrics.jsonl`` is written once its epoch is checkpointed and carries the run's
    ``elapsed_s`` at that moment (:class:`MetricsLogger` with a clock). A resumed run starts from the
    last record's value (:func:`last_elapsed`), so its time counts the work its checkpoints stand for
    plus the resumed process; the part of an epoch lost to a kill is counted once, when it is trained
    again. Runs logged before the field existed resume from 0.
    """

    def __init__(self, base_s: float = 0.0) -> None:
        self.base_s = float(base_s)
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return self.base_s + time.monotonic() - self._started


def last_elapsed(metrics_path: Path) -> float:
    """The last ``elapsed_s`` recorded in ``metrics_path``: 0 if the file or the value is missing (a run
    logged before the field existed)."""
    if not metrics_path.exists():
        return 0.0
    for line in reversed(metrics_path.read_text(encoding="utf-8").splitlines()):
        try:
            value = json.loads(line).get("elapsed_s")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            return float(value)
    return 0.0


class MetricsLogger:
    """Append-only ``metrics.jsonl`` plus TensorBoard event files under ``<run>/tb``; with a ``clock``, each
    record carries the run's ``elapsed_s``."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True, clock: RunClock | None = None) -> None:
        self.enabled = run_dir is not None and is_main()
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.clock = clock
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))  # type: ignore[arg-type]
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or self.path is None:
            return
        clean = {k: _plain(v) for k, v in values.items()}
        record = {"time": round(time.time(), 3), "stage": stage, "step": step, **clean}
        if self.clock is not None:
            record["elapsed_s"] = round(self.clock.elapsed(), 1)
        append_line(self.path, json.dumps(record))
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` whole or not at all.

    A full disk can take half a line; left there, the next record (after ``--resume``) would be glued to
    it and the file would no longer read as one JSON record per line. So a failed append is cut off.
    """
    data = (line + "\n").encode("utf-8")
    with naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    return v


def progress(
    iterable: Any = None, *, total: int | None = None, desc: str = "", leave: bool = False, initial: int = 0
) -> tqdm:
    """A tqdm bar on stderr, silent on ranks other than 0."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=leave,
        initial=initial,
        disable=not is_main(),
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )


def info(message: str) -> None:
    """A one-line status message for the user (rank 0 only), printed above any bar."""
    if is_main():
        tqdm.write(message, file=sys.stderr)
