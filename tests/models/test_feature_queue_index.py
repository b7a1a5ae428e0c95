"""The feature queue's sample-index buffer (consistency learning with same-index positives)."""

from __future__ import annotations

import pytest
import torch

from mics.models.momentum import FeatureQueue


def test_indices_follow_their_features_through_wrap_around() -> None:
    q = FeatureQueue(dim=3, size=4, track_index=True)
    assert q.indices.tolist() == [-1, -1, -1, -1]
    q.enqueue(torch.ones(2, 3), torch.tensor([5, 6]))
    q.enqueue(2 * torch.ones(2, 3), torch.tensor([7, 8]))
    q.enqueue(3 * torch.ones(2, 3), torch.tensor([9, 5]))
    assert q.indices.tolist() == [9, 5, 7, 8]
    assert q.features[:, 0].tolist() == [3.0, 3.0, 2.0, 2.0]


def test_an_index_queue_needs_indices_and_a_plain_one_has_none() -> None:
    with pytest.raises(ValueError, match="tracks sample indices"):
        FeatureQueue(dim=3, size=4, track_index=True).enqueue(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="does not track"):
        _ = FeatureQueue(dim=3, size=4).indices
    assert "index" not in FeatureQueue(dim=3, size=4).state_dict()
