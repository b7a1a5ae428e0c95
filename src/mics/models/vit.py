"""ViT encoder built from timm blocks, with MAE's patchify / random masking and a CLS feature.

One class serves the three places an encoder is needed: masked encoding for reconstructive learning
(``forward_masked``), full encoding for consistency / aligned learning and fusion (``forward``), and the CLS
feature for the Shift Vector Dictionary (``cls_feature``).
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["ViTEncoder", "init_mae_weights", "sincos_pos_embed_2d"]


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos code of scalar positions: positions [M] -> [M, dim] (first half sin, second half cos)."""
    freqs = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """MAE's fixed 2D sin-cos position embedding: -> [grid*grid + int(cls_token), dim] (float32).

    Tokens are in row-major order (row r, column c is token r*grid + c). As in MAE, the first ``dim/2``
    channels encode the column and the last ``dim/2`` the row, so weights trained with MAE's table line up.
    The CLS row, when present, is zero and comes first.
    """
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    if grid <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    rows = torch.arange(grid).repeat_interleave(grid)  # [grid*grid]: r for token r*grid + c
    cols = torch.arange(grid).repeat(grid)  # [grid*grid]: c for token r*grid + c
    table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation, applied per sub-module: xavier-uniform Linear (zero bias), unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_patch_geometry(img_size: int, patch_size: int) -> int:
    if img_size <= 0 or patch_size <= 0:
        raise ValueError(f"img_size and patch_size must be positive, got {img_size} and {patch_size}")
    if img_size % patch_size != 0:
        raise ValueError(
            f"img_size {img_size} is not divisible by patch_size {patch_size}; choose an image size that is "
            f"a multiple of the patch size (e.g. {img_size - img_size % patch_size or patch_size})"
        )
    return img_size // patch_size


class ViTEncoder(nn.Module):
    """ViT with a CLS token, learned position embeddings initialised from 2D sin-cos, timm blocks, final norm.

    Attributes: ``num_patches`` L = grid*grid, ``patch_size`` p, ``width`` D, ``grid`` = img_size / p.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.grid = _check_patch_geometry(img_size, patch_size)
        if width % heads != 0:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.width = width
        self.num_patches = self.grid * self.grid

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width))
        # Stochastic depth grows linearly with depth, as in timm / MAE fine-tuning.
        rates = torch.linspace(0.0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=nn.LayerNorm)
            for r in rates
        )
        self.norm = nn.LayerNorm(width)
        self._init_weights()

    def _init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.width, self.grid, cls_token=True)[None])
        self.apply(init_mae_weights)
        # MAE treats the patch projection as a Linear layer over flattened patches.
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def patchify(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, L, p*p*3], each patch flattened as (row, column, channel) like MAE."""
        b, c, h, w = imgs.shape
        if c != 3 or h != self.img_size or w != self.img_size:
            raise ValueError(
                f"expected images [B, 3, {self.img_size}, {self.img_size}], got {list(imgs.shape)}"
            )
        p, g = self.patch_size, self.grid
        x = imgs.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, 3]
        return x.reshape(b, g * g, p * p * 3)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, p*p*3] -> [B, 3, H, W]; the inverse of :meth:`patchify`."""
        p, g = self.patch_size, self.grid
        if x.dim() != 3 or x.shape[1] != self.num_patches or x.shape[2] != p * p * 3:
            raise ValueError(f"expected patches [B, {self.num_patches}, {p * p * 3}], got {list(x.shape)}")
        b = x.shape[0]
        imgs = x.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # [B, 3, gh, p, gw, p]
        return imgs.reshape(b, 3, g * p, g * p)

    def random_masking(
        self, x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """MAE's per-sample argsort masking.

        x [B, L, D] -> x_kept [B, L_keep, D] with L_keep = int(L * (1 - mask_ratio)),
        mask [B, L] (1 = removed, in the original patch order, same dtype as x),
        ids_restore [B, L] (long; gathering ``cat(x_kept, fillers)`` with it puts every token back at its
        original position).
        """
        b, length, dim = x.shape
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(length * (1 - mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {length}")
        # The noise is drawn where the generator lives so a CPU generator also works for CUDA inputs.
        noise_device = generator.device if generator is not None else x.device
        noise = torch.rand(b, length, generator=generator, device=noise_device).to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, dim))
        mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def _embed_patches(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> patch tokens with position embeddings [B, L, D] (no CLS)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _encode(self, patches: Tensor) -> Tensor:
        """Prepend CLS, run the blocks and the final norm: [B, N, D] -> [B, 1+N, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> all tokens after the final norm [B, 1+L, D]; the CLS token is ``[:, 0]``."""
        return self._encode(self._embed_patches(imgs))

    def forward_masked(
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode only the visible patches.

        imgs [B, 3, H, W] -> tokens [B, 1+L_keep, D], mask [B, L] (1 = removed), ids_restore [B, L].
        """
        x_kept, mask, ids_restore = self.random_masking(self._embed_patches(imgs), mask_ratio, generator)
        return self._encode(x_kept), mask, ids_restore

    def cls_feature(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> CLS feature [B, D]."""
        return self.forward(imgs)[:, 0]

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, grid={self.grid}, width={self.width}"
