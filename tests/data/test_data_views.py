"""weak / strong / cutout / to_float: shapes, dtypes, determinism, and agreement with numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.data.views import CUTOUT_FILL, MEAN, STD, cutout, strong, to_float, weak


def _batch(b: int = 6, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _naive_candidates(img: np.ndarray, pad_h: int, pad_w: int) -> list[np.ndarray]:
    """Every flip x crop of the reflect-padded image [3, H, W], built with np.pad (no torch)."""
    _, h, w = img.shape
    padded = np.pad(img, ((0, 0), (pad_h, pad_h), (pad_w, pad_w)), mode="reflect")
    out = []
    for flipped in (padded, padded[:, :, ::-1]):
        for dy in range(2 * pad_h + 1):
            for dx in range(2 * pad_w + 1):
                out.append(flipped[:, dy : dy + h, dx : dx + w])
    return out


def test_to_float_matches_per_channel_loop() -> None:
    x = _batch()
    got = to_float(x)
    ref = np.empty(x.shape, dtype=np.float64)
    arr = x.numpy()
    for c in range(3):
        ref[:, c] = (arr[:, c] / 255.0 - MEAN[c]) / STD[c]
    assert got.dtype == torch.float32 and got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("h, w", [(16, 16), (16, 24), (8, 8)])
def test_weak_is_a_flip_and_reflect_padded_crop(h: int, w: int) -> None:
    x = _batch(8, h, w)
    out = weak(x, _gen(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    pad_h, pad_w = round(0.125 * h), round(0.125 * w)
    for i in range(len(x)):
        candidates = _naive_candidates(x[i].numpy(), pad_h, pad_w)
        assert any(np.array_equal(out[i].numpy(), c) for c in candidates), i


def test_weak_is_deterministic_per_generator_and_varies() -> None:
    x = _batch(32)
    torch.testing.assert_close(weak(x, _gen(5)), weak(x, _gen(5)))
    assert not torch.equal(weak(x, _gen(5)), weak(x, _gen(6)))
    assert weak(x).shape == x.shape  # global RNG path


def test_weak_covers_all_offsets_and_both_flips() -> None:
    # a horizontal ramp: each output row identifies its (flip, horizontal offset) uniquely
    w = 16
    ramp = torch.arange(w, dtype=torch.uint8).view(1, 1, 1, w).expand(400, 3, 16, w).contiguous()
    seen = {tuple(row) for row in weak(ramp, _gen(0))[:, 0, 0].tolist()}
    padded = np.pad(np.arange(w), 2, mode="reflect")
    rows = [padded[d : d + w] for d in range(5)]
    expected = {tuple(r.tolist()) for r in rows} | {tuple(r[::-1].tolist()) for r in rows}
    assert seen == expected


def test_empty_batch_and_bad_input() -> None:
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    assert weak(empty).shape == empty.shape and strong(empty).shape == empty.shape
    with pytest.raises(ValueError, match="uint8"):
        weak(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_float(torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_cutout_matches_naive_loop() -> None:
    x = _batch(5, 12, 20)
    out = cutout(x, _gen(3), fraction=0.5)
    g = _gen(3)
    cy = torch.rand(5, generator=g) * 12
    cx = torch.rand(5, generator=g) * 20
    half = 0.5 * 12 / 2
    for i in range(5):
        for y in range(12):
            for xx in range(20):
                inside = abs(y + 0.5 - cy[i].item()) <= half and abs(xx + 0.5 - cx[i].item()) <= half
                expected = [CUTOUT_FILL] * 3 if inside else x[i, :, y, xx].tolist()
                assert out[i, :, y, xx].tolist() == expected


def test_strong_deterministic_leaves_global_rng_alone_and_cuts_out() -> None:
    x = _batch(6, 32, 32)
    state = torch.get_rng_state()
    a = strong(x, generator=_gen(9))
    assert torch.equal(torch.get_rng_state(), state)
    b = strong(x, generator=_gen(9))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, strong(x, generator=_gen(10)))
    grey = (a == CUTOUT_FILL).all(dim=1).flatten(1).sum(1)
    # the hole is 16x16, at least a quarter of it inside the image
    assert (grey >= 64).all()


def test_strong_without_generator_runs() -> None:
    x = _batch(3, 16, 16)
    out = strong(x, num_ops=1, magnitude=5)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_shared_pair_augmentation_keeps_pairs_aligned() -> None:
    from mics.data.views import weak_pair

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8)
    b = 255 - a  # a different image with the same geometry
    sa, sb = weak_pair(a, b, gen, shared=True)
    assert torch.equal(sb, 255 - sa)  # one flip/crop for both
    ia, ib = weak_pair(a, b, torch.Generator().manual_seed(0), shared=False)
    assert not torch.equal(ib, 255 - ia)  # independent draws misalign some pairs
    # independent mode is exactly two weak() calls in order (the first version's behaviour)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    pa, pb = weak_pair(a, b, g1)
    assert torch.equal(pa, weak(a, g2)) and torch.equal(pb, weak(b, g2))
