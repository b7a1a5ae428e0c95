"""SIABC: EMA thresholds (not SIAVC's defective ones), Otsu-triggered super augmentation, cross-set mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mics.config import SSLConfig
from mics.methods.ssl import build_algorithm
from mics.methods.ssl.siabc import cross_set_mix, otsu_split, super_augment


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _siabc(num_unlabelled: int = 10, num_classes: int = 3, **params: float):
    return build_algorithm("siabc", num_classes, num_unlabelled, SSLConfig(params={"ema_p": 0.9, **params}))


def test_global_and_local_thresholds_are_true_emas_over_the_whole_batch() -> None:
    algo = _siabc()
    algo.unlabelled_loss(_log([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]), torch.zeros(2, 3), torch.arange(2), 0, 10)
    # tau = 0.9 tau_0 + 0.1 mean max p (SIAVC's code: 0.9 + 0.1 mean max p = 0.965)
    assert algo.tau.item() == pytest.approx(0.9 / 3 + 0.1 * 0.65, abs=1e-6)
    # p~ from the mean over both samples (SIAVC's code: first sample only, divided by B)
    assert algo.p_tilde.tolist() == pytest.approx([0.34, 0.34, 0.32], abs=1e-6)
    out = algo.unlabelled_loss(
        _log([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.36, 0.30, 0.34]]),
        torch.zeros(3, 3),
        torch.arange(3),
        1,
        10,
    )
    assert algo.tau.item() == pytest.approx(0.3871667, abs=1e-6)
    assert out.mask.tolist() == [1.0, 1.0, 0.0]


def test_temperature_scales_the_probabilities_used_for_thresholds() -> None:
    algo = _siabc(T=0.5)
    algo.unlabelled_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.arange(1), 0, 1)
    p = math.exp(2.0) / (math.exp(2.0) + 2)
    assert algo.tau.item() == pytest.approx(0.9 / 3 + 0.1 * p, abs=1e-6)


def _naive_otsu(values: list[float]) -> tuple[float, bool]:
    ordered = sorted(values)
    best, best_t = 0.0, None
    for cut in range(1, len(ordered)):
        low, high = ordered[:cut], ordered[cut:]
        w1, w2 = len(low) / len(ordered), len(high) / len(ordered)
        score = w1 * w2 * (np.mean(low) - np.mean(high)) ** 2
        if score > best:
            best, best_t = score, (ordered[cut - 1] + ordered[cut]) / 2
    return (best_t if best_t is not None else 0.0), best_t is not None


def test_otsu_split_on_a_hand_example_and_against_brute_force() -> None:
    threshold, separable = otsu_split(
        torch.tensor([[0.1, 2.0, 0.2, 2.2]]), torch.ones(1, 4, dtype=torch.bool)
    )
    assert threshold.item() == pytest.approx(1.1) and bool(separable)
    rng = np.random.default_rng(0)
    values = torch.tensor(rng.exponential(size=(20, 6)), dtype=torch.float64)
    counts = torch.tensor(rng.integers(0, 7, size=20))
    counts[0], counts[1] = 6, 1
    valid = torch.arange(6).unsqueeze(0) < counts.unsqueeze(1)
    thresholds, separable = otsu_split(values, valid)
    for row in range(20):
        expected_t, expected_sep = _naive_otsu(values[row, : counts[row]].tolist())
        assert bool(separable[row]) == expected_sep
        if expected_sep:
            assert thresholds[row].item() == pytest.approx(expected_t)
    _, flat = otsu_split(torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3, dtype=torch.bool))
    assert not bool(flat)


def _feed(algo, idx: int, losses: list[float]) -> None:
    """Record per-sample losses through unlabelled_loss: CE(logits_s, class 0) = l for logits (0, -x, -x)."""
    for step, loss in enumerate(losses):
        # CE for class 0 of (0, -x, -x) is log(1 + 2 e^-x) = loss  =>  x = -log((e^loss - 1) / 2)
        x = -math.log((math.exp(loss) - 1) / 2)
        logits_s = torch.tensor([[0.0, -x, -x]])
        algo.unlabelled_loss(torch.tensor([[5.0, 0.0, 0.0]]), logits_s, torch.tensor([idx]), step, 100)


def test_loss_history_and_easy_samples() -> None:
    algo = _siabc(sab_history=4.0)
    _feed(algo, 0, [2.0, 2.2, 0.1])  # latest below the split -> easy
    _feed(algo, 1, [0.1, 0.2, 2.0])  # latest above -> not easy
    _feed(algo, 2, [0.3])  # one value: no split
    _feed(algo, 3, [2.0, 2.2, 0.1, 0.2, 2.1, 1.9])  # ring of 4: entries 5 and 6 overwrite slots 0 and 1
    assert algo.history_count[:4].tolist() == [3, 3, 1, 6]
    assert algo.loss_history[0, :3].tolist() == pytest.approx([2.0, 2.2, 0.1], abs=1e-5)
    assert algo.loss_history[3].tolist() == pytest.approx([2.1, 1.9, 0.1, 0.2], abs=1e-5)  # latest 1.9: high
    assert algo.easy_samples(torch.tensor([0, 1, 2, 3, 4])).tolist() == [True, False, False, False, False]


def test_mix_batch_super_augments_easy_strong_views_only() -> None:
    algo = _siabc(mix=0.0, sab_history=4.0)
    _feed(algo, 0, [2.0, 2.2, 0.1])
    x_l = torch.zeros(1, 3, 4, 4)
    x_u_w = torch.ones(2, 3, 4, 4)
    x_u_s = torch.full((2, 3, 4, 4), 0.5)
    gen = torch.Generator().manual_seed(0)
    y_l = torch.tensor([1])
    out = algo.mix_batch(x_l, y_l, x_u_w, x_u_s, torch.zeros(2, 3), gen, idx_u=torch.tensor([0, 1]))
    assert out[0] is x_l and out[1] is y_l and out[2] is x_u_w
    assert not torch.equal(out[3][0], x_u_s[0]) and torch.equal(out[3][1], x_u_s[1])
    gen = torch.Generator().manual_seed(0)
    again = algo.mix_batch(x_l, y_l, x_u_w, x_u_s, torch.zeros(2, 3), gen, idx_u=torch.tensor([0, 1]))
    assert torch.equal(again[3], out[3])


def test_super_augmentation_zeroes_pixels_and_adds_noise() -> None:
    algo = _siabc(mix=0.0, sab_history=4.0, sab_mask_prob=0.5, sab_noise_std=0.0)
    _feed(algo, 0, [2.0, 2.2, 0.1])
    x = torch.full((1, 3, 16, 16), 3.0)
    out = algo.mix_batch(x, torch.tensor([0]), x, x, torch.zeros(1, 3), None, torch.tensor([0]))[3]
    zeroed = out[0] == 0.0
    # one mask for all channels
    assert torch.equal(zeroed[0], zeroed[1]) and torch.equal(zeroed[0], zeroed[2])
    assert 0.3 < zeroed[0].float().mean().item() < 0.7
    assert set(out.unique().tolist()) == {0.0, 3.0}


def test_cross_set_mixture_layout_and_convex_targets() -> None:
    algo = _siabc(sab=0.0, num_classes=2)
    x_l = torch.ones(1, 3, 2, 2)  # labelled image of class 0, all ones
    x_u = torch.zeros(1, 3, 2, 2)  # unlabelled image, predicted (0.2, 0.8): below list_threshold
    logits_u = _log([[0.2, 0.8]])
    gen = torch.Generator().manual_seed(3)
    x_out, y_out, _, _ = algo.mix_batch(x_l, torch.tensor([0]), x_u, x_u, logits_u, gen, torch.tensor([0]))
    assert x_out.shape == (2, 3, 2, 2) and y_out.shape == (2, 2)
    assert torch.equal(x_out[0], x_l[0]) and y_out[0].tolist() == [1.0, 0.0]
    alpha = x_out[1, 0, 0, 0].item()
    assert 0.0 <= alpha <= 1.0 and torch.allclose(x_out[1], torch.full((3, 2, 2), alpha))
    # target alpha * (1, 0) + (1 - alpha) * (0.2, 0.8)
    assert y_out[1].tolist() == pytest.approx([0.2 + 0.8 * alpha, 0.8 - 0.8 * alpha], abs=1e-6)


def test_confident_unlabelled_images_join_the_pool_with_their_pseudo_label() -> None:
    algo = _siabc(sab=0.0, num_classes=2, list_threshold=0.9)
    x_l = torch.ones(1, 3, 1, 1)  # class 0
    x_u = torch.tensor([2.0, 4.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1).contiguous()
    logits_u = _log([[0.05, 0.95], [0.5, 0.5]])  # first unlabelled image joins as class 1
    seen = set()
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        x_out, y_out, _, _ = algo.mix_batch(
            x_l, torch.tensor([0]), x_u, x_u, logits_u, gen, torch.tensor([0, 1])
        )
        value, target = x_out[1, 0, 0, 0].item(), y_out[1].tolist()
        assert sum(target) == pytest.approx(1.0, abs=1e-6)
        # solve alpha for each (pool, partner) pair and keep the one consistent with the target
        for pool_value, pool_y in ((1.0, [1.0, 0.0]), (2.0, [0.0, 1.0])):
            for partner_value, partner_p in ((2.0, [0.05, 0.95]), (4.0, [0.5, 0.5])):
                if pool_value == partner_value:
                    continue
                alpha = (value - partner_value) / (pool_value - partner_value)
                y = [alpha * a + (1 - alpha) * b for a, b in zip(pool_y, partner_p, strict=True)]
                if 0 <= alpha <= 1 and np.allclose(y, target, atol=1e-5):
                    seen.add(pool_value)
    assert seen == {1.0, 2.0}


def test_supervised_loss_on_the_mixed_layout() -> None:
    algo = _siabc(mix_weight=0.5, num_classes=2)
    logits = torch.zeros(4, 2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
    # every row has CE log 2 on uniform logits: log 2 + 0.5 log 2
    assert algo.supervised_loss(logits, targets).item() == pytest.approx(1.5 * math.log(2))
    assert algo.supervised_loss(logits[:2], torch.tensor([0, 1])).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="layout"):
        algo.supervised_loss(logits[:3], targets[:3])


def test_mix_batch_requires_weak_logits_and_indices() -> None:
    algo = _siabc()
    x = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match="logits_u_w"):
        algo.mix_batch(x, torch.tensor([0, 1]), x, x, None, None)
    with pytest.raises(ValueError, match="idx_u"):
        algo.mix_batch(x, torch.tensor([0, 1]), x, x, torch.zeros(2, 3), None, torch.tensor([0]))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("generator_on_device", [False, True])
def test_mix_batch_runs_on_the_images_device_with_any_generator(
    device: str, generator_on_device: bool
) -> None:
    algo = _siabc(sab_history=4.0)
    _feed(algo, 0, [2.0, 2.2, 0.1])
    gen = torch.Generator(device=device if generator_on_device else "cpu").manual_seed(0)
    x_l = torch.randn(2, 3, 4, 4, device=device)
    x_u = torch.randn(3, 3, 4, 4, device=device)
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=device)
    idx = torch.tensor([0, 1, 2], device=device)
    x_out, y_out, _, x_s = algo.mix_batch(
        x_l, torch.tensor([0, 2], device=device), x_u, x_u, logits, gen, idx
    )
    assert x_out.device.type == device and y_out.device.type == device and x_s.device.type == device
    assert x_out.shape == (4, 3, 4, 4) and y_out.shape == (4, 3)
    assert not torch.equal(x_s[0], x_u[0]) and torch.equal(x_s[1:], x_u[1:])
    assert torch.allclose(y_out.sum(dim=1), torch.ones(4, device=device))


def test_super_augmentation_draws_one_mask_per_image() -> None:
    x = torch.full((4, 3, 16, 16), 3.0)
    out = super_augment(x, 0.5, 0.0, torch.Generator().manual_seed(0))
    zeroed = out[:, 0] == 0.0  # [B, H, W]
    assert all(torch.equal(out[:, c] == 0.0, zeroed) for c in range(3))
    # independent per image: no two images share their mask (each has 256 pixels dropped at 0.5)
    assert all(not torch.equal(zeroed[i], zeroed[j]) for i in range(4) for j in range(i + 1, 4))


def test_otsu_split_between_the_last_two_values_takes_their_midpoint() -> None:
    # the best cut leaves only the largest value above it: the upper neighbour is the row's last entry
    threshold, separable = otsu_split(
        torch.tensor([[0.0, 0.0, 0.0, 10.0]]), torch.ones(1, 4, dtype=torch.bool)
    )
    assert threshold.tolist() == [5.0] and separable.tolist() == [True]


def test_otsu_split_of_a_single_entry_is_not_separable() -> None:
    threshold, separable = otsu_split(torch.tensor([[3.0]]), torch.ones(1, 1, dtype=torch.bool))
    assert threshold.tolist() == [3.0] and separable.tolist() == [False]


def test_cross_set_mix_without_a_generator_draws_from_the_global_rng() -> None:
    x_pool, y_pool = torch.randn(3, 3, 2, 2), torch.eye(3)
    x_u, probs_u = torch.randn(2, 3, 2, 2), torch.full((2, 3), 1 / 3)
    torch.manual_seed(5)
    first = cross_set_mix(x_pool, y_pool, x_u, probs_u, 4, None)
    torch.manual_seed(5)
    second = cross_set_mix(x_pool, y_pool, x_u, probs_u, 4, None)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0].shape == (4, 3, 2, 2) and first[1].shape == (4, 3)


def test_loss_is_lambda_u_consistency_plus_lambda_f_fairness() -> None:
    algo = build_algorithm("siabc", 3, 10, SSLConfig(lambda_u=2.0, params={"lambda_f": 0.3}))
    logits_w = _log([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    logits_s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.2, 0.0, 0.1]])
    out = algo.unlabelled_loss(logits_w, logits_s, torch.arange(3), 0, 4)
    assert out.logs["fairness_loss"] != 0.0
    expected = 2.0 * out.logs["unsup_loss"] + 0.3 * out.logs["fairness_loss"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_running_estimates_start_uniform() -> None:
    algo = _siabc(num_classes=4)
    assert algo.tau.item() == pytest.approx(0.25)
    assert algo.p_tilde.tolist() == [0.25] * 4 and algo.label_hist.tolist() == [0.25] * 4


def test_cross_set_mix_draws_only_from_its_generator() -> None:
    x_pool, y_pool = torch.randn(3, 3, 2, 2), torch.eye(3)
    x_u, probs_u = torch.randn(2, 3, 2, 2), torch.full((2, 3), 1 / 3)
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global RNG differs, the generator does not
        outs.append(cross_set_mix(x_pool, y_pool, x_u, probs_u, 4, torch.Generator().manual_seed(9)))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_an_unlabelled_view_at_exactly_the_list_threshold_does_not_join_the_pool() -> None:
    x_l = torch.ones(4, 3, 2, 2)  # labelled images all ones, unlabelled all zeros: a mixture is all
    x_u = torch.zeros(1, 3, 2, 2)  # zeros exactly when its pool image is the unlabelled one
    logits_u = torch.log(torch.tensor([[0.75, 0.25]]))
    confidence = float(torch.softmax(logits_u / 1.0, dim=-1).max())  # as mix_batch computes it (T = 1)

    def pool_took_the_unlabelled_view(list_threshold: float) -> bool:
        algo = _siabc(sab=0.0, num_classes=2, list_threshold=list_threshold, T=1.0)
        gen = torch.Generator().manual_seed(0)
        x_out, _, _, _ = algo.mix_batch(
            x_l, torch.zeros(4, dtype=torch.long), x_u, x_u, logits_u, gen, torch.tensor([0])
        )
        return bool((x_out[4:].flatten(1) == 0).all(dim=1).any())

    assert pool_took_the_unlabelled_view(confidence - 1e-3)  # above the threshold: drawn with this seed
    assert not pool_took_the_unlabelled_view(confidence)  # equal to it: not confident
