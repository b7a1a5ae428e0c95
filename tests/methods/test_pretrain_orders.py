"""The sample orders and batches of the training stages (mics.methods.pretrain), and the guards of the
pre-training module: which samples a step sees, in which order, and how the two images of a pair are
augmented. The orders below decide the batches of every recorded run: a change to them must be deliberate
(and bump TRAINING_CODE_VERSION), so they are pinned to the values the current code gives."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import mics.methods.pretrain as pretrain
from mics.config import preset
from mics.engine.train import StepInfo
from mics.methods.pretrain import (
    SynergisticPretraining,
    balanced_order,
    build_encoder,
    cycled_order,
    epoch_order,
    labelled_order,
    pair_batches,
)

CFG = preset("smoke")
SIZE = CFG.data.image_size


def test_orders_keep_the_values_recorded_runs_were_made_with():
    assert epoch_order(np.arange(10), 3, 1).tolist() == [9, 0, 1, 3, 7, 8, 4, 5, 6, 2]
    cycled = [13, 10, 11, 14, 12, 12, 14, 11, 10, 13, 11, 14, 12, 13, 10]
    assert cycled_order(np.arange(5) + 10, 3, "lab", 12).tolist() == cycled
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert balanced_order(np.arange(6), labels, 3, "lab", 8).tolist() == [0, 4, 5, 4, 3, 0, 5, 4]
    assert labelled_order(np.arange(6), labels, 3, "lab", 8, "sampler").tolist() == [0, 4, 5, 4, 3, 0, 5, 4]
    assert labelled_order(np.arange(5) + 10, labels, 3, "lab", 12, "none").tolist() == cycled


def test_cycled_order_draws_whole_permutations_until_it_has_enough():
    assert len(cycled_order(np.arange(5), 0, "t", 5)) == 5  # one permutation is exactly enough
    assert sorted(cycled_order(np.arange(5), 0, "t", 6).tolist()) == sorted(list(range(5)) * 2)
    assert cycled_order(np.array([7]), 0, "t", 3).tolist() == [7, 7, 7]
    empty = cycled_order(np.arange(5), 0, "t", 0)
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_cycled_order_refuses_more_processes_than_samples(monkeypatch):
    monkeypatch.setattr(pretrain.dist, "world_size", lambda: 4)
    monkeypatch.setattr(pretrain.dist, "shard", lambda idx: idx[: len(idx) // 4 * 4][0::4])
    with pytest.raises(ValueError, match=r"^3 samples cannot be shared by 4 processes$"):
        cycled_order(np.arange(3), 0, "t", 2)


def _pairs(n: int = 6) -> np.ndarray:
    g = np.random.default_rng(0)
    return g.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)


def test_pair_batches_augment_the_two_images_independently_unless_shared():
    images = _pairs()  # both modalities the same images: equal views mean equal flips and crops
    cpu = torch.device("cpu")

    def views(**kw):
        batches = pair_batches(images, images.copy(), np.arange(6), 6, cpu, seed=0, **kw)
        (batch,) = list(batches(0, torch.Generator().manual_seed(5)))
        return batch["a"], batch["b"]

    a, b = views(shared_aug=True)
    assert torch.equal(a, b)
    a, b = views()  # the default: each image its own flip and crop
    assert not torch.equal(a, b)


def test_pair_batches_draw_augmentations_from_the_epoch_generator_only():
    images = _pairs()
    batches = pair_batches(images, images[::-1].copy(), np.arange(6), 3, torch.device("cpu"), seed=0)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(list(batches(0, torch.Generator().manual_seed(5))))
    for first, second in zip(*runs, strict=True):
        assert all(torch.equal(first[k], second[k]) for k in ("a", "b", "index"))


def test_encoders_and_decoder_are_built_with_the_configured_mlp_ratio_and_drop_path():
    model = replace(CFG.model, mlp_ratio=2.0, drop_path=0.2, depth=2)  # rates rise to drop_path
    enc = build_encoder(model, SIZE)
    assert enc.blocks[0].mlp.fc1.out_features == 2 * model.width
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    method = SynergisticPretraining(model, CFG.pretrain, SIZE, n_train=64, global_batch=4)
    assert method.decoder.blocks[0].mlp.fc1.out_features == 2 * model.decoder_width


def test_pretraining_without_any_term_is_refused():
    cfg = replace(CFG.pretrain, consistency=False, reconstruction=False, alignment=False)
    with pytest.raises(ValueError, match=r"^pre-training needs at least one of consistency, reconstruction"):
        SynergisticPretraining(CFG.model, cfg, SIZE, n_train=64, global_batch=4)


def _consistency_inputs():
    g = torch.Generator().manual_seed(1)
    cls_a, cls_b = torch.randn(4, CFG.model.width, generator=g), torch.randn(4, CFG.model.width, generator=g)
    a, b = torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randn(4, 3, SIZE, SIZE, generator=g)
    return cls_a, cls_b, a, b


def _info(epoch: int, progress: float) -> StepInfo:
    return StepInfo(
        epoch=epoch, step=0, total_steps=100, epoch_progress=progress, generator=torch.Generator()
    )


def test_index_positives_need_the_batch_indices():
    torch.manual_seed(0)
    cfg = replace(CFG.pretrain, queue_positives="index")
    method = SynergisticPretraining(CFG.model, cfg, SIZE, n_train=64, global_batch=4)
    with pytest.raises(ValueError, match=r"^queue_positives='index' needs the batch's sample indices"):
        method.forward_consistency(*_consistency_inputs(), _info(0, 0.5), index=None)


@pytest.mark.parametrize(("start", "clamped"), [(0.9, 0.5), (1e-5, 0.001), (0.07, 0.07)])
def test_the_consistency_temperature_is_kept_in_its_range(start, clamped):
    torch.manual_seed(0)
    method = SynergisticPretraining(CFG.model, CFG.pretrain, SIZE, n_train=64, global_batch=4)
    with torch.no_grad():
        method.temp.fill_(start)
    method.forward_consistency(*_consistency_inputs(), _info(0, 0.5), index=torch.arange(4))
    assert method.temp.item() == pytest.approx(clamped)


def test_the_distillation_weight_ramps_up_over_the_first_epoch_only():
    torch.manual_seed(0)
    method = SynergisticPretraining(CFG.model, CFG.pretrain, SIZE, n_train=64, global_batch=4)
    inputs = _consistency_inputs()

    def loss(epoch: int, progress: float) -> float:
        # a copy each time: the step updates the queues and momentum encoders in place
        out = copy.deepcopy(method).forward_consistency(*inputs, _info(epoch, progress), torch.arange(4))
        return out.item()

    assert loss(1, 0.5) == pytest.approx(loss(5, 0.0))
    assert loss(0, 0.5) != pytest.approx(loss(5, 0.0))


def test_pair_batches_follow_the_seeds_epoch_order_in_sorted_batches():
    images = _pairs(8)
    indices = np.arange(8)
    for seed in (0, 3):
        batches = pair_batches(images, images, indices, 4, torch.device("cpu"), seed=seed)
        got = [b["index"].tolist() for b in batches(1, torch.Generator().manual_seed(0))]
        order = epoch_order(indices, seed, 1).tolist()
        assert got == [sorted(order[:4]), sorted(order[4:])]
