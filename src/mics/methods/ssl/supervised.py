"""The supervised-only baseline: labelled cross-entropy, the unlabelled batch contributes nothing."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mics.methods.ssl.base import Classifier, SSLAlgorithm, UnlabelledOutput, zero_loss


class Supervised(SSLAlgorithm):
    """Labelled CE only. ``unlabelled_loss`` returns a zero that is still attached to ``logits_s``, an
    all-zero mask and the weak-view argmax as pseudo-labels (for logging pseudo-label accuracy)."""

    name: ClassVar[str] = "supervised"

    def unlabelled_loss(
        self,
        logits_w: Tensor,
        logits_s: Tensor,
        idx: Tensor,
        step: int,
        total_steps: int,
        feats_w: Tensor | None = None,
        feats_s: Tensor | None = None,
        classifier: Classifier | None = None,
    ) -> UnlabelledOutput:
        self._check_logits(logits_w, logits_s, idx)
        mask = torch.zeros(logits_w.shape[0], device=logits_w.device)
        return UnlabelledOutput(
            loss=zero_loss(logits_s),
            mask=mask,
            pseudo_labels=logits_w.detach().argmax(dim=-1),
            logs={"mask_rate": 0.0},
        )
