"""Semi-supervised baselines of Table II as small units the training loop calls (see ``base.py``).

``ALGORITHMS`` maps each name to its class; :func:`build_algorithm` checks the name and the method
parameters of ``cfg.params`` (every key must belong to at least one algorithm, so one config can carry
the parameters of several baselines while a misspelt key still fails).
"""

from __future__ import annotations

from mics.config import SSLConfig
from mics.methods.ssl.base import SSLAlgorithm, UnlabelledOutput
from mics.methods.ssl.dash import Dash
from mics.methods.ssl.fixmatch import FixMatch
from mics.methods.ssl.flexmatch import FlexMatch
from mics.methods.ssl.freematch import FreeMatch
from mics.methods.ssl.habit import HABIT
from mics.methods.ssl.siabc import SIABC
from mics.methods.ssl.softmatch import SoftMatch
from mics.methods.ssl.supervised import Supervised

ALGORITHMS: dict[str, type[SSLAlgorithm]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "flexmatch": FlexMatch,
    "dash": Dash,
    "freematch": FreeMatch,
    "softmatch": SoftMatch,
    "habit": HABIT,
    "siabc": SIABC,
}


def known_params() -> set[str]:
    """Every method parameter any algorithm reads from ``SSLConfig.params``."""
    return {key for cls in ALGORITHMS.values() for key in cls.DEFAULTS}


def build_algorithm(name: str, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> SSLAlgorithm:
    """The algorithm called ``name``; ``ValueError`` for an unknown name or an unknown ``cfg.params`` key."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown semi-supervised algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    unknown = sorted(set(cfg.params) - known_params())
    if unknown:
        raise ValueError(
            f"unknown ssl.params {', '.join(unknown)}; known: {', '.join(sorted(known_params()))}"
        )
    return ALGORITHMS[name](num_classes, num_unlabelled, cfg)


__all__ = ["ALGORITHMS", "SSLAlgorithm", "UnlabelledOutput", "build_algorithm", "known_params"]
