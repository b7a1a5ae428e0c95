"""The partner-generator interface and the registry of generators by name.

A partner generator produces the modality-B image (NBI) of a sample that only has a modality-A
image (white light). It must be deterministic: the same input gives the same output at training
and at test time, so its output can be cached. Its ``name`` goes into the cache key: change the
name whenever the output changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from mics.config import ConfigError


@runtime_checkable
class PartnerGenerator(Protocol):
    """uint8 RGB batch [N, H, W, 3] -> uint8 RGB batch [N, H, W, 3], deterministic, per image."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _virtual_nbi() -> PartnerGenerator:
    from mics.nbi.virtual import VirtualNBI

    return VirtualNBI()


GENERATORS: dict[str, Callable[[], PartnerGenerator]] = {"virtual-nbi": _virtual_nbi}


def register_generator(name: str, factory: Callable[[], PartnerGenerator]) -> None:
    """Make ``get_generator(name)`` return ``factory()``; a name may be registered once."""
    if name in GENERATORS:
        raise ValueError(f"a partner generator named {name!r} is already registered")
    GENERATORS[name] = factory


def get_generator(name: str) -> PartnerGenerator:
    """The generator registered under ``name`` (``data.generator`` in the config); ConfigError if none."""
    try:
        factory = GENERATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown partner generator {name!r}; registered: {', '.join(sorted(GENERATORS))} "
            "(see docs/nbi.md to add one)"
        ) from None
    return factory()


def check_batch(images: np.ndarray) -> np.ndarray:
    """Raise unless ``images`` is a uint8 [N, H, W, 3] array; returns it unchanged."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
    ):
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"a partner generator takes uint8 [N, H, W, 3] images, got {desc}")
    return images
