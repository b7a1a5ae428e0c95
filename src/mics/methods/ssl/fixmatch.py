"""FixMatch (Sohn et al., NeurIPS 2020): a fixed confidence threshold on the weak view.

Reference: USB ``semilearn/algorithms/fixmatch`` with its ``FixedThresholdingHook``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mics.methods.ssl.base import (
    Classifier,
    SSLAlgorithm,
    UnlabelledOutput,
    hard_labels,
    masked_consistency_loss,
    pseudo_targets,
)


def fixed_threshold_mask(probs_w: Tensor, tau: float) -> Tensor:
    """FixMatch's mask: 1 where the weak-view confidence max_c p reaches tau. probs_w: [B, C] -> [B] float."""
    return (probs_w.max(dim=-1).values >= tau).float()


class FixMatch(SSLAlgorithm):
    """L_u = lambda_u * mean_b 1[max p_b >= tau] * CE(logits_s_b, argmax p_b), p = softmax(logits_w).

    tau is ``cfg.threshold`` (0.95). ``hard_label`` = 0 trains on softmax(logits_w / T) instead, T =
    ``cfg.temperature``; the mask still uses the unsharpened confidence.
    """

    name: ClassVar[str] = "fixmatch"
    DEFAULTS: ClassVar[dict[str, float]] = {"hard_label": 1.0}

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
        logits_w = logits_w.detach().float()
        probs = torch.softmax(logits_w, dim=-1)
        mask = fixed_threshold_mask(probs, self.cfg.threshold)
        targets = pseudo_targets(logits_w, self.flag("hard_label"), self.cfg.temperature)
        consistency = masked_consistency_loss(logits_s.float(), targets, mask)
        return UnlabelledOutput(
            loss=self.lambda_u * consistency,
            mask=mask,
            pseudo_labels=hard_labels(targets),
            logs={
                "mask_rate": float(mask.mean()),
                "threshold": self.cfg.threshold,
                "unsup_loss": float(consistency.detach()),
            },
        )
