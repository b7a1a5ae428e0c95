"""Fine-tuning's labelled batches and the construction of its model: the seeded sample order every recorded
run depends on, which images each view holds, shared vs independent augmentation of a pair, and the
configuration the model is built with.

Images are constant per sample (every pixel of sample i of modality A is ``i``, of B ``100 + i``): a weak
view leaves a constant image unchanged, so each view tells which sample and modality it came from."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mics.config import preset
from mics.data.views import MEAN, STD
from mics.methods.finetune import FusionFinetuning, labelled_batches
from mics.methods.pretrain import labelled_order

CFG = preset("smoke")
SIZE = CFG.data.image_size
N = 20
INDICES = np.array([1, 2, 4, 7, 8, 11, 13, 16, 19])
LABELS = np.array([0] * 12 + [1] * 6 + [2] * 2, dtype=np.int32)  # imbalanced, and not int64


def _constant(offset: int) -> np.ndarray:
    return (np.arange(N, dtype=np.uint8)[:, None, None, None] + offset) * np.ones(
        (1, 3, SIZE, SIZE), np.uint8
    )


def _random(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8)


def _ids(x: torch.Tensor, offset: int) -> list[int]:
    """The sample index of each constant image of a normalised batch."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = torch.round((x * std + mean) * 255.0)
    assert (pixels == pixels[:, :, :1, :1]).all()
    return (pixels[:, 0, 0, 0].long() - offset).tolist()


def _batches(arrays_a, arrays_b, steps: int = 3, batch_size: int = 4, **kwargs):
    return labelled_batches(
        arrays_a,
        arrays_b,
        LABELS,
        INDICES,
        batch_size,
        steps,
        torch.device("cpu"),
        seed=kwargs.pop("seed", 11),
        **kwargs,
    )


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_batches_follow_the_seeded_labelled_order_of_each_epoch(balance):
    steps, batch_size = 4, 4  # 16 draws: more than one permutation of the 9 labelled samples
    fn = _batches(_constant(0), _constant(100), steps, batch_size, balance=balance)
    for epoch in (0, 1):
        want = labelled_order(INDICES, LABELS, 11, str(epoch), steps * batch_size, balance)[
            : steps * batch_size
        ]
        got = list(fn(epoch, torch.Generator().manual_seed(epoch)))
        assert len(got) == steps
        assert torch.cat([b["index"] for b in got]).tolist() == want.tolist()
        assert sum((_ids(b["a"], 0) for b in got), []) == want.tolist()
        assert sum((_ids(b["b"], 100) for b in got), []) == want.tolist()
        assert all(b["y"].dtype == torch.long for b in got)
        assert torch.cat([b["y"] for b in got]).tolist() == LABELS[want.numpy()].tolist()


def test_without_a_partner_a_batch_holds_the_weak_view_of_modality_a():
    got = list(_batches(_constant(0), None)(0, torch.Generator().manual_seed(0)))
    for b in got:
        assert set(b) == {"a", "y", "index"}
        assert _ids(b["a"], 0) == b["index"].tolist()


def test_pairs_get_independent_flips_and_crops_unless_shared():
    same = _random(1)  # both modalities the same images: views differ only through their augmentation
    independent = list(_batches(same, same)(0, torch.Generator().manual_seed(0)))
    assert any(not torch.equal(b["a"], b["b"]) for b in independent)
    shared = list(_batches(same, same, shared_aug=True)(0, torch.Generator().manual_seed(0)))
    assert all(torch.equal(b["a"], b["b"]) for b in shared)


@pytest.mark.parametrize("partner", [True, False])
def test_views_are_drawn_from_the_epoch_generator_alone(partner):
    a, b = _random(2), _random(3) if partner else None
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(list(_batches(a, b)(0, torch.Generator().manual_seed(5))))
    keys = ("a", "b") if partner else ("a",)
    for first, second in zip(*runs, strict=True):
        assert all(torch.equal(first[k], second[k]) for k in keys)
    other = list(_batches(a, b)(0, torch.Generator().manual_seed(6)))
    assert not all(torch.equal(x["a"], y["a"]) for x, y in zip(runs[0], other, strict=True))


def test_the_model_is_built_with_the_configured_fusion_and_head_learning_rate():
    model = replace(CFG.model, mlp_ratio=2.0)
    method = FusionFinetuning(model, replace(CFG.finetune, head_lr_mult=0.5), CFG.svd, SIZE, num_classes=3)
    assert method.fusion.blocks[0].mlp.fc1.out_features == 2 * model.width
    assert method.lr_scale("classifier.fc.weight") == 0.5 and method.lr_scale("enc_a.cls_token") == 1.0


def test_a_fusing_model_asks_for_the_partner_image():
    method = FusionFinetuning(CFG.model, CFG.finetune, CFG.svd, SIZE, num_classes=3)
    with pytest.raises(ValueError, match=r"^this model fuses two modalities: give the partner image$"):
        method.encode(torch.zeros(1, 3, SIZE, SIZE), None)
