"""Shape and gradient-flow checks of the pre-training and fine-tuning modules (smoke-sized)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mics.config import preset
from mics.engine.train import StepInfo
from mics.methods.finetune import FusionFinetuning
from mics.methods.pretrain import SynergisticPretraining, queue_length
from mics.methods.svd import ShiftDictionary

CFG = preset("smoke")
SIZE = CFG.data.image_size


def _info(epoch=0):
    return StepInfo(
        epoch=epoch, step=0, total_steps=10, epoch_progress=0.5, generator=torch.Generator().manual_seed(0)
    )


def test_queue_length_is_a_multiple_of_the_batch_and_capped():
    assert queue_length(512, 100, 16) == 96
    assert queue_length(32, 1000, 16) == 32
    assert queue_length(8, 1000, 16) == 16


@pytest.mark.parametrize(
    "switches", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_pretraining_losses_and_gradients(switches):
    cons, rec, align = switches
    cfg = replace(CFG.pretrain, consistency=cons, reconstruction=rec, alignment=align)
    model = SynergisticPretraining(CFG.model, cfg, SIZE, n_train=64, global_batch=4)
    batch = {"a": torch.randn(4, 3, SIZE, SIZE), "b": torch.randn(4, 3, SIZE, SIZE), "index": torch.arange(4)}
    loss, logs = model(batch, _info())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert ("l_cons" in logs) == cons and ("l_res" in logs) == rec and ("l_align" in logs) == align
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith(("enc_a.pos_embed", "enc_b.pos_embed")):
            assert p.grad is not None, name
    # momentum encoders never get gradients
    if cons:
        assert all(p.grad is None for p in model.enc_a_m.parameters())


def test_pretraining_needs_a_loss():
    cfg = replace(CFG.pretrain, consistency=False, reconstruction=False, alignment=False)
    with pytest.raises(ValueError, match="at least one"):
        SynergisticPretraining(CFG.model, cfg, SIZE, 64, 4)


def test_queue_is_filled_with_momentum_features():
    model = SynergisticPretraining(CFG.model, CFG.pretrain, SIZE, n_train=64, global_batch=4)
    before = model.queue_a.features.clone()
    model(
        {"a": torch.randn(4, 3, SIZE, SIZE), "b": torch.randn(4, 3, SIZE, SIZE), "index": torch.arange(4)},
        _info(),
    )
    assert not torch.equal(before, model.queue_a.features)


def _finetune_model(**switches):
    cfg = replace(CFG.finetune, **switches)
    m = FusionFinetuning(CFG.model, cfg, CFG.svd, SIZE, num_classes=3)
    d = CFG.model.width
    m.set_dictionaries(
        ShiftDictionary(torch.randn(3, d), torch.randn(3, 5, d)),
        ShiftDictionary(torch.randn(3, d), torch.randn(3, 5, d)) if cfg.use_nbi else None,
    )
    return m


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"use_tmc": False},
        {"use_svd": False},
        {"use_nbi": False},
        {"use_nbi": False, "use_svd": False, "use_tmc": False},
    ],
)
def test_finetuning_loss_gradients_and_prediction(switches):
    m = _finetune_model(**switches)
    batch = {
        "a": torch.randn(6, 3, SIZE, SIZE),
        "b": torch.randn(6, 3, SIZE, SIZE),
        "y": torch.tensor([0, 1, 2] * 2),
    }
    loss, logs = m(batch, _info(epoch=1))
    loss.backward()
    assert torch.isfinite(loss)
    assert ("l_fuse" in logs) == switches.get("use_tmc", True)
    assert ("l_shift_a" in logs) == switches.get("use_svd", True)
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    pred = m.predict(batch["a"], batch["b"])
    assert pred.probs.shape == (6, 3) and torch.allclose(pred.probs.sum(1), torch.ones(6))
    assert ((pred.uncertainty >= 0) & (pred.uncertainty <= 1)).all()


def test_tmc_prediction_is_the_combined_opinion():
    m = _finetune_model().eval()
    a, b = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    from mics.losses.evidential import combine_opinions

    feats = m.encode(a, b)
    alpha = combine_opinions(m.opinions(feats))
    pred = m.predict(a, b)
    assert torch.allclose(pred.probs, alpha / alpha.sum(1, keepdim=True))
    assert torch.allclose(pred.uncertainty, 3 / alpha.sum(1))


def test_fine_tuning_scales_the_lr_of_the_layers_pre_training_did_not_train():
    from mics.config import ConfigError

    cfg = preset("smoke")
    method = FusionFinetuning(
        cfg.model, replace(cfg.finetune, head_lr_mult=10.0), cfg.svd, cfg.data.image_size, num_classes=3
    )
    scales = {name: method.lr_scale(name) for name, _ in method.named_parameters()}
    new = {n.split(".")[0] for n, v in scales.items() if v == 10.0}
    assert {n.split(".")[0] for n, v in scales.items() if v == 1.0} == {"enc_a", "enc_b"}
    assert new == {"fusion", "classifier", "evidence_a", "evidence_b", "evidence_f"}
    with pytest.raises(ConfigError, match="head_lr_mult"):
        FusionFinetuning(cfg.model, replace(cfg.finetune, head_lr_mult=0.0), cfg.svd, cfg.data.image_size, 3)
