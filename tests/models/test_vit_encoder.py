"""ViTEncoder: geometry, MAE patchify order, argsort masking, masked encoding, sin-cos table, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mics.models.vit import ViTEncoder, sincos_pos_embed_2d


def _encoder(
    img: int = 32, patch: int = 8, width: int = 32, depth: int = 2, heads: int = 2, **kw
) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(img, patch, width, depth, heads, **kw).eval()


def _mae_sincos_numpy(dim: int, grid: int, cls_token: bool) -> np.ndarray:
    """MAE's util/pos_embed.py recipe, written with numpy meshgrid (an independent reference)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize(("dim", "grid", "cls"), [(32, 4, True), (16, 5, False), (64, 3, True), (8, 1, True)])
def test_sincos_matches_numpy_reference(dim: int, grid: int, cls: bool) -> None:
    ours = sincos_pos_embed_2d(dim, grid, cls_token=cls)
    ref = _mae_sincos_numpy(dim, grid, cls)
    assert ours.shape == (grid * grid + int(cls), dim)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_sincos_rejects_width_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


@pytest.mark.parametrize(
    ("img", "patch", "width", "heads"), [(32, 8, 32, 2), (64, 16, 48, 3), (48, 16, 32, 4), (40, 8, 16, 2)]
)
def test_output_shapes(img: int, patch: int, width: int, heads: int) -> None:
    enc = _encoder(img, patch, width, 1, heads)
    grid = img // patch
    assert (enc.grid, enc.num_patches, enc.patch_size, enc.width) == (grid, grid * grid, patch, width)
    x = torch.randn(3, 3, img, img)
    assert enc(x).shape == (3, 1 + grid * grid, width)
    assert enc.cls_feature(x).shape == (3, width)
    tokens, mask, ids = enc.forward_masked(x, 0.75)
    keep = int(grid * grid * 0.25)
    assert tokens.shape == (3, 1 + keep, width)
    assert mask.shape == ids.shape == (3, grid * grid)
    assert enc.patchify(x).shape == (3, grid * grid, patch * patch * 3)


def test_cls_feature_is_first_token() -> None:
    enc = _encoder()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.cls_feature(x), enc(x)[:, 0])


@pytest.mark.parametrize(("img", "patch"), [(30, 8), (64, 12)])
def test_indivisible_image_size_is_a_value_error(img: int, patch: int) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ViTEncoder(img, patch, 32, 1, 2)


def test_width_not_divisible_by_heads_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="heads"):
        ViTEncoder(32, 8, 30, 1, 4)


def test_patchify_matches_naive_loop_and_round_trips() -> None:
    enc = _encoder(img=24, patch=8)
    imgs = torch.randn(2, 3, 24, 24)
    got = enc.patchify(imgs)
    p, g = 8, 3
    ref = torch.empty(2, g * g, p * p * 3)
    for b in range(2):
        for r in range(g):
            for c in range(g):
                for i in range(p):
                    for j in range(p):
                        for ch in range(3):
                            ref[b, r * g + c, (i * p + j) * 3 + ch] = imgs[b, ch, r * p + i, c * p + j]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(enc.unpatchify(got), imgs, rtol=0, atol=0)


def test_patchify_rejects_wrong_image_size() -> None:
    enc = _encoder()
    with pytest.raises(ValueError, match="expected images"):
        enc.patchify(torch.randn(1, 3, 24, 24))


@pytest.mark.parametrize(("length", "ratio"), [(16, 0.75), (25, 0.75), (9, 0.5), (16, 0.0), (49, 0.9)])
def test_random_masking_keeps_int_of_visible_fraction(length: int, ratio: float) -> None:
    enc = _encoder()
    x = torch.randn(3, length, 8)
    kept, mask, ids = enc.random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (3, keep, 8)
    assert mask.shape == ids.shape == (3, length)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))
    assert ids.dtype == torch.long


def test_mask_and_ids_restore_are_consistent_naive_loop() -> None:
    enc = _encoder()
    b, length, d = 4, 25, 6
    x = torch.randn(b, length, d)
    kept, mask, ids = enc.random_masking(x, 0.6, generator=torch.Generator().manual_seed(3))
    keep = kept.shape[1]
    for i in range(b):
        assert sorted(ids[i].tolist()) == list(range(length))  # a permutation
        seen = 0
        for j in range(length):
            slot = int(ids[i, j])
            if slot < keep:
                # Unshuffling puts kept token `slot` back at original position j.
                assert mask[i, j] == 0
                assert torch.equal(kept[i, slot], x[i, j])
                seen += 1
            else:
                assert mask[i, j] == 1
        assert seen == keep


def test_random_masking_is_reproducible_with_a_generator() -> None:
    enc = _encoder()
    x = torch.randn(2, 16, 4)
    _, m1, i1 = enc.random_masking(x, 0.75, generator=torch.Generator().manual_seed(7))
    _, m2, i2 = enc.random_masking(x, 0.75, generator=torch.Generator().manual_seed(7))
    _, m3, _ = enc.random_masking(x, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and torch.equal(i1, i2)
    assert not torch.equal(m1, m3)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.99])
def test_random_masking_rejects_bad_ratios(ratio: float) -> None:
    enc = _encoder()
    with pytest.raises(ValueError, match="mask_ratio"):
        enc.random_masking(torch.randn(1, 16, 4), ratio)


def test_masked_forward_sees_only_visible_patches() -> None:
    enc = _encoder(depth=2)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, mask, _ = enc.forward_masked(imgs, 0.75, generator=torch.Generator().manual_seed(1))
        masked_idx = int(torch.nonzero(mask[0] == 1)[0])
        visible_idx = int(torch.nonzero(mask[0] == 0)[0])

        def edit(idx: int) -> torch.Tensor:
            patches = enc.patchify(imgs).clone()
            patches[0, idx] += 5.0
            return enc.unpatchify(patches)

        out_masked_edit, mask2, _ = enc.forward_masked(
            edit(masked_idx), 0.75, torch.Generator().manual_seed(1)
        )
        out_visible_edit, _, _ = enc.forward_masked(edit(visible_idx), 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(out_masked_edit, out, rtol=0, atol=0)
    assert not torch.allclose(out_visible_edit[0], out[0])
    torch.testing.assert_close(out_visible_edit[1], out[1])


def test_position_embedding_is_learned_and_starts_at_sincos() -> None:
    enc = _encoder(width=32)
    assert enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0], sincos_pos_embed_2d(32, 4))


def _assert_all_grads(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_reaches_every_parameter(masked: bool) -> None:
    enc = _encoder(depth=2).train()
    x = torch.randn(2, 3, 32, 32)
    out = enc.forward_masked(x, 0.5)[0] if masked else enc(x)
    out.square().mean().backward()
    _assert_all_grads(enc)


def test_drop_path_is_stochastic_in_training_only() -> None:
    enc = _encoder(depth=3, drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    b = enc(x)
    assert not torch.allclose(a, b)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))


def test_bf16_autocast_forward_is_finite() -> None:
    enc = _encoder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, mask, _ = enc.forward_masked(torch.randn(2, 3, 32, 32), 0.75)
    assert torch.isfinite(tokens.float()).all()
    assert mask.sum() == 2 * 12
