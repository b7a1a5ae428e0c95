"""FreeMatch (Wang et al., ICLR 2023): self-adaptive thresholding (SAT) and self-adaptive class fairness.

Reference: USB ``semilearn/algorithms/freematch`` (``FreeMatchThresholingHook``, ``entropy_loss``,
``ent_loss_ratio`` = 0.01, ``ema_p`` = 0.999). The running estimates start at 1/C as in the paper
(USB starts p_model and label_hist at ones and tau at 1).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

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


def ema(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """momentum * old + (1 - momentum) * new."""
    return old * momentum + new * (1.0 - momentum)


def update_self_adaptive(
    tau: Tensor, p_tilde: Tensor, label_hist: Tensor, probs_w: Tensor, momentum: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One SAT step (Eq. 4-5 of FreeMatch) plus the pseudo-label histogram used by the fairness term.

    tau: 0-dim global threshold, EMA of the batch mean of max_c p; p_tilde: [C] local estimate, EMA of the
    batch mean of p; label_hist: [C] EMA of the normalised histogram of argmax p. probs_w: [B, C].
    Returns the updated (tau, p_tilde, label_hist).
    """
    max_probs, max_idx = probs_w.max(dim=-1)
    tau = ema(tau, max_probs.mean(), momentum)
    p_tilde = ema(p_tilde, probs_w.mean(dim=0), momentum)
    hist = torch.bincount(max_idx, minlength=probs_w.shape[1]).to(probs_w.dtype)
    label_hist = ema(label_hist, hist / hist.sum(), momentum)
    return tau, p_tilde, label_hist


def self_adaptive_mask(probs_w: Tensor, tau: Tensor, p_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """mask_b = 1[max p_b >= tau * MaxNorm(p_tilde)[argmax p_b]]; returns (mask [B], thresholds [C])."""
    thresholds = tau * p_tilde / p_tilde.max()
    max_probs, max_idx = probs_w.max(dim=-1)
    return (max_probs >= thresholds[max_idx]).float(), thresholds


def _inverse_or_zero(x: Tensor) -> Tensor:
    """1 / x with 0 where x == 0 (a class that never occurs gets no weight)."""
    return torch.where(x > 0, 1.0 / x.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def fairness_loss(logits_s: Tensor, mask: Tensor, p_tilde: Tensor, label_hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness term L_f = -H(SumNorm(p_tilde / h), SumNorm(p_bar / h_bar)).

    With H the cross-entropy, L_f = sum_c u_c log v_c where u = SumNorm(p_tilde / label_hist) (detached
    running estimates) and v = SumNorm(mean_b p_s,b / hist_s) over the masked strong-view predictions
    p_s = softmax(logits_s), hist_s their normalised argmax histogram (1/0 := 0). Minimising it maximises
    that cross-entropy, which pushes the batch towards diverse predictions; it is <= 0 by construction,
    so a negative value is expected. Zero (attached to logits_s) when no sample is masked in.
    logits_s: [B, C]; mask: [B] in {0, 1}; p_tilde, label_hist: [C]. Returns 0-dim.
    """
    selected = mask > 0
    if not bool(selected.any()):
        return logits_s.sum() * 0.0
    probs_s = torch.softmax(logits_s[selected], dim=-1)
    hist_s = torch.bincount(probs_s.argmax(dim=-1), minlength=logits_s.shape[1]).to(probs_s.dtype)
    hist_s = hist_s / hist_s.sum()
    target = p_tilde * _inverse_or_zero(label_hist)
    target = (target / target.sum()).detach()
    mean_s = probs_s.mean(dim=0) * _inverse_or_zero(hist_s)
    mean_s = mean_s / mean_s.sum()
    return (target * torch.log(mean_s + 1e-12)).sum()


class FairnessLoss(nn.Module):
    """Module form of :func:`fairness_loss` that validates its arguments."""

    def forward(self, logits_s: Tensor, mask: Tensor, p_tilde: Tensor, label_hist: Tensor) -> Tensor:
        if logits_s.dim() != 2:
            raise ValueError(f"logits_s must be [B, C], got {tuple(logits_s.shape)}")
        batch, classes = logits_s.shape
        if mask.shape != (batch,):
            raise ValueError(f"mask must be [B]={batch}, got {tuple(mask.shape)}")
        if p_tilde.shape != (classes,) or label_hist.shape != (classes,):
            raise ValueError(
                f"p_tilde and label_hist must be [C]={classes}, "
                f"got {tuple(p_tilde.shape)}, {tuple(label_hist.shape)}"
            )
        return fairness_loss(logits_s, mask, p_tilde, label_hist)


class FreeMatch(SSLAlgorithm):
    """Self-adaptive global and class-wise thresholds plus the fairness regulariser.

    Per batch (update first, then mask, as in USB): (tau, p_tilde, label_hist) <- SAT update with
    p = softmax(logits_w); mask from :func:`self_adaptive_mask`;
    loss = lambda_u * mean_b mask_b CE(logits_s_b, argmax p_b) + lambda_f * L_f (:func:`fairness_loss`).
    """

    name: ClassVar[str] = "freematch"
    DEFAULTS: ClassVar[dict[str, float]] = {"hard_label": 1.0, "ema_p": 0.999, "lambda_f": 0.01}
    TENSOR_STATE: ClassVar[tuple[str, ...]] = ("tau", "p_tilde", "label_hist")

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if not 0.0 <= self.param("ema_p") < 1.0:
            raise ValueError(f"{self.name}: ema_p must lie in [0, 1), got {self.param('ema_p')}")
        self.tau = torch.tensor(1.0 / num_classes)
        self.p_tilde = torch.full((num_classes,), 1.0 / num_classes)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes)

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
        logits_w = logits_w.detach().float()
        logits_s = logits_s.float()
        probs = torch.softmax(logits_w, dim=-1)
        self.tau, self.p_tilde, self.label_hist = update_self_adaptive(
            self.tau, self.p_tilde, self.label_hist, gather_across_ranks(probs), self.param("ema_p")
        )
        mask, thresholds = self_adaptive_mask(probs, self.tau, self.p_tilde)
        targets = pseudo_targets(logits_w, self.flag("hard_label"), self.cfg.temperature)
        consistency = masked_consistency_loss(logits_s, targets, mask)
        fairness = fairness_loss(logits_s, mask, self.p_tilde, self.label_hist)
        return UnlabelledOutput(
            loss=self.lambda_u * consistency + self.param("lambda_f") * fairness,
            mask=mask,
            pseudo_labels=hard_labels(targets),
            logs={
                "mask_rate": float(mask.mean()),
                "threshold": float(self.tau),
                "class_threshold_min": float(thresholds.min()),
                "unsup_loss": float(consistency.detach()),
                "fairness_loss": float(fairness.detach()),
            },
        )
