"""Which tensor reaches which module in a fine-tuning step and in ``predict`` (forward hooks).

Pinned: ``enc_a`` gets the WLI image and ``enc_b`` its partner; the fusion encoder takes A's tokens as the
queries and B's as the context; the classifier reads the fused CLS feature; modality A's shift dictionary
picks its prototype with A's own CLS feature (and B's with B's); predictions depend on the order of the
two inputs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mics.config import preset
from mics.engine.train import StepInfo
from mics.methods.finetune import FusionFinetuning
from mics.methods.svd import ShiftDictionary
from mics.models.fusion import FusionEncoder

CFG = preset("smoke")
SIZE = CFG.data.image_size
D = CFG.model.width
C = 3


def _info(epoch: int = 1) -> StepInfo:
    return StepInfo(epoch, 0, 10, 0.0, torch.Generator().manual_seed(0))


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "a": torch.randn(n, 3, SIZE, SIZE, generator=g),
        "b": torch.randn(n, 3, SIZE, SIZE, generator=g) * 2 + 3,
        "y": torch.arange(n) % C,
    }


def _model(**switches: Any) -> FusionFinetuning:
    torch.manual_seed(0)
    cfg = replace(CFG.finetune, **switches)
    return FusionFinetuning(CFG.model, cfg, replace(CFG.svd, prototype="nearest"), SIZE, num_classes=C)


class Recorder:
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.calls: dict[str, list[tuple[tuple[Any, ...], Any]]] = {n: [] for n in names}
        for name in names:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.calls[name].append((tuple(a.detach().clone() for a in args), output.detach().clone()))

        return hook


def test_encoders_fusion_and_classifier_are_wired_in_order():
    model = _model(use_svd=False)
    batch = _batch()
    rec = Recorder(model, ["enc_a", "enc_b", "fusion", "classifier"])
    model(batch, _info())
    (in_a,), tokens_a = rec.calls["enc_a"][0]
    (in_b,), tokens_b = rec.calls["enc_b"][0]
    assert torch.equal(in_a, batch["a"]) and torch.equal(in_b, batch["b"])
    assert len(rec.calls["fusion"]) == 1
    (query, context), fused = rec.calls["fusion"][0]
    assert torch.equal(query, tokens_a), "the fusion encoder's queries must be modality A's tokens"
    assert torch.equal(context, tokens_b), "the fusion encoder's context must be modality B's tokens"
    # every classifier call reads the fused CLS feature (shifted copies are tested below)
    assert rec.calls["classifier"], "the classifier was not used"
    assert torch.equal(rec.calls["classifier"][0][0][0], fused[:, 0])


def test_predict_uses_the_same_wiring_and_input_order_matters():
    model = _model().eval()
    batch = _batch()
    rec = Recorder(model, ["enc_a", "enc_b", "fusion"])
    pred = model.predict(batch["a"], batch["b"])
    assert torch.equal(rec.calls["enc_a"][0][0][0], batch["a"])
    assert torch.equal(rec.calls["enc_b"][0][0][0], batch["b"])
    (query, context), fused = rec.calls["fusion"][0]
    assert torch.equal(query, rec.calls["enc_a"][0][1]) and torch.equal(context, rec.calls["enc_b"][0][1])
    torch.testing.assert_close(pred.features, fused[:, 0])
    swapped = model.predict(batch["b"], batch["a"])
    assert not torch.allclose(pred.probs, swapped.probs, atol=1e-6)
    again = model.predict(batch["a"], batch["b"])
    torch.testing.assert_close(again.probs, pred.probs)


def test_fusion_encoder_attends_from_a_to_b():
    """Queries come from the first argument (output has its length), keys and values from the second."""
    torch.manual_seed(0)
    fusion = FusionEncoder(D, depth=1, heads=2).eval()
    a, b = torch.randn(2, 5, D), torch.randn(2, 9, D)
    seen: dict[str, torch.Tensor] = {}
    block = fusion.blocks[0]
    block.cross_attn.q.register_forward_hook(lambda m, args, out: seen.__setitem__("q", args[0].detach()))
    block.cross_attn.kv.register_forward_hook(lambda m, args, out: seen.__setitem__("kv", args[0].detach()))
    out = fusion(a, b)
    assert out.shape == (2, 5, D)
    assert seen["q"].shape[1] == 5 and seen["kv"].shape[1] == 9
    torch.testing.assert_close(seen["kv"], block.norm_context(b))
    # the context changes the output; tokens of b permuted along the sequence do not (attention is a set op)
    assert not torch.allclose(fusion(a, torch.randn(2, 9, D)), out, atol=1e-5)
    torch.testing.assert_close(fusion(a, b[:, torch.randperm(9)]), out, atol=1e-5, rtol=1e-5)


def _dictionaries(cls_a: torch.Tensor, cls_b: torch.Tensor) -> tuple[ShiftDictionary, ShiftDictionary]:
    """Two clusters per dictionary whose prototypes are the sample's own CLS features of A and B, so the
    nearest prototype tells which feature chose it; each cluster has one shift along its own axis."""
    e = torch.eye(D)
    dict_a = ShiftDictionary(torch.stack([cls_a, cls_b]), torch.stack([e[0:1], e[1:2]]))
    dict_b = ShiftDictionary(torch.stack([cls_b, cls_a]), torch.stack([e[2:3], e[3:4]]))
    return dict_a, dict_b


def _shift_directions(model: FusionFinetuning, batch: dict[str, torch.Tensor]) -> list[int]:
    """The axes along which the classifier's inputs differ from the fused feature z."""
    rec = Recorder(model, ["classifier", "fusion"])
    model(batch, _info())
    z = rec.calls["fusion"][0][1][:, 0]
    axes = []
    for (x,), _ in rec.calls["classifier"]:
        delta = (x - z)[0]
        if delta.abs().max() > 1e-6:
            axis = int(delta.abs().argmax())
            # one axis only: the shift is along a basis vector, whatever its scale
            assert delta.abs().sum() - delta.abs()[axis] < 1e-4 * delta.abs()[axis], delta
            axes.append(axis)
    return axes


def test_each_dictionary_picks_its_prototype_with_its_own_modality():
    model = _model(use_tmc=False)
    batch = {k: v[:1] for k, v in _batch().items()}
    with torch.no_grad():
        feats = model.encode(batch["a"], batch["b"])
    dict_a, dict_b = _dictionaries(feats["cls_a"][0], feats["cls_b"][0])
    model.set_dictionaries(dict_a, dict_b)
    axes = _shift_directions(model, batch)
    # A's dictionary, chosen by cls_a, gives cluster 0 (axis 0); B's, chosen by cls_b, cluster 0 (axis 2)
    assert sorted(axes) == [0, 2], axes


def test_swapped_dictionaries_give_other_shifts():
    """The check above can fail: with the dictionaries built the other way round the chosen shifts change."""
    model = _model(use_tmc=False)
    batch = {k: v[:1] for k, v in _batch().items()}
    with torch.no_grad():
        feats = model.encode(batch["a"], batch["b"])
    dict_a, dict_b = _dictionaries(feats["cls_b"][0], feats["cls_a"][0])
    model.set_dictionaries(dict_a, dict_b)
    assert sorted(_shift_directions(model, batch)) == [1, 3]


def test_evidential_heads_read_their_own_modality():
    model = _model(use_svd=False)
    batch = _batch()
    rec = Recorder(model, ["enc_a", "enc_b", "evidence_a", "evidence_b"])
    model(batch, _info())
    assert torch.equal(rec.calls["evidence_a"][0][0][0], rec.calls["enc_a"][0][1][:, 0])
    assert torch.equal(rec.calls["evidence_b"][0][0][0], rec.calls["enc_b"][0][1][:, 0])


def test_wli_only_model_classifies_the_wli_cls_feature():
    model = _model(use_nbi=False, use_svd=False, use_tmc=False)
    batch = _batch()
    rec = Recorder(model, ["enc_a", "classifier"])
    model(batch, _info())
    assert torch.equal(rec.calls["enc_a"][0][0][0], batch["a"])
    assert torch.equal(rec.calls["classifier"][0][0][0], rec.calls["enc_a"][0][1][:, 0])
    pred = model.eval().predict(batch["a"], None)
    assert torch.equal(pred.probs.argmax(1), model.classifier(model.encode(batch["a"], None)["z"]).argmax(1))


def test_labelled_batches_pair_each_wli_image_with_its_own_partner_and_label():
    """Constant images (sample i: every pixel i in A, 100 + i in B) survive the weak view unchanged, so each
    batch row tells which sample and which modality it came from."""
    import numpy as np

    from mics.data.views import MEAN, STD
    from mics.methods.finetune import labelled_batches

    n, size = 20, 16
    ones = np.ones((1, 3, size, size), np.uint8)
    arrays_a = np.arange(n, dtype=np.uint8)[:, None, None, None] * ones
    arrays_b = (np.arange(n, dtype=np.uint8)[:, None, None, None] + 100) * ones
    labels = (np.arange(n) * 7) % C
    chosen = np.array([1, 4, 6, 11, 13, 17, 19])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def ids(x: torch.Tensor, offset: int) -> list[int]:
        pixels = torch.round((x * std + mean) * 255.0)
        assert (pixels == pixels[:, :, :1, :1]).all()
        return (pixels[:, 0, 0, 0].long() - offset).tolist()

    batches = labelled_batches(arrays_a, arrays_b, labels, chosen, 3, 5, torch.device("cpu"), seed=0)
    seen: list[int] = []
    for epoch in range(2):
        steps = list(batches(epoch, torch.Generator().manual_seed(epoch)))
        assert len(steps) == 5  # steps_per_epoch, cycling through the 7 labelled samples
        for batch in steps:
            rows = ids(batch["a"], 0)
            assert len(rows) == 3 and set(rows) <= set(chosen.tolist())
            assert ids(batch["b"], 100) == rows, "the partner must be the same sample's modality B"
            assert batch["y"].tolist() == labels[rows].tolist()
            seen += rows
    assert set(seen) == set(chosen.tolist())
    wli_only = labelled_batches(arrays_a, None, labels, chosen, 3, 2, torch.device("cpu"), seed=0)
    assert all("b" not in batch for batch in wli_only(0, torch.Generator()))
