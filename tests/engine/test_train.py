from __future__ import annotations

import math

import pytest
import torch

from mics.engine.logging import MetricsLogger
from mics.engine.train import EMAModel, NonFiniteLossError, Schedule, cosine_lr, derive_seed, fit


def test_cosine_schedule_warms_up_then_decays_to_min():
    s = Schedule(epochs=2, steps_per_epoch=10, lr=1.0, min_lr=0.1, weight_decay=0.0, warmup_steps=5)
    lrs = [cosine_lr(i, s) for i in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 14 / 15)))


def test_ema_follows_a_naive_average():
    online = torch.nn.Linear(2, 1)
    ema = EMAModel(online, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, step=100)
    assert torch.allclose(ema.module.weight, 0.5 * before + 0.5 * online.weight)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "pretrain", 1) == derive_seed(0, "pretrain", 1)
    assert derive_seed(0, "pretrain", 1) != derive_seed(0, "pretrain", 2)


class _Toy(torch.nn.Module):
    def __init__(self, blow_up_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.blow_up_at = blow_up_at

    def forward(self, batch, info):
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape)  # draws from the global RNG, like dropout
        loss = ((self.lin(x).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.blow_up_at is not None and info.step >= self.blow_up_at:
            loss = loss * float("nan")
        return loss, {}


def _batches(epoch, generator):
    for _ in range(3):
        x = torch.randn(8, 4, generator=generator)
        yield {"x": x, "y": x.sum(dim=1)}


def _fit(tmp_path, epochs, resume=False, model=None):
    torch.manual_seed(0)
    model = model or _Toy()
    s = Schedule(
        epochs=epochs, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9
    )
    res = fit(
        model,
        _batches,
        s,
        stage="toy",
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=tmp_path,
        logger=MetricsLogger(None),
        evaluate=lambda m: {"score": -float(m.lin.bias.abs())},
        resume=resume,
    )
    return model, res


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    full, _ = _fit(tmp_path / "full", epochs=4)

    # "kill" after 2 epochs: train a 4-epoch schedule but stop by raising inside epoch 3
    class Stop(Exception):
        pass

    def stopping(epoch, generator):
        if epoch == 2:
            raise Stop
        yield from _batches(epoch, generator)

    torch.manual_seed(0)
    s = Schedule(epochs=4, steps_per_epoch=3, lr=0.05, min_lr=0.0, weight_decay=0.0, warmup_steps=1, ema=0.9)
    with pytest.raises(Stop):
        fit(
            _Toy(),
            stopping,
            s,
            stage="toy",
            seed=0,
            device=torch.device("cpu"),
            ckpt_dir=tmp_path / "cut",
            logger=MetricsLogger(None),
            evaluate=lambda m: {"score": -float(m.lin.bias.abs())},
        )
    resumed, _ = _fit(tmp_path / "cut", epochs=4, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        _fit(tmp_path, epochs=3, model=_Toy(blow_up_at=4))
    assert (tmp_path / "last.json").exists()
