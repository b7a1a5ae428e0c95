from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.config import SVDConfig
from mics.methods.svd import ShiftDictionary, build_dictionary, shrunk_covariance


def _blobs(n=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0] * d, [-5.0] * d])
    scales = torch.tensor([0.5, 2.0])
    labels = torch.arange(n) % 2
    x = centres[labels] + scales[labels, None] * torch.randn(n, d, generator=g)
    return x, labels


def test_shrunk_covariance_matches_numpy_and_is_positive_definite():
    x = torch.randn(5, 8, dtype=torch.float64)  # fewer samples than dimensions
    cov = shrunk_covariance(x, 0.1)
    ref = np.cov(x.numpy(), rowvar=False)
    ref = ref + 0.1 * np.trace(ref) / 8 * np.eye(8)
    assert np.allclose(cov.numpy(), ref)
    assert torch.linalg.eigvalsh(cov).min() > 0


def test_zero_mean_shifts_have_the_cluster_covariance():
    x, _ = _blobs(n=2000, d=4)
    d = build_dictionary(x, 2, SVDConfig(shifts_per_cluster=4000, shrinkage=1e-6), seed=0)
    order = d.prototypes[:, 0].argsort()  # cluster of the +5 blob first after sorting descending below
    protos, shifts = d.prototypes[order.flip(0)], d.shifts[order.flip(0)]
    assert torch.allclose(protos[0], torch.full((4,), 5.0), atol=0.1)
    assert torch.allclose(shifts.mean(dim=1), torch.zeros(2, 4), atol=0.1)
    # per-cluster standard deviation of the shifts = the blob's scale (0.5 and 2.0)
    assert torch.allclose(shifts[0].std(dim=0), torch.full((4,), 0.5), rtol=0.08)
    assert torch.allclose(shifts[1].std(dim=0), torch.full((4,), 2.0), rtol=0.08)


def test_paper_shifts_are_centred_on_the_prototype():
    x, _ = _blobs(n=600, d=3)
    d = build_dictionary(x, 2, SVDConfig(shifts_per_cluster=3000, shift_mean="paper"), seed=1)
    assert torch.allclose(d.shifts.mean(dim=1), d.prototypes, atol=0.15)


def test_nearest_and_random_prototype_choice():
    d = ShiftDictionary(
        prototypes=torch.tensor([[0.0, 0.0], [10.0, 10.0]]),
        shifts=torch.stack([torch.zeros(3, 2), torch.ones(3, 2)]),
    )
    feats = torch.tensor([[1.0, 1.0], [9.0, 9.0]])
    assert torch.equal(d.sample(feats, "nearest"), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    picks = d.choose_clusters(torch.zeros(400, 2), "random", torch.Generator().manual_seed(0))
    assert 150 < int(picks.sum()) < 250
    with pytest.raises(ValueError, match="prototype rule"):
        d.sample(feats, "farthest")


def test_too_few_features_for_the_clusters():
    with pytest.raises(ValueError, match="at least 3"):
        build_dictionary(torch.randn(2, 4), 3, SVDConfig(), seed=0)


def test_prototypes_are_the_member_means_of_the_seeded_ten_start_kmeans():
    """The partition is scikit-learn's k-means with 10 starts and ``seed mod 2**31`` as its random state:
    on features without clear clusters each of those choices gives another partition (checked below), so
    the dictionary of a recorded run depends on them."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(2).standard_normal((40, 8))
    d = build_dictionary(torch.from_numpy(x).float(), 5, SVDConfig(shifts_per_cluster=2), seed=2**31 + 5)
    reference = KMeans(n_clusters=5, n_init=10, random_state=5).fit(x).labels_
    want = np.stack([x[reference == j].mean(axis=0) for j in range(5)])
    torch.testing.assert_close(d.prototypes, torch.from_numpy(want).float(), rtol=1e-5, atol=1e-6)
    others = [{"n_init": 1}, {"n_init": 11}, {"random_state": 6}, {"random_state": 2**31 + 5}]
    for other in others:
        labels = KMeans(n_clusters=5, **{"n_init": 10, "random_state": 5, **other}).fit(x).labels_  # type: ignore[arg-type]
        assert not np.array_equal(labels, reference), other
