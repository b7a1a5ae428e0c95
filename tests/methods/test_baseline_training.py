"""The baseline model's step, with a recording algorithm: what reaches each of the algorithm's hooks and
how the returned loss and logs are put together (the loss terms themselves are tested per algorithm in
``tests/methods/ssl``); and the baselines' iteration budget."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from mics.config import SSLConfig, preset
from mics.engine.train import StepInfo
from mics.methods.baseline import SSLTraining, ssl_iterations
from mics.methods.budget import finetune_steps_per_epoch, pretrain_steps_per_epoch
from mics.methods.ssl.base import SSLAlgorithm, UnlabelledOutput

SMOKE = preset("smoke")
SIZE = SMOKE.data.image_size
C = 3


class Recording(SSLAlgorithm):
    """Records every call; its unlabelled loss is the strong logits' mean plus a constant, so the total is
    known exactly; ``mix_batch`` (when ``mixes_inputs``) swaps in tensors of its own."""

    name = "recording"
    mixes_inputs: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(C, 16, SSLConfig(batch_size=2, uratio=2))
        self.calls: dict[str, Any] = {}
        self.mixed: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def unlabelled_loss(self, logits_w, logits_s, idx, step, total_steps, **kwargs) -> UnlabelledOutput:
        self.calls["unlabelled_kwargs"] = kwargs
        self.calls["unlabelled"] = (
            logits_w.detach().clone(),
            logits_s.detach().clone(),
            idx,
            step,
            total_steps,
        )
        loss = logits_s.float().mean() + 0.25
        mask = torch.tensor([1.0, 0.0, 1.0, 1.0])[: len(idx)]
        return UnlabelledOutput(loss, mask, torch.zeros(len(idx), dtype=torch.long), {"extra": 7.0})

    def observe_supervised(self, sup_loss: float, step: int) -> None:
        self.calls["observe"] = (sup_loss, step)

    def mix_batch(self, x_l, y_l, x_u_w, x_u_s, logits_u_w, generator, idx_u=None):
        self.calls["mix"] = (x_l, y_l, x_u_w, x_u_s, logits_u_w, generator, idx_u)
        g = torch.Generator().manual_seed(9)
        self.mixed = (
            torch.randn(x_l.shape, generator=g),
            (y_l + 1) % C,
            torch.randn(x_u_w.shape, generator=g),
            torch.randn(x_u_s.shape, generator=g),
        )
        return self.mixed

    def ema_decay(self, base: float, model: nn.Module, ema_model: nn.Module) -> float:
        self.calls["ema"] = (base, model, ema_model)
        return 0.5


class Mixing(Recording):
    mixes_inputs: ClassVar[bool] = True


class WithClassifier(Recording):
    needs_classifier: ClassVar[bool] = True


def _model(algorithm: SSLAlgorithm) -> SSLTraining:
    torch.manual_seed(0)
    return SSLTraining(SMOKE.model, SIZE, C, algorithm).eval()  # eval: no dropout, the step is reproducible


def _batch(unlabelled: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"x_l": torch.randn(2, 3, SIZE, SIZE, generator=g), "y_l": torch.tensor([0, 2])}
    if unlabelled:
        batch |= {
            "x_u_w": torch.randn(4, 3, SIZE, SIZE, generator=g),
            "x_u_s": torch.randn(4, 3, SIZE, SIZE, generator=g),
            "idx_u": torch.tensor([3, 1, 4, 0]),
        }
    return batch


def _info(step: int = 5) -> StepInfo:
    return StepInfo(0, step, 40, 0.5, torch.Generator().manual_seed(0))


def test_features_are_the_cls_token_and_the_model_knows_its_classes():
    model = _model(Recording())
    x = _batch()["x_l"]
    with torch.no_grad():
        assert torch.equal(model.features(x), model.backbone(x)[:, 0])
    assert model.num_classes == C  # read when an empty split is predicted


def test_a_labelled_only_batch_trains_on_the_supervised_loss_of_its_logits():
    algorithm = Recording()
    model = _model(algorithm)
    batch = _batch(unlabelled=False)
    loss, logs = model(batch, _info(step=5))
    with torch.no_grad():
        want = nn.functional.cross_entropy(model.head(model.features(batch["x_l"])), batch["y_l"])
    torch.testing.assert_close(loss, want)
    assert set(logs) == {"l_sup"} and torch.equal(logs["l_sup"], loss.detach())
    assert algorithm.calls["observe"] == (pytest.approx(float(want)), 5)
    assert "unlabelled" not in algorithm.calls


def test_the_step_loss_is_supervised_plus_unlabelled_and_keeps_the_algorithms_logs():
    algorithm = Recording()
    model = _model(algorithm)
    batch = _batch()
    loss, logs = model(batch, _info(step=5))
    with torch.no_grad():
        logits_l = model.head(model.features(batch["x_l"]))
        logits_s = model.head(model.features(batch["x_u_s"]))
    sup = nn.functional.cross_entropy(logits_l, batch["y_l"])
    torch.testing.assert_close(loss, sup + logits_s.mean() + 0.25, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logs["l_sup"], sup, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logs["l_unsup"], logits_s.mean() + 0.25, atol=1e-5, rtol=1e-5)
    assert float(logs["mask_rate"]) == 0.75 and logs["extra"] == 7.0
    assert algorithm.calls["observe"] == (pytest.approx(float(sup), abs=1e-5), 5)
    _, _, idx, step, total = algorithm.calls["unlabelled"]
    assert torch.equal(idx, batch["idx_u"]) and (step, total) == (5, 40)
    assert "pseudo_acc" not in logs  # no unlabelled ground truth in the batch: nothing to monitor


@pytest.mark.parametrize("algorithm_type", [Recording, WithClassifier])
def test_the_unlabelled_loss_gets_both_views_features_and_the_head_when_it_asks(algorithm_type):
    algorithm = algorithm_type()
    model = _model(algorithm)
    batch = _batch()
    model(batch, _info())
    kwargs = algorithm.calls["unlabelled_kwargs"]
    with torch.no_grad():
        torch.testing.assert_close(kwargs["feats_w"], model.features(batch["x_u_w"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kwargs["feats_s"], model.features(batch["x_u_s"]), atol=1e-5, rtol=1e-5)
    assert kwargs["classifier"] is (model.head if algorithm.needs_classifier else None)


def test_pseudo_label_accuracy_is_monitored_against_the_unlabelled_ground_truth():
    model = _model(Recording())  # its pseudo-labels are all class 0
    batch = _batch() | {"y_u": torch.tensor([0, 1, 0, 0])}
    _, logs = model(batch, _info())
    assert float(logs["pseudo_acc"]) == 0.75


def test_a_mixing_algorithm_gets_the_batch_and_its_mixed_tensors_are_trained_on():
    algorithm = Mixing()
    model = _model(algorithm)
    batch, info = _batch(), _info()
    loss, logs = model(batch, info)
    x_l, y_l, x_u_w, x_u_s, logits_u_w, generator, idx_u = algorithm.calls["mix"]
    for got, key in ((x_l, "x_l"), (y_l, "y_l"), (x_u_w, "x_u_w"), (x_u_s, "x_u_s"), (idx_u, "idx_u")):
        assert torch.equal(got, batch[key]), key
    assert generator is info.generator
    with torch.no_grad():
        torch.testing.assert_close(
            logits_u_w, model.head(model.features(batch["x_u_w"])), atol=1e-5, rtol=1e-5
        )
        mx_l, my_l, _, mx_u_s = algorithm.mixed
        sup = nn.functional.cross_entropy(model.head(model.features(mx_l)), my_l)
        logits_s = model.head(model.features(mx_u_s))
    torch.testing.assert_close(logs["l_sup"], sup, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(algorithm.calls["unlabelled"][1], logits_s, atol=1e-5, rtol=1e-5)
    # the weak-view targets are made before mixing, from the batch's own weak view
    torch.testing.assert_close(algorithm.calls["unlabelled"][0], logits_u_w)


def test_the_evaluated_ema_decay_is_the_algorithms():
    algorithm = Recording()
    model = _model(algorithm)
    ema = nn.Linear(1, 1)
    assert model.ema_decay(0.999, ema) == 0.5
    base, got_model, got_ema = algorithm.calls["ema"]
    assert base == 0.999 and got_model is model and got_ema is ema


def test_the_iteration_budget_is_pretraining_plus_finetuning_unless_set():
    cfg = preset("cpu")
    n_train, n_labelled = 1000, 37
    want = cfg.pretrain.epochs * pretrain_steps_per_epoch(cfg, n_train) + cfg.finetune.epochs * (
        finetune_steps_per_epoch(cfg, n_labelled)
    )
    assert pretrain_steps_per_epoch(cfg, n_train) > 1 and finetune_steps_per_epoch(cfg, n_labelled) > 1
    assert cfg.ssl.iterations == 0 and ssl_iterations(cfg, n_train, n_labelled) == want
    for iterations in (1, 250):
        fixed = dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, iterations=iterations))
        assert ssl_iterations(fixed, n_train, n_labelled) == iterations
