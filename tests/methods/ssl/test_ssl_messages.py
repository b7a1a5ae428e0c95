"""Every refusal of the baselines, with its whole message: a user who passes a bad setting or tensor is
told which one, what it should be and what it was. Each case also sits on the edge of its condition where
one exists (the refused bound next to the accepted one), so a loosened or tightened check fails here."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import ALGORITHMS, build_algorithm, known_params
from mics.methods.ssl.freematch import FairnessLoss
from mics.methods.ssl.habit import HABIT, norm_parameter_distance


def _algo(name: str, num_unlabelled: int = 5, **params: float) -> Any:
    return build_algorithm(name, 3, num_unlabelled, SSLConfig(params=params))


def _load(name: str, **changes: Any) -> Callable[[], None]:
    algo = _algo(name)

    def load() -> None:
        state = {**algo.state_dict(), **changes}
        algo.load_state_dict({k: v for k, v in state.items() if v is not None})

    return load


def _siabc_mix(**changes: Any) -> Callable[[], None]:
    args: dict[str, Any] = {
        "x_l": torch.zeros(2, 3, 4, 4),
        "y_l": torch.tensor([0, 1]),
        "x_u_w": torch.zeros(3, 3, 4, 4),
        "x_u_s": torch.zeros(3, 3, 4, 4),
        "logits_u_w": torch.zeros(3, 3),
        "generator": None,
        "idx_u": torch.tensor([0, 1, 2]),
    }
    args.update(changes)
    return lambda: _algo("siabc").mix_batch(**args)


def _unlabelled(
    name: str,
    logits_w: torch.Tensor,
    logits_s: torch.Tensor,
    idx: torch.Tensor,
    step: int = 0,
    total: int = 4,
) -> Callable[[], None]:
    return lambda: _algo(name).unlabelled_loss(logits_w, logits_s, idx, step, total)


Z23 = torch.zeros(2, 3)
NORM = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))

CASES: list[tuple[str, Callable[[], object], str]] = [
    # the registry
    (
        "unknown algorithm",
        lambda: build_algorithm("mixmatch", 3, 5, SSLConfig()),
        f"unknown semi-supervised algorithm 'mixmatch'; choose one of {', '.join(ALGORITHMS)}",
    ),
    (
        "unknown param",
        lambda: build_algorithm("fixmatch", 3, 5, SSLConfig(params={"zeta": 1.0, "eta": 2.0})),
        f"unknown ssl.params eta, zeta; known: {', '.join(sorted(known_params()))}",
    ),
    # constructors
    ("dash gamma", lambda: _algo("dash", gamma=1.0), "dash: gamma must exceed 1 for rho to decay, got 1.0"),
    ("dash rho_min", lambda: _algo("dash", rho_min=0.0), "dash: rho_min must be positive, got 0.0"),
    (
        "dash window 0",
        lambda: _algo("dash", rho_window_frac=0.0),
        "dash: rho_window_frac must lie in (0, 1], got 0.0",
    ),
    (
        "dash window > 1",
        lambda: _algo("dash", rho_window_frac=1.01),
        "dash: rho_window_frac must lie in (0, 1], got 1.01",
    ),
    (
        "flexmatch no data",
        lambda: _algo("flexmatch", num_unlabelled=0),
        "flexmatch needs at least one unlabelled sample",
    ),
    (
        "softmatch n_sigma",
        lambda: _algo("softmatch", n_sigma=0.0),
        "softmatch: n_sigma must be positive, got 0.0",
    ),
    ("habit da_queue", lambda: _algo("habit", da_queue=0.0), "habit: da_queue must be at least 1, got 0.0"),
    ("siabc no data", lambda: _algo("siabc", num_unlabelled=0), "siabc needs at least one unlabelled sample"),
    ("siabc T", lambda: _algo("siabc", T=0.0), "siabc: T must be positive, got 0.0"),
    (
        "siabc history",
        lambda: _algo("siabc", sab_history=1.0),
        "siabc: sab_history must be at least 2, got 1.0",
    ),
    # the labelled loss
    (
        "logits_l",
        lambda: _algo("fixmatch").supervised_loss(torch.zeros(2, 4), torch.tensor([0, 1])),
        "logits_l must be [B, 3], got (2, 4)",
    ),
    (
        "logits_l 3-d",
        lambda: _algo("fixmatch").supervised_loss(torch.zeros(2, 3, 1), torch.tensor([0, 1])),
        "logits_l must be [B, 3], got (2, 3, 1)",
    ),
    (
        "y float",
        lambda: _algo("fixmatch").supervised_loss(Z23, torch.zeros(2)),
        "y must be [B]=2 class indices, got (2,) torch.float32",
    ),
    (
        "y length",
        lambda: _algo("fixmatch").supervised_loss(Z23, torch.tensor([0, 1, 2])),
        "y must be [B]=2 class indices, got (3,) torch.int64",
    ),
    (
        "siabc layout",
        lambda: _algo("siabc").supervised_loss(torch.zeros(3, 3), torch.zeros(3, 3)),
        "siabc: soft targets must be mix_batch's [2 B_l, 3] layout matching the logits, got targets (3, 3) "
        "and logits (3, 3)",
    ),
    # the unlabelled batch
    (
        "logits_w",
        _unlabelled("fixmatch", torch.zeros(2, 4), torch.zeros(2, 4), torch.arange(2)),
        "logits_w must be [B, 3], got (2, 4)",
    ),
    (
        "logits_s",
        _unlabelled("fixmatch", Z23, torch.zeros(3, 3), torch.arange(2)),
        "logits_s must match logits_w (2, 3), got (3, 3)",
    ),
    (
        "idx float",
        _unlabelled("fixmatch", Z23, Z23, torch.zeros(2)),
        "idx must be [B]=2 integers, got (2,) torch.float32",
    ),
    (
        "idx length",
        _unlabelled("fixmatch", Z23, Z23, torch.arange(3)),
        "idx must be [B]=2 integers, got (3,) torch.int64",
    ),
    (
        "idx too high",
        _unlabelled("flexmatch", Z23, Z23, torch.tensor([0, 5])),
        "flexmatch: idx must lie in [0, 5), got [0, 5]",
    ),
    (
        "idx negative",
        _unlabelled("flexmatch", Z23, Z23, torch.tensor([-1, 4])),
        "flexmatch: idx must lie in [0, 5), got [-1, 4]",
    ),
    (
        "step = total",
        _unlabelled("dash", Z23, Z23, torch.arange(2), step=4, total=4),
        "step must lie in [0, total_steps), got step=4, total_steps=4",
    ),
    (
        "step < 0",
        _unlabelled("dash", Z23, Z23, torch.arange(2), step=-1, total=4),
        "step must lie in [0, total_steps), got step=-1, total_steps=4",
    ),
    (
        "no steps",
        _unlabelled("dash", Z23, Z23, torch.arange(2), step=0, total=0),
        "step must lie in [0, total_steps), got step=0, total_steps=0",
    ),
    (
        "dash non-finite",
        lambda: _algo("dash").observe_supervised(float("nan"), 4),
        "dash: the labelled loss at step 4 is not finite (nan)",
    ),
    # resuming
    (
        "state keys",
        _load("freematch", tau=None, extra=1),
        "freematch state: missing keys ['tau'], unexpected keys ['extra']",
    ),
    (
        "state shape",
        _load("freematch", p_tilde=torch.zeros(4)),
        "freematch state 'p_tilde': expected a (3,) torch.float32 tensor, got (4,) torch.float32",
    ),
    (
        "state dtype",
        _load("freematch", p_tilde=torch.zeros(3, dtype=torch.float64)),
        "freematch state 'p_tilde': expected a (3,) torch.float32 tensor, got (3,) torch.float64",
    ),
    (
        "state number",
        _load("freematch", p_tilde=0.5),
        "freematch state 'p_tilde': expected a (3,) torch.float32 tensor, got float",
    ),
    # FreeMatch's fairness term
    (
        "fairness logits",
        lambda: FairnessLoss()(torch.zeros(2, 3, 1), torch.ones(2), torch.ones(3), torch.ones(3)),
        "logits_s must be [B, C], got (2, 3, 1)",
    ),
    (
        "fairness mask",
        lambda: FairnessLoss()(Z23, torch.ones(3), torch.ones(3), torch.ones(3)),
        "mask must be [B]=2, got (3,)",
    ),
    (
        "fairness p_tilde",
        lambda: FairnessLoss()(Z23, torch.ones(2), torch.ones(2), torch.ones(3)),
        "p_tilde and label_hist must be [C]=3, got (2,), (3,)",
    ),
    (
        "fairness label_hist",
        lambda: FairnessLoss()(Z23, torch.ones(2), torch.ones(3), torch.ones(4)),
        "p_tilde and label_hist must be [C]=3, got (3,), (4,)",
    ),
    # HABIT
    (
        "habit norm layers",
        lambda: norm_parameter_distance(NORM, torch.nn.Linear(2, 2)),
        "model has 1 normalisation layers, the EMA model 0",
    ),
    (
        "habit no features",
        lambda: HABIT._rfc_inputs(None, torch.nn.Linear(2, 3), 2),
        "habit: RFC needs feats_w and classifier= (or set params rfc=0)",
    ),
    (
        "habit no classifier",
        lambda: HABIT._rfc_inputs(torch.zeros(2, 4), None, 2),
        "habit: RFC needs feats_w and classifier= (or set params rfc=0)",
    ),
    (
        "habit feature batch",
        lambda: HABIT._rfc_inputs(torch.zeros(3, 4), torch.nn.Linear(4, 3), 2),
        "habit: feats_w must be [B=2, D], got (3, 4)",
    ),
    (
        "habit feature dims",
        lambda: HABIT._rfc_inputs(torch.zeros(2), torch.nn.Linear(4, 3), 2),
        "habit: feats_w must be [B=2, D], got (2,)",
    ),
    # SIAB-C's mixing
    (
        "siabc no logits",
        _siabc_mix(logits_u_w=None),
        "siabc: mix_batch needs logits_u_w (weak-view logits) and idx_u (indices)",
    ),
    (
        "siabc no idx",
        _siabc_mix(idx_u=None),
        "siabc: mix_batch needs logits_u_w (weak-view logits) and idx_u (indices)",
    ),
    (
        "siabc 3-d images",
        _siabc_mix(x_l=torch.zeros(2, 3, 4)),
        "siabc: images must be [B, 3, H, W] of one size, got (2, 3, 4), (3, 3, 4, 4), (3, 3, 4, 4)",
    ),
    (
        "siabc strong size",
        _siabc_mix(x_u_s=torch.zeros(3, 3, 4, 5)),
        "siabc: images must be [B, 3, H, W] of one size, got (2, 3, 4, 4), (3, 3, 4, 4), (3, 3, 4, 5)",
    ),
    (
        "siabc labelled size",
        _siabc_mix(x_l=torch.zeros(2, 3, 5, 4)),
        "siabc: images must be [B, 3, H, W] of one size, got (2, 3, 5, 4), (3, 3, 4, 4), (3, 3, 4, 4)",
    ),
    ("siabc y_l float", _siabc_mix(y_l=torch.zeros(2)), "siabc: y_l must be [B_l]=2 class indices, got (2,)"),
    (
        "siabc y_l length",
        _siabc_mix(y_l=torch.tensor([0, 1, 2])),
        "siabc: y_l must be [B_l]=2 class indices, got (3,)",
    ),
    (
        "siabc logits_u_w",
        _siabc_mix(logits_u_w=torch.zeros(3, 4)),
        "siabc: logits_u_w must be [3, 3] and idx_u [3], got (3, 4) and (3,)",
    ),
    (
        "siabc idx_u",
        _siabc_mix(idx_u=torch.tensor([0, 1])),
        "siabc: logits_u_w must be [3, 3] and idx_u [3], got (3, 3) and (2,)",
    ),
    (
        "siabc idx_u range",
        _siabc_mix(idx_u=torch.tensor([0, 1, 5])),
        "siabc: idx must lie in [0, 5), got [0, 5]",
    ),
]

# the EMA momentum of the methods that keep running estimates: [0, 1), both ends tried
CASES += [
    (
        f"{name} ema_p={value}",
        lambda name=name, value=value: _algo(name, ema_p=value),
        f"{name}: ema_p must lie in [0, 1), got {value}",
    )
    for name in ("freematch", "softmatch", "siabc")
    for value in (1.0, -0.1)
]


@pytest.mark.parametrize(("case", "call", "message"), CASES, ids=[c[0] for c in CASES])
def test_each_refusal_says_what_was_wrong_in_full(
    case: str, call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_the_edges_next_to_each_refused_value_are_accepted() -> None:
    _algo("dash", rho_window_frac=1.0, gamma=1.01, rho_min=1e-3)
    for name in ("freematch", "softmatch", "siabc"):
        _algo(name, ema_p=0.0)
    _algo("habit", da_queue=1.0)
    _algo("softmatch", n_sigma=0.5)
    _algo("siabc", sab_history=2.0, T=0.01, num_unlabelled=1)
    _algo("flexmatch", num_unlabelled=1)
    assert norm_parameter_distance(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)) == 0.0
    algo = _algo("flexmatch")
    algo.unlabelled_loss(Z23, Z23, torch.tensor([0, 4]), 3, 4)  # the last index and the last step
    dash = _algo("dash", warmup_steps=3.0)
    for step in range(4):
        dash.observe_supervised(1.0, step)
        dash.unlabelled_loss(Z23, Z23, torch.arange(2), step, 4)  # up to the last step
