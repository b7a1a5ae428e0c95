"""model.init: encoders start from a timm-format ViT checkpoint the test writes itself (no download)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mics.config import preset
from mics.methods.baseline import SSLTraining
from mics.methods.pretrain import SynergisticPretraining
from mics.methods.ssl import build_algorithm
from mics.models.init import InitError, init_encoders

CFG = preset("smoke")
M = CFG.model
SIZE = CFG.data.image_size


def _timm_vit(img_size: int = SIZE, width: int = M.width) -> VisionTransformer:
    torch.manual_seed(123)
    return VisionTransformer(
        img_size=img_size,
        patch_size=M.patch_size,
        embed_dim=width,
        depth=M.depth,
        num_heads=M.heads,
        mlp_ratio=M.mlp_ratio,
        qkv_bias=True,
        num_classes=7,
        norm_layer=nn.LayerNorm,  # our encoder's LayerNorm eps (1e-5; timm's default is 1e-6)
    )


def _save(tmp_path: Path, vit: VisionTransformer) -> str:
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return str(path)


def test_every_encoder_of_pretraining_starts_from_the_file(tmp_path: Path) -> None:
    vit = _timm_vit()
    spec = _save(tmp_path, vit)
    model = SynergisticPretraining(M, CFG.pretrain, SIZE, n_train=32, global_batch=16)
    assert init_encoders(model, spec) == 4  # enc_a, enc_b and their momentum copies
    ref = vit.state_dict()
    for enc in (model.enc_a, model.enc_b, model.enc_a_m, model.enc_b_m):
        for key, value in enc.state_dict().items():
            assert torch.equal(value, ref[key]), key
    x = torch.randn(2, 3, SIZE, SIZE)
    # same weights, same architecture: the CLS feature is timm's pre-logits feature
    torch.testing.assert_close(
        model.enc_a(x)[:, 0], vit.forward_head(vit.forward_features(x), pre_logits=True)
    )


def test_baseline_backbone_and_grid_resampling(tmp_path: Path) -> None:
    spec = _save(tmp_path, _timm_vit(img_size=2 * SIZE))  # another grid: position embeddings resampled
    model = SSLTraining(M, SIZE, 3, build_algorithm("fixmatch", 3, 10, CFG.ssl))
    before = model.head.fc.weight.clone()
    assert init_encoders(model, spec) == 1
    assert model.backbone.pos_embed.shape == (1, 1 + (SIZE // M.patch_size) ** 2, M.width)
    assert torch.equal(model.head.fc.weight, before)  # the checkpoint's head is ignored


def test_unusable_checkpoints_get_a_clear_error(tmp_path: Path) -> None:
    model = SSLTraining(M, SIZE, 3, build_algorithm("fixmatch", 3, 10, CFG.ssl))
    with pytest.raises(InitError, match="does not fit the encoder"):
        init_encoders(model, _save(tmp_path, _timm_vit(width=2 * M.width)))
    with pytest.raises(InitError, match="no such file"):
        init_encoders(model, str(tmp_path / "missing.safetensors"))
    pickled = tmp_path / "vit.pth"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(InitError, match="only .safetensors"):
        init_encoders(model, str(pickled))
    assert init_encoders(model, "") == 0


def test_init_is_a_config_field_for_every_method() -> None:
    cfg = replace(CFG, model=replace(M, init="/some/vit.safetensors"))
    assert cfg.model.init == "/some/vit.safetensors"
