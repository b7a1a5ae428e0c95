"""MICS: multimodal semi-supervised medical image classification via synergistic learning pre-training."""

__version__ = "0.1.0"
