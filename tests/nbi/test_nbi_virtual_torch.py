"""The torch twin of the virtual NBI transform (traced into exported graphs) against the NumPy original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import GI

from mics.data.cache import square_resize
from mics.data.validate import load_rgb
from mics.nbi.virtual import VirtualNBI
from mics.nbi.virtual_torch import virtual_nbi_torch


@pytest.mark.parametrize("size", [32, 64])
def test_matches_numpy_on_the_sample_images_up_to_single_rounding_steps(size):
    paths = sorted(GI.glob("*/*.jpg"))[::4]
    x = np.stack([square_resize(load_rgb(p, draft_size=size), size) for p in paths])
    diff = np.abs(VirtualNBI()(x).astype(int) - virtual_nbi_torch(torch.from_numpy(x)).numpy().astype(int))
    # float32 rounding in pow/log/matmul may move a pixel across a .5 boundary: one step, rarely
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_each_image_is_processed_on_its_own():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    together = virtual_nbi_torch(torch.from_numpy(x))
    alone = torch.cat([virtual_nbi_torch(torch.from_numpy(x[i : i + 1])) for i in range(3)])
    assert torch.equal(together, alone)


def test_dark_frames_and_little_tissue_follow_the_numpy_fallbacks():
    x = np.zeros((3, 24, 24, 3), np.uint8)
    x[1, :2, :2] = 200  # under 1 % tissue: every pixel counts
    x[2, 4:20, 4:20] = (190, 90, 80)
    got = virtual_nbi_torch(torch.from_numpy(x)).numpy()
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert np.abs(VirtualNBI()(x).astype(int) - got.astype(int)).max() <= 1
