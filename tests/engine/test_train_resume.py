"""Resumption does resume: epochs before the checkpoint are not run again, and the state they produced
(weights, optimiser, EMA, selection history, extra state) is what the next epoch starts from.

``tests/engine/test_train.py`` shows that a resumed run ends where an uninterrupted one does; on its own
that also holds when ``resume`` silently starts over, since training is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mics.engine.checkpoint import load_checkpoint
from mics.engine.logging import MetricsLogger
from mics.engine.train import Schedule, fit

EPOCHS, STEPS = 4, 3


class Stop(Exception):
    pass


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.first_weights: torch.Tensor | None = None
        self.epochs_seen: list[int] = []

    def forward(self, batch, info):
        if self.first_weights is None:
            self.first_weights = self.lin.weight.detach().clone()
        if not self.epochs_seen or self.epochs_seen[-1] != info.epoch:
            self.epochs_seen.append(info.epoch)
        loss = ((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return loss, {}


class Counter:
    """Extra state checkpointed with the model: the number of steps it has seen."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


def _batch_fn(calls: list[int], counter: Counter, stop_at: int | None = None):
    def batches(epoch, generator):
        calls.append(epoch)
        if epoch == stop_at:
            raise Stop
        for _ in range(STEPS):
            counter.steps += 1
            x = torch.randn(8, 4, generator=generator)
            yield {"x": x, "y": x.sum(dim=1)}

    return batches


def _scorer(first: float):
    """``first`` at the first evaluation, -1 afterwards: the best epoch is the first one evaluated."""
    calls: list[int] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        return {"score": first if len(calls) == 1 else -1.0}

    return evaluate


def _fit(ckpt: Path, model: Toy, batches, counter: Counter, resume: bool, first_score: float = 10.0):
    schedule = Schedule(EPOCHS, STEPS, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9)
    logger = MetricsLogger(ckpt.parent, tensorboard=False)
    try:
        return fit(
            model,
            batches,
            schedule,
            stage="toy",
            seed=0,
            device=torch.device("cpu"),
            ckpt_dir=ckpt,
            logger=logger,
            evaluate=_scorer(first_score),
            resume=resume,
            extra=counter,
        )
    finally:
        logger.close()


def _logged_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def test_resume_runs_only_the_epochs_after_the_checkpoint(tmp_path):
    calls: list[int] = []
    counter = Counter()
    with pytest.raises(Stop):
        _fit(tmp_path / "ckpt", Toy(), _batch_fn(calls, counter, stop_at=2), counter, resume=False)
    assert calls == [0, 1, 2]
    assert _logged_epochs(tmp_path) == [1, 2]
    state, meta = load_checkpoint(tmp_path / "ckpt" / "last")
    assert int(meta["epoch"]) == 1

    calls.clear()
    resumed_counter = Counter()
    model = Toy()
    fresh = model.lin.weight.detach().clone()
    # the resumed run scores every epoch -1: epoch 1 stays the best only if the selection was restored
    result = _fit(
        tmp_path / "ckpt",
        model,
        _batch_fn(calls, resumed_counter),
        resumed_counter,
        resume=True,
        first_score=-1,
    )
    assert calls == [2, 3], "epochs before the checkpoint were run again"
    assert model.epochs_seen == [2, 3]
    # the first step of the resumed run starts from the checkpointed weights, not from the initialisation
    assert model.first_weights is not None
    torch.testing.assert_close(model.first_weights, state["model"]["lin.weight"], rtol=0, atol=0)
    assert not torch.equal(model.first_weights, fresh)
    # the extra state was restored before training continued: 2 epochs before the cut + 2 after
    assert resumed_counter.steps == EPOCHS * STEPS
    # the metrics file holds each epoch once; the history and the selection carry the epochs before the cut
    # (epoch 1 scored 10, every later epoch -1)
    assert _logged_epochs(tmp_path) == [1, 2, 3, 4]
    assert [int(h["epoch"]) for h in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 1


def test_resume_of_a_finished_schedule_trains_nothing(tmp_path):
    calls: list[int] = []
    counter = Counter()
    _fit(tmp_path / "ckpt", Toy(), _batch_fn(calls, counter), counter, resume=False)
    assert calls == [0, 1, 2, 3]
    calls.clear()
    model = Toy()
    _fit(tmp_path / "ckpt", model, _batch_fn(calls, Counter()), Counter(), resume=True)
    assert calls == [] and model.first_weights is None
    assert _logged_epochs(tmp_path) == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_starts_at_epoch_zero(tmp_path):
    calls: list[int] = []
    counter = Counter()
    _fit(tmp_path / "ckpt", Toy(), _batch_fn(calls, counter), counter, resume=True)
    assert calls == [0, 1, 2, 3]
