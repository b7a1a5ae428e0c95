"""Projection, GlobalEmbedding, Classifier, EvidentialHead."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mics.models.heads import Classifier, EvidentialHead, GlobalEmbedding, Projection


def test_projection_is_unit_norm_and_linear_before_normalising() -> None:
    torch.manual_seed(0)
    head = Projection(32, 8)
    x = torch.randn(5, 32) * 10
    z = head(x)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    raw = x @ head.proj.weight.T + head.proj.bias
    ref = raw / torch.sqrt((raw**2).sum(1, keepdim=True))
    torch.testing.assert_close(z, ref)


@pytest.mark.parametrize("out_dim", [32, 16, 1])
def test_global_embedding_rejects_non_increasing_width(out_dim: int) -> None:
    with pytest.raises(ValueError, match="higher dimension"):
        GlobalEmbedding(32, out_dim)


def test_global_embedding_is_wide_and_unit_norm() -> None:
    torch.manual_seed(0)
    gloe = GlobalEmbedding(16, 64)
    z = gloe(torch.randn(4, 16))
    assert z.shape == (4, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_classifier_logits() -> None:
    torch.manual_seed(0)
    cls = Classifier(16, 6)
    x = torch.randn(3, 16)
    logits = cls(x)
    assert logits.shape == (3, 6)
    torch.testing.assert_close(logits, x @ cls.fc.weight.T + cls.fc.bias)
    normed = Classifier(16, 6, norm=True)
    assert isinstance(normed.norm, nn.LayerNorm)
    assert normed(x).shape == (3, 6)


def test_evidential_head_is_nonnegative_softplus() -> None:
    torch.manual_seed(0)
    head = EvidentialHead(8, 4)
    x = torch.randn(6, 8) * 50  # large logits of both signs
    e = head(x)
    assert e.shape == (6, 4)
    assert (e >= 0).all() and torch.isfinite(e).all()
    logits = (x @ head.fc.weight.T + head.fc.bias).double()
    naive = torch.where(logits > 30, logits, torch.log1p(torch.exp(logits)))
    torch.testing.assert_close(e.double(), naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Projection(12, 4),
        lambda: GlobalEmbedding(12, 48),
        lambda: Classifier(12, 3, norm=True),
        lambda: EvidentialHead(12, 3),
    ],
)
def test_gradient_reaches_every_parameter(make) -> None:
    torch.manual_seed(0)
    head = make()
    out = head(torch.randn(4, 12))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name


def test_wrong_input_width_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        Projection(12, 4)(torch.randn(2, 10))


def test_float32_outputs_under_bf16_autocast() -> None:
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = Projection(12, 4)(x)
        e = EvidentialHead(12, 3)(x)
    assert z.dtype == e.dtype == torch.float32
    assert math.isclose(float(z.detach().norm(dim=1).min()), 1.0, rel_tol=1e-5)
