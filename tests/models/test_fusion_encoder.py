"""FusionEncoder / CrossAttentionBlock: shapes, dependence on both inputs, attention against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from mics.models.fusion import CrossAttention, CrossAttentionBlock, FusionEncoder


def _fusion(width: int = 32, depth: int = 2, heads: int = 4) -> FusionEncoder:
    torch.manual_seed(0)
    return FusionEncoder(width, depth, heads).eval()


@pytest.mark.parametrize(("la", "lb"), [(17, 17), (5, 9), (1, 1)])
def test_output_shape_follows_tokens_a(la: int, lb: int) -> None:
    fusion = _fusion()
    out = fusion(torch.randn(3, la, 32), torch.randn(3, lb, 32))
    assert out.shape == (3, la, 32)


def test_fused_feature_depends_on_both_inputs() -> None:
    fusion = _fusion()
    a = torch.randn(2, 5, 32, requires_grad=True)
    b = torch.randn(2, 7, 32, requires_grad=True)
    z = fusion(a, b)[:, 0]
    # A random readout: the plain sum of a LayerNorm output is constant (zero), so its gradient would be too.
    (z * torch.randn_like(z)).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert a.grad is not None and a.grad.abs().sum() > 0
    with torch.no_grad():
        z_other_b = fusion(a, torch.randn(2, 7, 32))[:, 0]
    assert not torch.allclose(z, z_other_b)


def test_batch_items_do_not_mix() -> None:
    fusion = _fusion()
    a, b = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    out = fusion(a, b)
    b2 = b.clone()
    b2[1] += torch.randn(6, 32)  # not a constant shift, which the context LayerNorm would cancel
    out2 = fusion(a, b2)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_cross_attention_matches_naive_per_head_loop() -> None:
    torch.manual_seed(1)
    dim, heads = 12, 3
    attn = CrossAttention(dim, heads)
    x, ctx = torch.randn(2, 4, dim), torch.randn(2, 6, dim)
    got = attn(x, ctx)
    hd = dim // heads
    wq, bq = attn.q.weight, attn.q.bias
    wk, wv = attn.kv.weight[:dim], attn.kv.weight[dim:]
    bk, bv = attn.kv.bias[:dim], attn.kv.bias[dim:]
    ref = torch.zeros(2, 4, dim)
    for b in range(2):
        q_all = x[b] @ wq.T + bq
        k_all = ctx[b] @ wk.T + bk
        v_all = ctx[b] @ wv.T + bv
        heads_out = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = q_all[:, sl] @ k_all[:, sl].T / math.sqrt(hd)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            heads_out.append(weights @ v_all[:, sl])
        ref[b] = torch.cat(heads_out, dim=1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_block_context_norm_and_residuals() -> None:
    torch.manual_seed(2)
    block = CrossAttentionBlock(16, 2).eval()
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    h = x + block.self_attn(block.norm1(x))
    h = h + block.cross_attn(block.norm2(h), block.norm_context(ctx))
    h = h + block.mlp(block.norm3(h))
    torch.testing.assert_close(block(x, ctx), h)


def test_gradient_reaches_every_parameter() -> None:
    fusion = _fusion().train()
    out = fusion(torch.randn(2, 5, 32), torch.randn(2, 6, 32))
    out[:, 0].square().sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name


def test_validation() -> None:
    fusion = _fusion()
    with pytest.raises(ValueError, match="width"):
        fusion(torch.randn(2, 5, 32), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="batch"):
        fusion(torch.randn(2, 5, 32), torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="heads"):
        FusionEncoder(30, 1, 4)


def test_bf16_autocast_is_finite() -> None:
    fusion = _fusion()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion(torch.randn(2, 5, 32), torch.randn(2, 6, 32))
    assert torch.isfinite(out.float()).all()
