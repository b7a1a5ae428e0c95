"""Optional pre-trained initialisation of the ViT encoders (``model.init``), the same for every method.

ALBEF, on which MICS builds, starts its ViT-B/16 from DeiT ImageNet weights. ``model.init`` names a
timm-format ViT checkpoint: a local ``.safetensors`` file (any timm ``vision_transformer`` state dict:
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``), or ``timm:<model name>`` to let
timm fetch the weights (needs internet; the development machines and CI have none, so tests use a file they
write). Keys of the classifier head (``head.*``, ``fc_norm.*``) are ignored; position embeddings of another
grid are resampled; every other encoder weight must be present with the encoder's shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mics.config import ConfigError
from mics.models.vit import ViTEncoder

__all__ = ["InitError", "init_encoders", "load_init_state", "load_into_encoder"]

_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.")


class InitError(ConfigError):
    """A ``model.init`` checkpoint that cannot initialise the encoders."""


def load_init_state(spec: str) -> dict[str, Tensor]:
    """The state dict named by ``spec``: a ``.safetensors`` path or ``timm:<name>``."""
    if spec.startswith("timm:"):
        name = spec.removeprefix("timm:")
        try:
            import timm

            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # noqa: BLE001 (network, unknown name, missing weights: one message)
            raise InitError(
                f"model.init={spec!r}: timm could not load pre-trained weights for {name!r} ({err}); "
                "without internet, save the weights as .safetensors elsewhere and give model.init=<file>"
            ) from None
        return {k: v.detach() for k, v in model.state_dict().items()}
    path = Path(spec)
    if not path.is_file():
        raise InitError(
            f"model.init={spec!r}: no such file; give a .safetensors ViT checkpoint or timm:<name>"
        )
    if path.suffix != ".safetensors":
        # pickled checkpoints can run code when loaded: only safetensors are read
        raise InitError(f"model.init={spec!r}: only .safetensors checkpoints are read (convert it first)")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types per version)
        raise InitError(f"model.init={spec!r}: not a readable safetensors file ({err})") from None


def _resample_pos_embed(pos: Tensor, target: Tensor) -> Tensor:
    """Interpolate [1, 1 + g*g, D] position embeddings to the target grid (the CLS entry is kept)."""
    from timm.layers import resample_abs_pos_embed

    grid = int(round((target.shape[1] - 1) ** 0.5))
    return resample_abs_pos_embed(pos, new_size=[grid, grid], num_prefix_tokens=1)


def load_into_encoder(encoder: ViTEncoder, state: dict[str, Tensor], source: str = "model.init") -> None:
    """Copy a timm-format ViT ``state`` into ``encoder``; raises :class:`InitError` on missing keys or
    shapes that do not fit."""
    own = encoder.state_dict()
    new: dict[str, Tensor] = {}
    missing, mismatched = [], []
    for key, current in own.items():
        if key not in state:
            missing.append(key)
            continue
        value = state[key]
        if key == "pos_embed" and value.shape != current.shape and value.shape[-1] == current.shape[-1]:
            value = _resample_pos_embed(value.float(), current)
        if value.shape != current.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs encoder {tuple(current.shape)}")
            continue
        new[key] = value.to(current.dtype)
    if missing or mismatched:
        detail = "; ".join(mismatched[:4] + [f"missing {k}" for k in missing[:4]])
        raise InitError(
            f"{source} does not fit the encoder (width {encoder.width}, patch {encoder.patch_size}, "
            f"{len(encoder.blocks)} blocks): {detail}; choose a checkpoint of the same architecture "
            "or set model.* to match it"
        )
    encoder.load_state_dict(new)


def init_encoders(model: nn.Module, spec: str) -> int:
    """Initialise every :class:`ViTEncoder` inside ``model`` (momentum copies included, so they start equal
    to their online encoders) from ``spec``; a no-op for ``spec == ""``. Returns the number of encoders."""
    if not spec:
        return 0
    state = {k: v for k, v in load_init_state(spec).items() if not k.startswith(_IGNORED_PREFIXES)}
    encoders = [m for m in model.modules() if isinstance(m, ViTEncoder)]
    with torch.no_grad():
        for encoder in encoders:
            load_into_encoder(encoder, state, source=f"model.init={spec!r}")
    return len(encoders)
