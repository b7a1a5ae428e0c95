"""The MAE decoder g, shared by the WLI and NBI encoders (reconstructive learning, Eq. 5-6)."""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mics.models.vit import init_mae_weights, sincos_pos_embed_2d

__all__ = ["SharedDecoder"]


class SharedDecoder(nn.Module):
    """Lightweight transformer that predicts the pixels of every patch from the visible tokens.

    Its position embeddings are the fixed 2D sin-cos table, held as a non-trainable buffer. The authors'
    code created them as a zero parameter and never filled them, so their decoder had no notion of where a
    mask token sits; this is the fix named in docs/METHOD.md.
    """

    pos_embed: Tensor

    def __init__(
        self,
        num_patches: int,
        patch_size: int,
        encoder_width: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        grid = math.isqrt(num_patches)
        if num_patches <= 0 or grid * grid != num_patches:
            raise ValueError(f"num_patches must be a positive square (grid*grid), got {num_patches}")
        if width % heads != 0:
            raise ValueError(f"decoder width {width} must be divisible by the number of heads {heads}")
        if depth < 1:
            raise ValueError(f"decoder depth must be at least 1, got {depth}")
        self.num_patches = num_patches
        self.patch_size = patch_size
        self.encoder_width = encoder_width
        self.width = width
        self.patch_dim = patch_size * patch_size * 3

        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Not persistent: it is a function of the shape alone, so checkpoints neither need nor override it.
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(width, grid, cls_token=True)[None], persistent=False
        )
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, self.patch_dim)
        self.apply(init_mae_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _unshuffle(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        """Fill the removed positions with the mask token and restore patch order.

        x [B, 1+L_keep, W] (CLS first), ids_restore [B, L] -> [B, 1+L, W].
        """
        b, n, w = x.shape
        fillers = self.mask_token.to(x.dtype).expand(b, self.num_patches + 1 - n, -1)
        patches = torch.cat([x[:, 1:, :], fillers], dim=1)  # [B, L, W] in shuffled order
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, w))
        return torch.cat([x[:, :1, :], patches], dim=1)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """tokens [B, 1+L_keep, D_enc] (``ViTEncoder.forward_masked``), ids_restore [B, L] -> [B, L, p*p*3].

        The CLS position is dropped from the prediction; patches are in :meth:`ViTEncoder.patchify` order.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.encoder_width:
            raise ValueError(f"expected tokens [B, 1+L_keep, {self.encoder_width}], got {list(tokens.shape)}")
        if ids_restore.shape != (tokens.shape[0], self.num_patches):
            raise ValueError(
                f"ids_restore must be [{tokens.shape[0]}, {self.num_patches}], got {list(ids_restore.shape)}"
            )
        if not 2 <= tokens.shape[1] <= self.num_patches + 1:
            raise ValueError(f"tokens hold {tokens.shape[1] - 1} patches; expected 1..{self.num_patches}")
        x = self._unshuffle(self.embed(tokens), ids_restore)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:, :]
