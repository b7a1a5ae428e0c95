"""The baseline loop's wiring: which images feed the weak and the strong logits, and that the ground truth
of unlabelled samples never reaches a loss.

Images here are constant per sample (every pixel of sample i of modality A is ``i``, of B ``100 + i``); a
weak view (flip + crop with reflect padding) leaves a constant image unchanged, so each view tells which
sample and which modality it came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from mics.config import SSLConfig, preset
from mics.data.views import MEAN, STD
from mics.engine.logging import MetricsLogger
from mics.engine.train import Schedule, StepInfo, fit
from mics.methods import baseline as baseline_module
from mics.methods.baseline import SSLTraining, ssl_batches
from mics.methods.pretrain import cycled_order, labelled_order
from mics.methods.ssl import build_algorithm

SMOKE = preset("smoke")
SIZE = SMOKE.data.image_size
C = 3
N = 24
LABELLED = np.array([0, 3, 5, 9, 14, 20])
UNLABELLED = np.arange(N)  # USB's convention: the labelled images are in the unlabelled stream too


def _constant_images(offset: int) -> np.ndarray:
    return (np.arange(N, dtype=np.uint8)[:, None, None, None] + offset) * np.ones(
        (1, 3, SIZE, SIZE), np.uint8
    )


def _sample_ids(x: torch.Tensor, offset: int) -> list[int]:
    """Undo ``to_float`` on a batch of constant images and return the sample index of each."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = torch.round((x * std + mean) * 255.0)
    assert (pixels == pixels[:, :, :1, :1]).all(), "a view of a constant image is not constant"
    values = pixels[:, 0, 0, 0].long() - offset
    assert ((values >= 0) & (values < N)).all(), f"pixels {pixels[:, 0, 0, 0]} are not from this modality"
    return values.tolist()


def _batches(way: str, labels: np.ndarray, cfg: SSLConfig, steps: int = 3, seed: int = 0, **kwargs: Any):
    return ssl_batches(
        _constant_images(0),
        _constant_images(100),
        labels,
        LABELLED,
        UNLABELLED,
        cfg,
        way,  # type: ignore[arg-type]
        steps,
        torch.device("cpu"),
        seed=seed,
        **kwargs,
    )


def _labels() -> np.ndarray:
    return np.arange(N) % C


def test_multimodal_strong_view_is_the_weak_view_of_the_paired_partner():
    cfg = SSLConfig(batch_size=4, uratio=2)
    labels = _labels()
    for batch in _batches("multimodal", labels, cfg)(0, torch.Generator().manual_seed(0)):
        ids_u = UNLABELLED[batch["idx_u"].numpy()].tolist()
        assert _sample_ids(batch["x_u_w"], 0) == ids_u, "the weak view must be modality A of the sample"
        assert _sample_ids(batch["x_u_s"], 100) == ids_u, "the strong view must be modality B of the sample"
        ids_l = _sample_ids(batch["x_l"], 0)
        assert set(ids_l) <= set(LABELLED.tolist())
        assert batch["y_l"].tolist() == labels[ids_l].tolist()
        assert batch["y_u"].tolist() == labels[ids_u].tolist()


def test_standard_strong_view_is_randaugment_of_the_same_wli_image(monkeypatch):
    seen: list[torch.Tensor] = []
    settings: set[tuple[int, int]] = set()

    def spy_strong(x: torch.Tensor, ops: int, magnitude: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(x.clone())
        settings.add((ops, magnitude))
        return 255 - x  # a marker transform: the strong view must be exactly what ``strong`` returned

    monkeypatch.setattr(baseline_module, "strong", spy_strong)
    cfg = SSLConfig(batch_size=4, uratio=2, randaugment_ops=3, randaugment_magnitude=7)
    for batch in _batches("standard", _labels(), cfg)(0, torch.Generator().manual_seed(0)):
        ids_u = UNLABELLED[batch["idx_u"].numpy()].tolist()
        raw = seen.pop(0)
        assert raw.dtype == torch.uint8 and raw[:, 0, 0, 0].tolist() == ids_u, "strong() got other images"
        assert _sample_ids(batch["x_u_w"], 0) == ids_u
        # the marker maps sample i to the constant 255 - i, read back with offset 255 - (N - 1)
        assert _sample_ids(batch["x_u_s"], 255 - (N - 1)) == [N - 1 - i for i in ids_u]
    assert not seen
    assert settings == {(3, 7)}, "RandAugment must get the configured number of ops and magnitude"


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_batches_follow_the_seeded_sample_orders(balance):
    """Each epoch's labelled stream is ``labelled_order`` of tag ``l.<epoch>`` (class-balanced draws with
    ``"sampler"``), the unlabelled stream ``cycled_order`` of the positions in ``unlabelled`` with tag
    ``u.<epoch>``, both of the run's seed, sliced into consecutive batches: every recorded run's batches
    depend on it."""
    cfg = SSLConfig(batch_size=4, uratio=2)
    # imbalanced (balanced draws differ from permutations), int32 (the batches' labels are int64 all the same)
    labels = np.array([0] * 18 + [1] * 4 + [2] * 2, dtype=np.int32)
    steps, b_l, b_u = 4, 4, 8  # 32 unlabelled draws per epoch: more than one permutation of the 24 samples
    positions = np.arange(len(UNLABELLED))
    fn = _batches("multimodal", labels, cfg, steps, seed=11, balance=balance)
    for epoch in (0, 1):
        want_l = labelled_order(LABELLED, labels, 11, f"l.{epoch}", steps * b_l, balance)[: steps * b_l]
        want_u = cycled_order(positions, 11, f"u.{epoch}", steps * b_u)[: steps * b_u]
        got = list(fn(epoch, torch.Generator().manual_seed(epoch)))
        assert len(got) == steps
        assert sum((_sample_ids(b["x_l"], 0) for b in got), []) == want_l.tolist()
        assert torch.cat([b["idx_u"] for b in got]).tolist() == want_u.tolist()
        assert all(b["y_l"].dtype == b["y_u"].dtype == torch.long for b in got)
        assert torch.cat([b["y_u"] for b in got]).tolist() == labels[UNLABELLED[want_u.numpy()]].tolist()
        assert sum((_sample_ids(b["x_u_w"], 0) for b in got), []) == UNLABELLED[want_u.numpy()].tolist()


def test_without_unlabelled_data_the_batches_hold_the_labelled_stream_only():
    fn = _batches("multimodal", _labels(), SSLConfig(batch_size=4, uratio=2), use_unlabelled=False)
    got = list(fn(0, torch.Generator().manual_seed(0)))
    assert len(got) == 3 and all(set(b) == {"x_l", "y_l"} for b in got)


def test_multimodal_views_are_drawn_from_the_epoch_generator_alone():
    """Flips and crops of every view come from the generator ``fit`` hands the epoch (seeded per epoch and
    rank), not from the global RNG: the same generator gives the same batches whatever that state."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8)
    b = rng.integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8)
    cfg = SSLConfig(batch_size=4, uratio=2)
    fn = ssl_batches(a, b, _labels(), LABELLED, UNLABELLED, cfg, "multimodal", 3, torch.device("cpu"), seed=0)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(list(fn(0, torch.Generator().manual_seed(5))))
    for first, second in zip(*runs, strict=True):
        for key in ("x_l", "x_u_w", "x_u_s"):
            assert torch.equal(first[key], second[key]), key
    other = list(fn(0, torch.Generator().manual_seed(6)))
    assert not all(torch.equal(x["x_u_s"], y["x_u_s"]) for x, y in zip(runs[0], other, strict=True))


def _model(method: str, threshold: float) -> SSLTraining:
    torch.manual_seed(0)
    algorithm = build_algorithm(method, C, N, SSLConfig(batch_size=4, uratio=2, threshold=threshold))
    return SSLTraining(SMOKE.model, SIZE, C, algorithm)


def test_weak_logits_come_from_the_weak_view_and_strong_logits_from_the_strong_view():
    model = _model("fixmatch", 0.3)
    g = torch.Generator().manual_seed(0)
    batch = {
        "x_l": torch.randn(4, 3, SIZE, SIZE, generator=g),
        "y_l": torch.tensor([0, 1, 2, 0]),
        "x_u_w": torch.randn(8, 3, SIZE, SIZE, generator=g),
        "x_u_s": torch.randn(8, 3, SIZE, SIZE, generator=g) + 2,
        "idx_u": torch.arange(8),
    }
    inputs: list[torch.Tensor] = []
    model.backbone.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    got: dict[str, torch.Tensor] = {}
    original = model.algorithm.unlabelled_loss

    def spy(logits_w, logits_s, *args, **kwargs):
        got["w"], got["s"] = logits_w.detach().clone(), logits_s.detach().clone()
        return original(logits_w, logits_s, *args, **kwargs)

    model.algorithm.unlabelled_loss = spy  # type: ignore[method-assign]
    model(batch, StepInfo(0, 0, 10, 0.0, torch.Generator().manual_seed(0)))
    assert len(inputs) == 2
    assert torch.equal(inputs[0], batch["x_u_w"])
    assert torch.equal(inputs[1], torch.cat([batch["x_l"], batch["x_u_s"]]))
    with torch.no_grad():
        want_w = model.head(model.features(batch["x_u_w"]))
        want_s = model.head(model.features(batch["x_u_s"]))
    torch.testing.assert_close(got["w"], want_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["s"], want_s, atol=1e-5, rtol=1e-5)


def _train(method: str, labels: np.ndarray, threshold: float) -> tuple[dict[str, torch.Tensor], list[dict]]:
    model = _model(method, threshold)
    cfg = SSLConfig(batch_size=4, uratio=2, threshold=threshold)
    batches = _random_batches(labels, cfg)
    schedule = Schedule(2, 3, 1e-3, 1e-5, 0.02, warmup_steps=1, ema=0.9)
    result = fit(
        model,
        batches,
        schedule,
        stage=method,
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=None,
        logger=MetricsLogger(None),
        extra=model.algorithm,
    )
    return model.state_dict(), result.history


def _random_batches(labels: np.ndarray, cfg: SSLConfig):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8)
    b = rng.integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        fn = ssl_batches(
            a, b, labels, LABELLED, UNLABELLED, cfg, "multimodal", 3, torch.device("cpu"), seed=0
        )
        yield from fn(epoch, generator)

    return batches


@pytest.mark.parametrize(("method", "threshold"), [("fixmatch", 0.34), ("softmatch", 0.95)])
def test_unlabelled_ground_truth_never_reaches_the_weights(method, threshold):
    labels = _labels()
    hidden = labels.copy()
    others = np.setdiff1d(np.arange(N), LABELLED)
    hidden[others] = (labels[others] + 1) % C  # every unlabelled-only sample gets another class
    state, history = _train(method, labels, threshold)
    state_h, history_h = _train(method, hidden, threshold)
    assert max(h["mask_rate"] for h in history) > 0, "no unlabelled sample counted: the check is empty"
    for key in state:
        assert torch.equal(state[key], state_h[key]), f"{key} depends on unlabelled ground truth"
    assert [h["loss"] for h in history] == [h["loss"] for h in history_h]
    # the changed labels did reach the batch (as monitoring): the pseudo-label accuracy differs
    assert [h["pseudo_acc"] for h in history] != [h["pseudo_acc"] for h in history_h]


def test_labelled_ground_truth_does_reach_the_weights():
    """The permutation test above can fail: changing labelled samples' labels changes the weights."""
    labels = _labels()
    changed = labels.copy()
    changed[LABELLED] = (labels[LABELLED] + 1) % C
    state, _ = _train("fixmatch", labels, 0.34)
    state_c, _ = _train("fixmatch", changed, 0.34)
    assert any(not torch.equal(state[k], state_c[k]) for k in state if k.startswith("head"))
