"""SharedDecoder: shapes, fixed sin-cos position buffer, unshuffling by ids_restore, gradients."""

from __future__ import annotations

import pytest
import torch

from mics.models.decoder import SharedDecoder
from mics.models.vit import ViTEncoder, sincos_pos_embed_2d


def _pair(img: int = 32, patch: int = 8) -> tuple[ViTEncoder, SharedDecoder]:
    torch.manual_seed(0)
    enc = ViTEncoder(img, patch, 32, 1, 2).eval()
    dec = SharedDecoder(enc.num_patches, patch, encoder_width=32, width=24, depth=2, heads=2).eval()
    return enc, dec


@pytest.mark.parametrize(
    ("img", "patch", "ratio"), [(32, 8, 0.75), (64, 16, 0.75), (40, 8, 0.5), (48, 16, 0.0)]
)
def test_prediction_shape(img: int, patch: int, ratio: float) -> None:
    enc, dec = _pair(img, patch)
    tokens, mask, ids = enc.forward_masked(torch.randn(2, 3, img, img), ratio)
    pred = dec(tokens, ids)
    assert pred.shape == (2, enc.num_patches, patch * patch * 3)
    assert pred.shape[:2] == mask.shape
    assert enc.unpatchify(pred).shape == (2, 3, img, img)


def test_position_embedding_is_fixed_nonzero_sincos() -> None:
    _, dec = _pair()
    assert all(p is not dec.pos_embed for p in dec.parameters())
    assert "pos_embed" not in dict(dec.named_parameters())
    assert not dec.pos_embed.requires_grad
    assert dec.pos_embed.abs().sum() > 0
    torch.testing.assert_close(dec.pos_embed[0], sincos_pos_embed_2d(24, 4))


def test_mask_tokens_become_position_aware() -> None:
    # With the authors' zero position embedding every mask token would get the same prediction.
    enc, dec = _pair()
    with torch.no_grad():
        tokens, mask, ids = enc.forward_masked(torch.randn(1, 3, 32, 32), 0.75)
        pred = dec(tokens, ids)[0][mask[0] == 1]
    assert pred.shape[0] == 12
    assert (pred[1:] - pred[:1]).abs().amax() > 1e-4


def test_unshuffle_matches_naive_loop() -> None:
    enc, dec = _pair()
    b, length, w = 3, enc.num_patches, dec.width
    seq = torch.randn(b, length, w)
    kept, mask, ids = enc.random_masking(seq, 0.75)
    cls = torch.randn(b, 1, w)
    restored = dec._unshuffle(torch.cat([cls, kept], dim=1), ids)
    assert restored.shape == (b, 1 + length, w)
    for i in range(b):
        assert torch.equal(restored[i, 0], cls[i, 0])
        for j in range(length):
            if mask[i, j] == 0:
                assert torch.equal(restored[i, 1 + j], seq[i, j])
            else:
                assert torch.equal(restored[i, 1 + j], dec.mask_token[0, 0].detach())


def test_shape_validation() -> None:
    enc, dec = _pair()
    tokens, _, ids = enc.forward_masked(torch.randn(2, 3, 32, 32), 0.75)
    with pytest.raises(ValueError, match="ids_restore"):
        dec(tokens, ids[:, :-1])
    with pytest.raises(ValueError, match="tokens"):
        dec(tokens[..., :16], ids)
    with pytest.raises(ValueError, match="square"):
        SharedDecoder(15, 8, 32, 24, 1, 2)


def test_gradient_reaches_every_parameter_and_the_encoder() -> None:
    enc, dec = _pair()
    enc.train()
    dec.train()
    tokens, mask, ids = enc.forward_masked(torch.randn(2, 3, 32, 32), 0.75)
    pred = dec(tokens, ids)
    (pred.square().mean(-1) * mask).sum().backward()
    for module in (dec, enc):
        for name, p in module.named_parameters():
            assert p.grad is not None, f"no gradient reached {name}"
            assert torch.isfinite(p.grad).all(), name


def test_bf16_autocast_is_finite() -> None:
    enc, dec = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, _, ids = enc.forward_masked(torch.randn(2, 3, 32, 32), 0.75)
        pred = dec(tokens, ids)
    assert torch.isfinite(pred.float()).all()
