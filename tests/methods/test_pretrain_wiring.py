"""Which tensor reaches which module in a pre-training step (forward hooks on the public sub-modules).

The formulas of the losses are tested in tests/losses; these checks pin the routing between them: modality
A's image goes to ``enc_a`` (and its momentum copy), B's to ``enc_b``; both masked encodings go through the
ONE shared decoder, each reconstructed against its own image; ``queue_a`` receives the momentum features of
A; the alignment embeddings see the CLS features of their own modality.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from mics.config import preset
from mics.engine.train import StepInfo
from mics.losses.reconstruction import masked_reconstruction
from mics.methods.pretrain import SynergisticPretraining

CFG = preset("smoke")
SIZE = CFG.data.image_size
B = 4


def _info() -> StepInfo:
    return StepInfo(epoch=0, step=0, total_steps=10, epoch_progress=0.5, generator=torch.Generator())


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # the two modalities differ in every pixel, so equality of tensors identifies the source
    return {
        "a": torch.randn(B, 3, SIZE, SIZE, generator=g),
        "b": torch.randn(B, 3, SIZE, SIZE, generator=g) + 5.0,
        "index": torch.arange(B),
    }


def _model(**switches: bool) -> SynergisticPretraining:
    torch.manual_seed(0)
    cfg = replace(CFG.pretrain, **switches)
    return SynergisticPretraining(CFG.model, cfg, SIZE, n_train=64, global_batch=B)


class Recorder:
    """Forward inputs and outputs of named modules, in call order."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.calls: dict[str, list[tuple[tuple[Any, ...], Any]]] = {n: [] for n in names}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.calls[name].append(
                (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), output)
            )

        return hook

    def inputs(self, name: str, call: int = 0, arg: int = 0) -> torch.Tensor:
        return self.calls[name][call][0][arg]

    def output(self, name: str, call: int = 0) -> Any:
        return self.calls[name][call][1]


def test_each_encoder_gets_its_own_modality():
    model = _model()
    batch = _batch()
    rec = Recorder(model, ["enc_a", "enc_b", "enc_a_m", "enc_b_m"])
    model(batch, _info())
    for name, key in (("enc_a", "a"), ("enc_b", "b"), ("enc_a_m", "a"), ("enc_b_m", "b")):
        assert rec.calls[name], f"{name} was not called"
        for call in range(len(rec.calls[name])):
            assert torch.equal(rec.inputs(name, call), batch[key]), f"{name} call {call} got the wrong image"


def _spy_masked(model: SynergisticPretraining, calls: list[tuple[str, torch.Tensor, tuple]]) -> None:
    """Record (encoder, image, outputs) of every masked encoding; the original method does the work."""
    for which in ("enc_a", "enc_b"):
        enc = getattr(model, which)
        original = enc.forward_masked

        def spy(imgs, *args, _orig=original, _which=which, **kwargs):
            out = _orig(imgs, *args, **kwargs)
            calls.append((_which, imgs.detach().clone(), out))
            return out

        enc.forward_masked = spy  # instance attribute: shadows the method for this model only


def test_one_shared_decoder_reconstructs_each_encoders_own_image():
    model = _model(consistency=False, alignment=False)
    batch = _batch()
    masked: list[tuple[str, torch.Tensor, tuple]] = []
    _spy_masked(model, masked)
    rec = Recorder(model, ["decoder"])
    _, logs = model(batch, _info())

    assert sorted(m[0] for m in masked) == ["enc_a", "enc_b"], "each encoder encodes one masked image"
    assert [d for d in dir(model) if d.startswith("decoder")] == ["decoder"], "one decoder for both"
    assert len(rec.calls["decoder"]) == 2, "the shared decoder reconstructs both modalities"
    targets: dict[str, torch.Tensor] = {}
    for (which, imgs, (tokens, mask, ids_restore)), call in zip(masked, rec.calls["decoder"], strict=True):
        assert torch.equal(imgs, batch[which[-1]]), f"{which} masked the other modality's image"
        args = call[0]
        assert torch.equal(args[0], tokens.detach()), f"the decoder did not get {which}'s visible tokens"
        assert torch.equal(args[1], ids_restore), f"the decoder did not get {which}'s restore order"
        pred = call[1].detach()
        enc = getattr(model, which)
        targets[which] = masked_reconstruction(
            enc.patchify(imgs), pred, mask, norm_pix=model.cfg.norm_pix_loss
        )
    own_sum = targets["enc_a"] + targets["enc_b"]
    l_res = logs["l_res"]
    # Eq. 6 as a sum or, equivalently up to the weight, a mean of the two terms
    assert torch.isclose(l_res, own_sum, rtol=1e-5) or torch.isclose(l_res, own_sum / 2, rtol=1e-5), (
        float(l_res),
        float(own_sum),
    )


@pytest.mark.parametrize("perfect_for", ["own", "other"])
def test_each_reconstruction_is_scored_against_its_own_image(perfect_for):
    """The decoder is made to output exactly the image its input tokens came from (or the other one): the
    reconstruction loss is 0 only if every prediction is compared with the image its encoder masked."""
    model = _model(consistency=False, alignment=False, norm_pix_loss=False)
    batch = _batch()
    masked: list[tuple[str, torch.Tensor, tuple]] = []
    _spy_masked(model, masked)

    def perfect(module, args, output):
        which = masked[-1][0]  # the encoder whose tokens the decoder just got
        key = which[-1] if perfect_for == "own" else ("b" if which == "enc_a" else "a")
        return getattr(model, which).patchify(batch[key])

    model.decoder.register_forward_hook(perfect)
    _, logs = model(batch, _info())
    assert len(masked) == 2
    if perfect_for == "own":
        assert float(logs["l_res"]) == 0.0
    else:
        assert float(logs["l_res"]) > 1.0


def test_queue_a_receives_the_momentum_features_of_modality_a():
    model = _model(reconstruction=False, alignment=False)
    batch = _batch()
    rec = Recorder(model, ["proj_a_m", "proj_b_m", "enc_a_m", "enc_b_m"])
    ptr_a, ptr_b = int(model.queue_a.ptr), int(model.queue_b.ptr)
    model(batch, _info())
    z_a_m = rec.output("proj_a_m").detach()
    z_b_m = rec.output("proj_b_m").detach()
    # the momentum projections read the momentum encoders' CLS tokens of their own modality
    assert torch.equal(rec.inputs("proj_a_m"), rec.output("enc_a_m")[:, 0])
    assert torch.equal(rec.inputs("proj_b_m"), rec.output("enc_b_m")[:, 0])
    assert not torch.allclose(z_a_m, z_b_m, atol=1e-3)
    rows_a = model.queue_a.features[ptr_a : ptr_a + B]
    rows_b = model.queue_b.features[ptr_b : ptr_b + B]
    torch.testing.assert_close(rows_a, z_a_m.to(rows_a.dtype))
    torch.testing.assert_close(rows_b, z_b_m.to(rows_b.dtype))


def test_online_projections_and_alignment_embeddings_read_their_own_cls():
    model = _model(reconstruction=False)
    batch = _batch()
    rec = Recorder(model, ["enc_a", "enc_b", "proj_a", "proj_b", "gloe_a", "gloe_b"])
    model(batch, _info())
    cls_a, cls_b = rec.output("enc_a")[:, 0].detach(), rec.output("enc_b")[:, 0].detach()
    for name, cls in (("proj_a", cls_a), ("gloe_a", cls_a), ("proj_b", cls_b), ("gloe_b", cls_b)):
        assert torch.equal(rec.inputs(name), cls), f"{name} read the other modality's CLS feature"


@pytest.mark.parametrize(
    "switches",
    [
        {"reconstruction": False, "alignment": False},
        {"consistency": False, "alignment": False},
        {"consistency": False, "reconstruction": False},
    ],
)
def test_the_step_loss_is_the_weighted_sum_of_the_logged_terms(switches):
    """Each logged term enters L_pre with its own weight (Eq. 9); weights that differ catch a swap."""
    cfg = replace(CFG.pretrain, w_consistency=0.3, w_reconstruction=1.7, w_alignment=2.9, **switches)
    torch.manual_seed(0)
    model = SynergisticPretraining(CFG.model, cfg, SIZE, n_train=64, global_batch=B)
    loss, logs = model(_batch(), _info())
    weights = {"l_cons": 0.3, "l_res": 1.7, "l_align": 2.9}
    terms = [k for k in weights if k in logs]
    assert len(terms) == 1
    torch.testing.assert_close(loss.detach(), weights[terms[0]] * logs[terms[0]])


@pytest.mark.parametrize("shared_aug", [False, True])
def test_pair_batches_pair_each_image_with_its_own_partner_and_index(shared_aug):
    """Sample i is a constant image of value i (modality A) and 100 + i (B): whatever flip or crop the weak
    view draws, a batch row must still hold value i in ``a``, 100 + i in ``b`` and i in ``index``."""
    import numpy as np

    from mics.data.views import to_float
    from mics.methods.pretrain import pair_batches

    n, size = 10, 8
    values = np.arange(n, dtype=np.uint8)[:, None, None, None]
    arrays_a = np.broadcast_to(values, (n, 3, size, size)).copy()
    arrays_b = arrays_a + 100
    indices = np.array([1, 2, 3, 5, 6, 7, 8, 9])  # 0 and 4 are not training samples
    make = pair_batches(arrays_a, arrays_b, indices, 3, torch.device("cpu"), seed=0, shared_aug=shared_aug)
    gen = torch.Generator().manual_seed(0)
    batches = list(make(0, gen))
    assert len(batches) == 2  # 8 samples, batches of 3, the last partial one dropped
    seen = []
    for batch in batches:
        idx = batch["index"]
        assert batch["a"].shape == batch["b"].shape == (3, 3, size, size)
        assert idx.tolist() == sorted(idx.tolist())  # sorted reads of the memory-mapped cache
        const = torch.as_tensor(idx, dtype=torch.uint8)[:, None, None, None].expand(3, 3, size, size)
        torch.testing.assert_close(batch["a"], to_float(const))
        torch.testing.assert_close(batch["b"], to_float(const + 100))
        seen += idx.tolist()
    assert len(set(seen)) == 6 and set(seen) <= set(indices.tolist())
    # every sample once per epoch without drop_last; the order is the epoch's, the same on a rerun
    full = pair_batches(arrays_a, arrays_b, indices, 3, torch.device("cpu"), seed=0, drop_last=False)
    order = [i for b in full(0, gen) for i in b["index"].tolist()]
    assert sorted(order) == indices.tolist()
    assert order == [i for b in full(0, gen) for i in b["index"].tolist()]
    assert any(
        [i for b in full(e, gen) for i in b["index"].tolist()] != order for e in (1, 2, 3)
    )  # another epoch, another permutation


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_uses_the_configured_pixel_normalisation(norm_pix):
    """A decoder that outputs the raw patches scores 0 without norm_pix and clearly above 0 with it (the
    target is then each patch standardised)."""
    model = _model(consistency=False, alignment=False, norm_pix_loss=norm_pix)
    batch = _batch()
    masked: list[tuple[str, torch.Tensor, tuple]] = []
    _spy_masked(model, masked)
    model.decoder.register_forward_hook(
        lambda module, args, output: getattr(model, masked[-1][0]).patchify(batch[masked[-1][0][-1]])
    )
    _, logs = model(batch, _info())
    assert (float(logs["l_res"]) > 0.1) is norm_pix


def test_the_alignment_temperature_is_clamped_to_its_range_before_use():
    model = _model(consistency=False, reconstruction=False)
    batch = _batch()
    for start, kept in ((1e-6, 0.001), (3.0, 0.5), (0.07, 0.07)):
        with torch.no_grad():
            model.temp_align.fill_(start)
        model(batch, _info())
        assert float(model.temp_align.detach()) == pytest.approx(kept)
