"""Multimodal fusion encoder f_M (Stage 3): WLI tokens attend to NBI tokens, in ALBEF's fusion-layer style."""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from mics.models.vit import init_mae_weights

__all__ = ["CrossAttention", "CrossAttentionBlock", "FusionEncoder"]


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over a context sequence (keys and values from the context)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, N, D], context [B, M, D] -> [B, N, D]."""
        b, n, d = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, d_h]
        kv = self.kv(context).reshape(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each [B, h, M, d_h]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x); x += CrossAttn(LN x, LN context); x += MLP(LN x).

    The order (self-attention, then cross-attention, then MLP) is that of ALBEF's fusion layers; the norms
    are placed before each sub-layer, as in the ViT encoders, rather than after (BERT).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, N, D], context [B, M, D] -> [B, N, D]."""
        x = x + self.drop_path(self.self_attn(self.norm1(x)))
        x = x + self.drop_path(self.cross_attn(self.norm2(x), self.norm_context(context)))
        return x + self.drop_path(self.mlp(self.norm3(x)))


class FusionEncoder(nn.Module):
    """Stack of cross-attention blocks; the fused feature z^f is ``forward(a, b)[:, 0]`` (width D)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"fusion width {width} must be divisible by the number of heads {heads}")
        if depth < 1:
            raise ValueError(f"fusion depth must be at least 1, got {depth}")
        self.width = width
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(init_mae_weights)

    def forward(self, tokens_a: Tensor, tokens_b: Tensor) -> Tensor:
        """tokens_a [B, 1+La, D] (queries, WLI), tokens_b [B, 1+Lb, D] (context, NBI) -> [B, 1+La, D]."""
        if tokens_a.dim() != 3 or tokens_b.dim() != 3:
            raise ValueError(
                f"expected token tensors [B, N, D], got {list(tokens_a.shape)}, {list(tokens_b.shape)}"
            )
        if tokens_a.shape[0] != tokens_b.shape[0]:
            raise ValueError(f"batch sizes differ: {tokens_a.shape[0]} vs {tokens_b.shape[0]}")
        if tokens_a.shape[-1] != self.width or tokens_b.shape[-1] != self.width:
            raise ValueError(
                f"fusion width is {self.width}; token widths are {tokens_a.shape[-1]}, {tokens_b.shape[-1]}"
            )
        x = tokens_a
        for block in self.blocks:
            x = block(x, tokens_b)
        return self.norm(x)
