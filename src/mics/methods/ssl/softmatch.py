"""SoftMatch (Chen et al., ICLR 2023): truncated-Gaussian sample weights with uniform alignment.

Reference: USB ``semilearn/algorithms/softmatch`` (``SoftMatchWeightingHook`` with ``per_class=False``,
``DistAlignEMAHook`` with a uniform target, ``n_sigma`` = 2, ``ema_p`` = 0.999). As in USB the aligned
probabilities only set the weights; the pseudo-labels are the argmax of the unaligned weak prediction.
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
    masked_consistency_loss,
    pseudo_targets,
)
from mics.methods.ssl.freematch import ema


def uniform_alignment(probs_w: Tensor, p_model: Tensor) -> Tensor:
    """Uniform distribution alignment: SumNorm(p * (1/C) / p_model) (both offset by 1e-6 as in USB).

    probs_w: [B, C]; p_model: [C] running mean prediction. Returns [B, C].
    """
    uniform = 1.0 / probs_w.shape[1]
    aligned = probs_w * (uniform + 1e-6) / (p_model + 1e-6)
    return aligned / aligned.sum(dim=-1, keepdim=True)


def truncated_gaussian_weights(max_probs: Tensor, mu: Tensor, var: Tensor, n_sigma: float) -> Tensor:
    """lambda(p) = exp(-(min(p - mu, 0))^2 / (2 var / n_sigma^2)): 1 above the mean confidence mu,
    a Gaussian fall-off of standard deviation sqrt(var) / n_sigma below it. max_probs: [B] -> [B]."""
    gap = torch.clamp(max_probs - mu, max=0.0)
    return torch.exp(-(gap**2) / (2.0 * var / n_sigma**2))


class SoftMatch(SSLAlgorithm):
    """Weights every unlabelled sample by the confidence of its (aligned) weak prediction.

    Per batch: p = softmax(logits_w); p_model <- EMA of mean_b p (the first batch initialises it);
    q = uniform_alignment(p, p_model); mu <- EMA of mean_b max q, var <- EMA of the unbiased variance of
    max q (kept when B < 2); w = truncated_gaussian_weights(max q, mu, var);
    L_u = lambda_u * mean_b w_b CE(logits_s_b, argmax p_b). mu starts at 1/C and var at 1.
    """

    name: ClassVar[str] = "softmatch"
    DEFAULTS: ClassVar[dict[str, float]] = {
        "hard_label": 1.0,
        "ema_p": 0.999,
        "n_sigma": 2.0,
        "dist_align": 1.0,
    }
    TENSOR_STATE: ClassVar[tuple[str, ...]] = ("mu", "var", "p_model")
    NUMBER_STATE: ClassVar[tuple[str, ...]] = ("p_model_ready",)

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if not 0.0 <= self.param("ema_p") < 1.0:
            raise ValueError(f"softmatch: ema_p must lie in [0, 1), got {self.param('ema_p')}")
        if self.param("n_sigma") <= 0:
            raise ValueError(f"softmatch: n_sigma must be positive, got {self.param('n_sigma')}")
        self.mu = torch.tensor(1.0 / num_classes)
        self.var = torch.tensor(1.0)
        self.p_model = torch.full((num_classes,), 1.0 / num_classes)
        self.p_model_ready = 0

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
        self._to_device(logits_w.device)
        momentum = self.param("ema_p")
        logits_w = logits_w.detach().float()
        probs = torch.softmax(logits_w, dim=-1)
        all_probs = gather_across_ranks(probs)
        if self.flag("dist_align"):
            batch_mean = all_probs.mean(dim=0)
            self.p_model = ema(self.p_model, batch_mean, momentum) if self.p_model_ready else batch_mean
            self.p_model_ready = 1
            probs = uniform_alignment(probs, self.p_model)
            all_probs = uniform_alignment(all_probs, self.p_model)
        all_max = all_probs.max(dim=-1).values
        self.mu = ema(self.mu, all_max.mean(), momentum)
        if all_max.shape[0] > 1:
            self.var = ema(self.var, all_max.var(unbiased=True), momentum)
        max_probs = probs.max(dim=-1).values
        weights = truncated_gaussian_weights(max_probs, self.mu, self.var, self.param("n_sigma"))

        targets = pseudo_targets(logits_w, self.flag("hard_label"), self.cfg.temperature)
        consistency = masked_consistency_loss(logits_s.float(), targets, weights)
        return UnlabelledOutput(
            loss=self.lambda_u * consistency,
            mask=weights,
            pseudo_labels=hard_labels(targets),
            logs={
                "mask_rate": float(weights.mean()),
                "threshold": float(self.mu),
                "var": float(self.var),
                "unsup_loss": float(consistency.detach()),
            },
        )
