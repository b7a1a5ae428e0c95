"""FlexMatch (Zhang et al., NeurIPS 2021): curriculum pseudo-labelling with class-wise thresholds.

Reference: USB ``semilearn/algorithms/flexmatch`` (``FlexMatchThresholdingHook``, convex mapping,
``thresh_warmup=True``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mics.config import SSLConfig
from mics.methods.ssl.base import (
    Classifier,
    SSLAlgorithm,
    UnlabelledOutput,
    gather_across_ranks,
    hard_labels,
    last_occurrence,
    masked_consistency_loss,
    pseudo_targets,
)


def convex_mapping(beta: Tensor) -> Tensor:
    """FlexMatch's M(x) = x / (2 - x): maps [0, 1] onto [0, 1], low while a class is poorly learnt."""
    return beta / (2.0 - beta)


def learning_status(selected_label: Tensor, num_classes: int, warmup: bool) -> tuple[Tensor, Tensor]:
    """Normalised class-wise learning effect beta_c and whether it may replace the previous one.

    selected_label: [N] long, the class of each unlabelled sample's latest confident prediction, -1 if it
    never had one. sigma_c = #{i: selected_label_i = c}. With ``warmup``, beta_c = sigma_c / max(max_c
    sigma_c, #unused), so all thresholds rise slowly from 0 while most samples were never selected;
    without it, beta_c = sigma_c / max_c sigma_c. As in USB, nothing changes while every entry holds the
    same value (all unused at the start). Returns (beta [C] float, update 0-dim bool).
    """
    counts = torch.bincount(selected_label + 1, minlength=num_classes + 1).float()
    sigma = counts[1:]
    denominator = counts.max() if warmup else sigma.max()
    beta = sigma / denominator.clamp(min=1.0)
    update = counts.max() < selected_label.shape[0]
    return beta, update


class FlexMatch(SSLAlgorithm):
    """Class-wise thresholds tau * M(beta_c) from the learning status of the unlabelled set.

    Per batch: p = softmax(logits_w); mask_b = 1[max p_b >= tau * M(beta_{argmax p_b})] with the beta of
    the previous update; samples with max p_b >= tau record their class in ``selected_label``; beta is
    recomputed (:func:`learning_status`). L_u = lambda_u * mean_b mask_b * CE(logits_s_b, argmax p_b).
    """

    name: ClassVar[str] = "flexmatch"
    DEFAULTS: ClassVar[dict[str, float]] = {"hard_label": 1.0, "thresh_warmup": 1.0}
    TENSOR_STATE: ClassVar[tuple[str, ...]] = ("selected_label", "classwise_acc")

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if num_unlabelled < 1:
            raise ValueError("flexmatch needs at least one unlabelled sample")
        self.selected_label = torch.full((num_unlabelled,), -1, dtype=torch.long)
        self.classwise_acc = torch.zeros(num_classes)

    def class_thresholds(self) -> Tensor:
        """Current per-class thresholds tau * M(beta_c), [C]."""
        return self.cfg.threshold * convex_mapping(self.classwise_acc)

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
        self._check_index_range(idx)
        self._to_device(logits_w.device)
        logits_w = logits_w.detach().float()
        probs = torch.softmax(logits_w, dim=-1)
        max_probs, max_idx = probs.max(dim=-1)
        thresholds = self.class_thresholds()
        mask = (max_probs >= thresholds[max_idx]).float()
        idx = idx.to(device=logits_w.device, dtype=torch.long)
        all_probs, all_idx = gather_across_ranks(max_probs), gather_across_ranks(idx)
        self._record_confident(all_idx, gather_across_ranks(max_idx), all_probs >= self.cfg.threshold)
        beta, update = learning_status(self.selected_label, self.num_classes, self.flag("thresh_warmup"))
        self.classwise_acc = torch.where(update, beta, self.classwise_acc)

        targets = pseudo_targets(logits_w, self.flag("hard_label"), self.cfg.temperature)
        consistency = masked_consistency_loss(logits_s.float(), targets, mask)
        return UnlabelledOutput(
            loss=self.lambda_u * consistency,
            mask=mask,
            pseudo_labels=hard_labels(targets),
            logs={
                "mask_rate": float(mask.mean()),
                "threshold": float(thresholds.mean()),
                "unsup_loss": float(consistency.detach()),
                "unused_rate": float((self.selected_label < 0).float().mean()),
            },
        )

    def _record_confident(self, idx: Tensor, max_idx: Tensor, select: Tensor) -> None:
        """selected_label[idx_b] = argmax p_b for every b with max p_b >= tau (last occurrence wins)."""
        chosen, positions = last_occurrence(idx[select])
        self.selected_label[chosen] = max_idx[select][positions]
