"""Neural network modules: ViT encoders, the shared MAE decoder, the fusion encoder, heads, momentum tools."""

from mics.models.decoder import SharedDecoder
from mics.models.fusion import CrossAttention, CrossAttentionBlock, FusionEncoder
from mics.models.heads import Classifier, EvidentialHead, GlobalEmbedding, Projection
from mics.models.momentum import FeatureQueue, all_gather_nograd, momentum_copy, momentum_update
from mics.models.vit import ViTEncoder, init_mae_weights, sincos_pos_embed_2d

__all__ = [
    "Classifier",
    "CrossAttention",
    "CrossAttentionBlock",
    "EvidentialHead",
    "FeatureQueue",
    "FusionEncoder",
    "GlobalEmbedding",
    "Projection",
    "SharedDecoder",
    "ViTEncoder",
    "all_gather_nograd",
    "init_mae_weights",
    "momentum_copy",
    "momentum_update",
    "sincos_pos_embed_2d",
]
