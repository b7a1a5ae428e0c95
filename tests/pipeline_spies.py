"""Spies for the pipeline tests: image arrays that record which sample indices are read, and in which phase
of training (a training batch, or a model-selection evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class Reads:
    """Indices read from the recorded arrays, per phase (``None`` outside any phase)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.by_phase: dict[str | None, set[int]] = {}

    def add(self, indices: np.ndarray) -> None:
        self.by_phase.setdefault(self.phase, set()).update(int(i) for i in indices)

    def get(self, phase: str | None) -> set[int]:
        return self.by_phase.get(phase, set())

    def all(self) -> set[int]:
        return set().union(*self.by_phase.values()) if self.by_phase else set()

    def clear(self) -> None:
        self.by_phase.clear()

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before


class RecordingArray(np.ndarray):
    """An ndarray whose first-axis reads (integer, array or slice keys) are reported to ``reads``."""

    reads: Reads

    def __getitem__(self, key: Any) -> Any:
        first = key[0] if isinstance(key, tuple) else key
        if isinstance(first, slice):
            idx = np.arange(self.shape[0])[first]
        else:
            idx = np.atleast_1d(np.asarray(first))
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
        self.reads.add(idx.ravel())
        return np.asarray(super().__getitem__(key))


def recording(array: np.ndarray, reads: Reads) -> RecordingArray:
    out = np.asarray(array).view(RecordingArray)
    out.reads = reads
    return out


def phased_fit(fit: Callable[..., Any], reads: Reads) -> Callable[..., Any]:
    """``fit`` whose batch function runs in the ``train`` phase and whose evaluation in ``select``."""

    def wrapper(method: Any, batches: Callable[..., Iterator[Any]], *args: Any, **kwargs: Any) -> Any:
        def phased(epoch: int, generator: Any) -> Iterator[Any]:
            it = iter(batches(epoch, generator))
            while True:
                with reads.during("train"):
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                yield batch

        evaluate = kwargs.get("evaluate")
        if evaluate is not None:

            def phased_eval(model: Any) -> Any:
                with reads.during("select"):
                    return evaluate(model)

            kwargs["evaluate"] = phased_eval
        with reads.during("fit"):
            return fit(method, phased, *args, **kwargs)

    return wrapper
