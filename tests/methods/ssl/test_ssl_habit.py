"""HABIT's queue alignment, recalibration term, feature compensation (RFC) and momentum heredity (CMH)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm
from mics.methods.ssl.habit import (
    cmh_decay,
    compensation_features,
    norm_parameter_distance,
    recalibration_loss,
)


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _habit(threshold: float = 0.95, **params: float):
    return build_algorithm("habit", 2, 10, SSLConfig(threshold=threshold, params={"rfc": 0.0, **params}))


def test_queue_alignment_changes_confidence_and_mask() -> None:
    logits_w = _log([[0.6, 0.4], [0.2, 0.8]])
    # first batch: the queue holds its own mean (0.4, 0.6): rows (1.5, 0.667) and (0.5, 1.333), renormalised
    aligned = _habit(0.65).unlabelled_loss(logits_w, torch.zeros(2, 2), torch.arange(2), 0, 1)
    assert aligned.mask.tolist() == [1.0, 1.0]  # confidences 0.6923, 0.7273
    plain = _habit(0.65, dist_align=0.0).unlabelled_loss(logits_w, torch.zeros(2, 2), torch.arange(2), 0, 1)
    assert plain.mask.tolist() == [0.0, 1.0]  # confidences 0.6, 0.8


def test_queue_keeps_the_last_batches_only() -> None:
    algo = _habit(0.5, da_queue=2.0)
    batches = [[[0.9, 0.1]], [[0.5, 0.5]], [[0.3, 0.7]], [[0.6, 0.4]]]
    history: list[np.ndarray] = []
    for step, rows in enumerate(batches):
        history = (history + [np.array(rows).mean(0)])[-2:]
        probe = np.array(rows[0]) / np.mean(history, axis=0)
        probe /= probe.sum()
        out = algo.unlabelled_loss(_log(rows), torch.zeros(1, 2), torch.arange(1), step, 4)
        assert algo.queue_filled == min(step + 1, 2) and algo.queue_next == (step + 1) % 2
        assert out.logs["threshold"] == 0.5
        assert out.mask.item() == float(probe.max() >= 0.5)
    assert algo.queue_filled == 2
    assert sorted(algo.prob_queue[:, 0].tolist()) == pytest.approx([0.3, 0.6])


def test_recalibration_term_on_hand_computed_band() -> None:
    logits_w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    logits_s = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    # only the first score lies in [0.95, 0.98): cos((1, 0), (1, 1)) = 1 / sqrt 2, averaged over 3
    value = recalibration_loss(logits_w, logits_s, torch.tensor([0.96, 0.5, 0.99]), 0.95, 0.98)
    assert value.item() == pytest.approx(-1 / math.sqrt(2) / 3, rel=1e-5)


def test_compensation_tops_every_present_class_up_to_the_target_count() -> None:
    feats = torch.tensor([[0.0, 0.0], [2.0, 2.0], [5.0, -1.0]])
    labels = torch.tensor([0, 0, 2])
    gen = torch.Generator().manual_seed(0)
    synth, synth_labels = compensation_features(feats, labels, 3, 4, 0.0, gen)
    assert synth_labels.tolist() == [0, 0, 2, 2, 2]  # class 1 absent: nothing drawn
    # with eps = 0 the class-0 draws lie on the line through its two samples, class 2 repeats its one
    assert torch.allclose(synth[:2, 0], synth[:2, 1])
    assert torch.allclose(synth[2:], feats[2].expand(3, 2))


def test_compensation_draws_have_the_class_mean_and_covariance_plus_eps() -> None:
    feats = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [1.0, 3.0, -1.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    synth, _ = compensation_features(feats, torch.zeros(3, dtype=torch.long), 1, 40_003, 0.01, gen)
    x = feats.numpy()
    assert synth.mean(0).numpy() == pytest.approx(x.mean(0), abs=0.03)
    expected = np.cov(x, rowvar=False) + 0.01 * np.eye(3)
    assert np.cov(synth.numpy(), rowvar=False) == pytest.approx(expected, abs=0.05)


def test_rfc_trains_the_classifier_on_confident_pseudo_labelled_features() -> None:
    algo = build_algorithm("habit", 2, 10, SSLConfig(params={"dist_align": 0.0}))
    head = torch.nn.Linear(3, 2)
    logits_w = _log([[0.99, 0.01], [0.98, 0.02], [0.4, 0.6]])
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = algo.unlabelled_loss(
        logits_w, torch.zeros(3, 2), torch.arange(3), 7, 10, feats, feats, classifier=head
    )
    assert out.mask.tolist() == [1.0, 1.0, 0.0]
    # two confident class-0 samples -> one synthetic feature of class 0; recompute it from the same seed
    gen = torch.Generator().manual_seed(7)
    synth, synth_labels = compensation_features(feats[:2], torch.tensor([0, 0]), 2, 3, 1e-6, gen)
    expected_rfc = torch.nn.functional.cross_entropy(head(synth), synth_labels).item()
    assert out.logs["rfc_loss"] == pytest.approx(expected_rfc, rel=1e-5)
    out.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    again = algo.unlabelled_loss(
        logits_w, torch.zeros(3, 2), torch.arange(3), 7, 10, feats, feats, classifier=head
    )
    assert again.logs["rfc_loss"] == out.logs["rfc_loss"]
    with pytest.raises(ValueError, match="classifier"):
        algo.unlabelled_loss(logits_w, torch.zeros(3, 2), torch.arange(3), 0, 10, feats, feats)
    # another seed, another stream: seed * 1_000_003 + step keeps (seed, step) pairs apart
    seeded = build_algorithm("habit", 2, 10, SSLConfig(params={"dist_align": 0.0, "seed": 2.0}))
    out = seeded.unlabelled_loss(
        logits_w, torch.zeros(3, 2), torch.arange(3), 7, 10, feats, feats, classifier=head
    )
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 7)
    synth, synth_labels = compensation_features(feats[:2], torch.tensor([0, 0]), 2, 3, 1e-6, gen)
    expected_rfc = torch.nn.functional.cross_entropy(head(synth), synth_labels).item()
    assert out.logs["rfc_loss"] == pytest.approx(expected_rfc, rel=1e-5)


def test_loss_is_lambda_times_the_sum_of_its_terms() -> None:
    cfg = SSLConfig(lambda_u=3.0, params={"dist_align": 0.0, "rec_weight": 2.0, "rfc_weight": 0.25})
    algo = build_algorithm("habit", 2, 10, cfg)
    logits_w = _log([[0.99, 0.01], [0.96, 0.04], [0.2, 0.8]])
    logits_s = torch.tensor([[0.5, 0.0], [1.0, -1.0], [0.0, 0.3]])
    feats = torch.eye(3)
    out = algo.unlabelled_loss(logits_w, logits_s, torch.arange(3), 0, 1, feats, feats, torch.nn.Linear(3, 2))
    terms = out.logs["unsup_loss"] + 2.0 * out.logs["recalibration_loss"] + 0.25 * out.logs["rfc_loss"]
    assert out.loss.item() == pytest.approx(3.0 * terms, rel=1e-5)
    assert out.logs["recalibration_loss"] < 0  # the 0.96 sample lies in the band


def test_cmh_decay_and_norm_distance_on_hand_computed_values() -> None:
    assert cmh_decay(0.999, 0.0, 0.0, 0.1) == pytest.approx(0.999 * (1 - 0.1 * 0.999 * 0.25))
    model = torch.nn.Sequential(torch.nn.LayerNorm(2), torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    ema_model = torch.nn.Sequential(torch.nn.LayerNorm(2), torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([2.0, 1.0]))  # |dgamma|^2 = 1
        model[0].bias.copy_(torch.tensor([0.0, 2.0]))  # |dbeta|^2 = 4
    # layers: sqrt(5 + 1e-6) and sqrt(1e-6)
    expected = (math.sqrt(5 + 1e-6) + 1e-3) / 2
    assert norm_parameter_distance(model, ema_model) == pytest.approx(expected, rel=1e-6)


def test_ema_decay_uses_the_last_consistency_loss() -> None:
    algo = _habit(dist_align=0.0)
    logits_s = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    algo.unlabelled_loss(_log([[0.9, 0.1], [0.8, 0.2]]), logits_s, torch.arange(2), 0, 1)
    consistency = (math.log(1 + math.e) - 0.0 + math.log(1 + math.exp(-2))) / 2  # CE against class 0
    assert algo.last_consistency == pytest.approx(consistency, rel=1e-6)
    net = torch.nn.Linear(2, 2)  # no normalisation layer: distance 0
    expected = 0.999 * (1 - 0.1 * 0.999 * 0.5 / (1 + math.exp(-consistency)))
    assert algo.ema_decay(0.999, net, net) == pytest.approx(expected, rel=1e-9)
    assert _habit(cmh=0.0).ema_decay(0.999, net, net) == 0.999


def test_compensation_of_classes_already_at_the_target_is_empty_and_typed() -> None:
    feats = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    synth, labels = compensation_features(feats, torch.tensor([0, 1]), 2, 1, 0.1, torch.Generator())
    assert synth.shape == (0, 2) and synth.dtype == feats.dtype
    assert labels.shape == (0,) and labels.dtype == torch.long  # cat with the batch's labels stays long


def test_recalibration_band_includes_its_lower_edge_only() -> None:
    logits_w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    logits_s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # cosine 1 each
    value = recalibration_loss(logits_w, logits_s, torch.tensor([0.95, 0.98, 0.94]), 0.95, 0.98)
    assert value.item() == pytest.approx(-1 / 3, rel=1e-5)  # only the score equal to low counts


def test_consistency_for_the_ema_decay_is_averaged_over_the_global_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mics.methods.ssl.habit as habit

    peer = torch.tensor([7.0, 9.0])

    def two_ranks(t: torch.Tensor) -> torch.Tensor:
        assert t.dim() >= 1, "a per-sample [B] tensor is exchanged, not its mean"
        return torch.cat([t, peer.to(t.dtype)]) if t.dim() == 1 else torch.cat([t, t])

    monkeypatch.setattr(habit, "gather_across_ranks", two_ranks)
    algo = build_algorithm("habit", 2, 10, SSLConfig(params={"dist_align": 0.0, "rfc": 0.0}))
    logits_w = _log([[0.99, 0.01], [0.2, 0.8]])
    logits_s = torch.tensor([[0.5, 0.0], [0.0, 0.3]])
    algo.unlabelled_loss(logits_w, logits_s, torch.arange(2), 0, 4)
    mine = torch.nn.functional.cross_entropy(logits_s, torch.tensor([0, 1]), reduction="none")
    assert algo.last_consistency == pytest.approx(torch.cat([mine, peer]).mean().item(), rel=1e-6)


def test_recalibration_cosine_of_tiny_logits_keeps_its_sign() -> None:
    # the 1e-6 in the denominator guards against zero norms; it must not flip the sign of small vectors
    tiny = torch.tensor([[1e-4, 0.0]])
    value = recalibration_loss(tiny, tiny, torch.tensor([0.96]), 0.95, 0.98)
    assert -1.0 <= value.item() < 0.0
