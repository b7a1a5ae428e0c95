"""The distribution the sampled shifts of ``build_dictionary`` actually have, on anisotropic clusters.

Each cluster has its own full (correlated, unequal-variance) covariance Sigma_j, so a shift drawn from the
wrong cluster's covariance, from an isotropic one, with ``shift_scale`` applied once too often or not at
all, or with a wrong mean, moves the empirical moments far outside the sampling error (P = 20000 shifts
per cluster in D = 4: relative error of the covariance about 2 %).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.config import SVDConfig
from mics.methods.svd import build_dictionary

D = 4
P = 20000
CENTRES = np.array([[12.0, 0.0, -6.0, 3.0], [-12.0, 4.0, 6.0, -3.0], [0.0, -14.0, 0.0, 10.0]])
K = len(CENTRES)  # three clusters: with two, "the other cluster's members" would be a mere relabelling


def _clusters(n: int = 1500, seed: int = 0) -> tuple[torch.Tensor, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    factors = [
        np.array([[2.0, 0, 0, 0], [1.5, 0.5, 0, 0], [0, 0.3, 0.2, 0], [-1.0, 0, 0.4, 1.0]]),
        np.array([[0.3, 0, 0, 0], [0, 3.0, 0, 0], [0.2, -2.0, 0.6, 0], [0, 0, 0, 0.1]]),
        np.array([[1.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 2.5, 0], [0.8, 0, -0.7, 0.4]]),
    ]
    members = [CENTRES[j] + rng.standard_normal((n, D)) @ factors[j].T for j in range(K)]
    return torch.from_numpy(np.concatenate(members)), members


def _by_true_cluster(prototypes: torch.Tensor) -> list[int]:
    """Dictionary cluster index of each true cluster (k-means numbers them arbitrarily)."""
    dist = torch.cdist(torch.from_numpy(CENTRES).float(), prototypes.float())
    order = dist.argmin(dim=1).tolist()
    assert sorted(order) == list(range(K)), "k-means did not recover the clusters"
    return order


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("shift_scale", [0.5, 2.5])
@pytest.mark.parametrize("shift_mean", ["zero_mean", "paper"])
def test_sampled_shifts_have_the_scaled_cluster_covariance(shift_scale, shift_mean):
    feats, members = _clusters()
    cfg = SVDConfig(shifts_per_cluster=P, shrinkage=1e-6, shift_scale=shift_scale, shift_mean=shift_mean)
    d = build_dictionary(feats, K, cfg, seed=3)
    assert d.shifts.shape == (K, P, D) and d.prototypes.shape == (K, D)
    for true_j, j in enumerate(_by_true_cluster(d.prototypes)):
        mu = members[true_j].mean(axis=0)
        sigma = np.cov(members[true_j], rowvar=False)
        np.testing.assert_allclose(d.prototypes[j].numpy(), mu, atol=1e-4)
        shifts = d.shifts[j].double().numpy()
        emp_cov = np.cov(shifts, rowvar=False)
        err = _relative_error(emp_cov, shift_scale**2 * sigma)
        assert err < 0.06, f"cluster {true_j}: covariance off by {err:.1%} from shift_scale^2 * Sigma_j"
        # the other clusters' covariances are far off: the check tells the clusters apart
        for other_j in set(range(K)) - {true_j}:
            other = np.cov(members[other_j], rowvar=False)
            assert _relative_error(emp_cov, shift_scale**2 * other) > 0.5
        # mean: 0, or the prototype (the paper's N(mu_j, Sigma_j)), scaled like the spread
        want_mean = np.zeros(D) if shift_mean == "zero_mean" else shift_scale * mu
        stderr = shift_scale * np.sqrt(np.diag(sigma) / P)
        assert np.all(np.abs(shifts.mean(axis=0) - want_mean) < 5 * stderr + 1e-6), (
            shifts.mean(axis=0),
            want_mean,
        )


def test_shrinkage_adds_to_the_covariance_of_the_shifts():
    feats, members = _clusters()
    eps = 0.5
    d = build_dictionary(feats, K, SVDConfig(shifts_per_cluster=P, shrinkage=eps), seed=3)
    for true_j, j in enumerate(_by_true_cluster(d.prototypes)):
        sigma = np.cov(members[true_j], rowvar=False)
        want = sigma + eps * np.trace(sigma) / D * np.eye(D)
        emp_cov = np.cov(d.shifts[j].double().numpy(), rowvar=False)
        assert _relative_error(emp_cov, want) < 0.06
        assert _relative_error(emp_cov, sigma) > 0.15


def test_the_dictionary_is_reproducible_from_its_seed():
    feats, _ = _clusters(n=200)
    cfg = SVDConfig(shifts_per_cluster=16)
    a, b = build_dictionary(feats, K, cfg, seed=5), build_dictionary(feats, K, cfg, seed=5)
    assert torch.equal(a.shifts, b.shifts) and torch.equal(a.prototypes, b.prototypes)
    assert not torch.equal(a.shifts, build_dictionary(feats, K, cfg, seed=6).shifts)


def test_as_many_features_as_clusters_is_enough_and_fewer_is_a_clear_error():
    feats = torch.from_numpy(CENTRES)
    d = build_dictionary(feats, K, SVDConfig(shifts_per_cluster=2), seed=0)
    assert sorted(_by_true_cluster(d.prototypes)) == list(range(K))
    with pytest.raises(ValueError, match=f"need at least {K} features for {K} clusters, got {K - 1}"):
        build_dictionary(feats[: K - 1], K, SVDConfig(), seed=0)


class _ChannelMeans(torch.nn.Module):
    """A stand-in encoder: one token per image, the mean of each input channel; records its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x.flatten(2).mean(-1)[:, None, :]


@pytest.mark.parametrize("training", [True, False])
def test_encode_features_reads_the_selected_images_in_order_in_eval_mode(training):
    from mics.data.views import to_float
    from mics.methods.svd import encode_features

    images = np.random.default_rng(0).integers(0, 256, (9, 3, 8, 8), dtype=np.uint8)
    indices = np.array([7, 2, 5, 0, 8])
    encoder = _ChannelMeans().train(training)
    feats = encode_features(encoder, images, indices, torch.device("cpu"), batch_size=2)
    want = to_float(torch.from_numpy(images[indices])).flatten(2).mean(-1)
    torch.testing.assert_close(feats, want)
    assert encoder.modes == [False, False, False], "features must come from the encoder in eval mode"
    assert encoder.training == training, "the encoder's mode must be restored"


def test_random_prototype_rule_draws_every_cluster_from_the_generator():
    from mics.methods.svd import ShiftDictionary

    # 3 clusters of 5-dimensional features: the cluster count is the prototypes' first axis, not the second
    shifts = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    d = ShiftDictionary(torch.zeros(3, 5), shifts)
    feats = torch.zeros(600, 5)
    picks = d.choose_clusters(feats, "random", torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1, 2}
    same = d.choose_clusters(feats, "random", torch.Generator().manual_seed(0))
    other = d.choose_clusters(feats, "random", torch.Generator().manual_seed(1))
    assert torch.equal(picks, same) and not torch.equal(picks, other)
    drawn = d.sample(feats, "random", torch.Generator().manual_seed(0))
    # the shift takes the feature's dtype (the fused feature may be float64 or bfloat16)
    assert d.sample(feats.double(), "nearest").dtype == torch.float64
    assert torch.equal(drawn, d.sample(feats, "random", torch.Generator().manual_seed(0)))
    # every drawn shift is one of the dictionary's, and all P shifts of a cluster are used
    rows = {tuple(r) for r in drawn.tolist()}
    assert rows <= {tuple(r) for r in shifts.reshape(-1, 5).tolist()} and len(rows) == 12


def test_dictionary_to_device_keeps_prototypes_and_shifts():
    from mics.methods.svd import ShiftDictionary

    d = ShiftDictionary(torch.randn(3, 5), torch.randn(3, 4, 5))
    moved = d.to(torch.device("cpu"))
    assert torch.equal(moved.prototypes, d.prototypes) and torch.equal(moved.shifts, d.shifts)


def test_shrunk_covariance_of_one_two_and_tiny_samples():
    from mics.methods.svd import shrunk_covariance

    # one sample: no spread to estimate, the covariance is the shrinkage times the identity
    one = shrunk_covariance(torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64), 0.25)
    assert one.dtype == torch.float64
    torch.testing.assert_close(one, 0.25 * torch.eye(3, dtype=torch.float64))
    # two samples: already the unbiased estimate
    two = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 1.0]], dtype=torch.float64)
    ref = np.cov(two.numpy(), rowvar=False)
    want = ref + 0.1 * np.trace(ref) / 3 * np.eye(3)
    np.testing.assert_allclose(shrunk_covariance(two, 0.1).numpy(), want)
    # the shrinkage is relative to the mean variance, however small
    tiny = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    ref = np.cov(tiny.numpy(), rowvar=False)
    want = ref + 0.5 * np.trace(ref) / 3 * np.eye(3)
    np.testing.assert_allclose(shrunk_covariance(tiny, 0.5).numpy(), want, rtol=1e-10, atol=0)


def test_unknown_shift_mean_is_a_clear_error():
    feats, _ = _clusters(n=50)
    with pytest.raises(ValueError, match="unknown svd.shift_mean 'centred'; use 'zero_mean' or 'paper'"):
        build_dictionary(feats, K, SVDConfig(shift_mean="centred"), seed=0)  # type: ignore[arg-type]
