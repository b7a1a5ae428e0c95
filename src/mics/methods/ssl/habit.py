"""HABIT (Yang, Chen, Yuan, IEEE TMI 2023): hierarchical bias mitigation, as a loss / mask unit.

Reference: CityU-AIM-Group/HABIT ``Train_HABIT.py`` (ConvMLP path with ``--RFC --CMH``). Of its three
modules, MRNet is a two-branch architecture and stays out (every baseline uses the project's backbone);
this unit reproduces the rest:

* pseudo-labels from the weak view with HABIT's distribution alignment (divide by the mean prediction of
  the last 32 batches, renormalise) and the fixed threshold tau;
* the recalibration term: for samples whose confidence lies in [0.95, 0.98) the negative cosine
  similarity between weak and strong logits;
* RFC, recalibrated feature compensation: per class, Gaussian features N(mean, cov + eps I) estimated
  from the batch's weak-view features of that class are drawn until every present class has B samples,
  and the classifier is trained on them (weight 0.5);
* CMH, consistency-aware momentum heredity: the EMA decay m becomes m (1 - 0.1 m sigmoid(d) sigmoid(l)),
  d the distance between the normalisation-layer parameters of model and EMA model, l a batch loss.

The released code groups RFC's features by the ground-truth labels of the unlabelled images and feeds
CMH the cross-entropy of the weak logits against those labels. Both use labels an SSL method may not
see: here RFC groups by the confident pseudo-labels and CMH uses the consistency loss of the strong view
against the pseudo-labels (unmasked batch mean), the label-free measure of agreement between views.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mics.config import SSLConfig
from mics.methods.ssl.base import (
    Classifier,
    SSLAlgorithm,
    UnlabelledOutput,
    gather_across_ranks,
    masked_consistency_loss,
)

_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


def queue_alignment(probs_w: Tensor, queue_mean: Tensor) -> Tensor:
    """HABIT's distribution alignment: SumNorm(p / mean of recent batch-mean predictions).

    probs_w: [B, C]; queue_mean: [C]. Returns [B, C].
    """
    aligned = probs_w / queue_mean
    return aligned / aligned.sum(dim=-1, keepdim=True)


def recalibration_loss(logits_w: Tensor, logits_s: Tensor, scores: Tensor, low: float, high: float) -> Tensor:
    """-mean_b 1[low <= score_b < high] cos(logits_w_b, logits_s_b): pulls the strong logits of samples
    just above the threshold towards the direction of their weak logits. Returns 0-dim."""
    band = ((scores >= low) & (scores < high)).float()
    cosine = (logits_w * logits_s).sum(dim=1) / (logits_w.norm(dim=1) * logits_s.norm(dim=1) + 1e-6)
    return -(cosine * band).mean()


def compensation_features(
    feats: Tensor, labels: Tensor, num_classes: int, target_count: int, eps: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """RFC's synthetic features: for every class c present in ``labels`` with n_c samples, draw
    target_count - n_c features from N(mean_c, cov_c + eps I), cov_c the unbiased covariance (zero for
    n_c = 1). Sampled as mean + Z X_c / sqrt(n_c - 1) + sqrt(eps) Z', X_c the centred features and Z, Z'
    standard normal, which has exactly that law without factorising a D x D matrix.

    feats: [B, D] (detached); labels: [B] long. Returns (features [M, D], labels [M] long).
    """
    out_feats, out_labels = [], []
    for c in range(num_classes):
        members = feats[labels == c]
        count = members.shape[0]
        missing = target_count - count
        if count == 0 or missing <= 0:
            continue
        mean = members.mean(dim=0)
        draws = mean.expand(missing, -1).clone()
        if count > 1:
            centred = members - mean
            z = torch.randn(missing, count, generator=generator, device=generator.device).to(feats)
            draws = draws + z @ centred / math.sqrt(count - 1)
        noise = torch.randn(missing, feats.shape[1], generator=generator, device=generator.device).to(feats)
        out_feats.append(draws + math.sqrt(eps) * noise)
        out_labels.append(torch.full((missing,), c, dtype=torch.long, device=feats.device))
    if not out_feats:
        return feats.new_zeros(0, feats.shape[1]), torch.zeros(0, dtype=torch.long, device=feats.device)
    return torch.cat(out_feats), torch.cat(out_labels)


def norm_parameter_distance(model: nn.Module, ema_model: nn.Module) -> float:
    """Mean over normalisation layers of sqrt(|gamma - gamma_ema|^2 + |beta - beta_ema|^2 + 1e-6).

    HABIT measures BatchNorm layers; LayerNorm and GroupNorm count too so a ViT has a signal. 0 when the
    model has no affine normalisation layer.
    """
    layers = [
        m for m in model.modules() if isinstance(m, _NORM_LAYERS) and getattr(m, "weight", None) is not None
    ]
    ema_layers = [
        m
        for m in ema_model.modules()
        if isinstance(m, _NORM_LAYERS) and getattr(m, "weight", None) is not None
    ]
    if len(layers) != len(ema_layers):
        raise ValueError(f"model has {len(layers)} normalisation layers, the EMA model {len(ema_layers)}")
    if not layers:
        return 0.0
    with torch.no_grad():
        total = 0.0
        for layer, ema_layer in zip(layers, ema_layers, strict=True):
            squared = (layer.weight - ema_layer.weight).pow(2).sum()
            if layer.bias is not None and ema_layer.bias is not None:
                squared = squared + (layer.bias - ema_layer.bias).pow(2).sum()
            total += float(torch.sqrt(squared + 1e-6))
    return total / len(layers)


def cmh_decay(base: float, distance: float, consistency: float, scale: float) -> float:
    """CMH: base * (1 - scale * base * sigmoid(distance) * sigmoid(consistency))."""

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    return base * (1.0 - scale * base * sigmoid(distance) * sigmoid(consistency))


class HABIT(SSLAlgorithm):
    """FixMatch-style selection on queue-aligned weak predictions plus recalibration, RFC and CMH.

    loss = lambda_u * (mean_b mask_b CE(logits_s_b, y_b) + rec_weight * L_rec + rfc_weight * L_rfc) with
    y = argmax q, q = queue_alignment(softmax(logits_w)), mask = 1[max q >= tau], L_rec from
    :func:`recalibration_loss` on max q, and L_rfc the mean CE of ``classifier`` on the synthetic features
    of :func:`compensation_features` (built from ``feats_w`` of the masked samples, B per present class).
    RFC needs ``feats_w`` and ``classifier``; with ``rfc`` = 0 neither is used.
    """

    name: ClassVar[str] = "habit"
    DEFAULTS: ClassVar[dict[str, float]] = {
        "dist_align": 1.0,
        "da_queue": 32.0,
        "rec_low": 0.95,
        "rec_high": 0.98,
        "rec_weight": 1.0,
        "rfc": 1.0,
        "rfc_weight": 0.5,
        "rfc_eps": 1e-6,
        "cmh": 1.0,
        "cmh_scale": 0.1,
        "seed": 0.0,
    }
    TENSOR_STATE: ClassVar[tuple[str, ...]] = ("prob_queue",)
    NUMBER_STATE: ClassVar[tuple[str, ...]] = ("queue_filled", "queue_next", "last_consistency")
    needs_features: ClassVar[bool] = True
    needs_classifier: ClassVar[bool] = True

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if int(self.param("da_queue")) < 1:
            raise ValueError(f"habit: da_queue must be at least 1, got {self.param('da_queue')}")
        self.prob_queue = torch.zeros(int(self.param("da_queue")), num_classes)
        self.queue_filled = 0
        self.queue_next = 0
        self.last_consistency = 0.0

    def align(self, probs: Tensor) -> Tensor:
        """Push this batch's mean prediction into the queue, then align ``probs`` [B, C] with the queue."""
        self.prob_queue[self.queue_next] = gather_across_ranks(probs).mean(dim=0)
        self.queue_next = (self.queue_next + 1) % self.prob_queue.shape[0]
        self.queue_filled = min(self.queue_filled + 1, self.prob_queue.shape[0])
        return queue_alignment(probs, self.prob_queue[: self.queue_filled].mean(dim=0))

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
        rfc_inputs = self._rfc_inputs(feats_w, classifier, logits_w.shape[0]) if self.flag("rfc") else None
        self._to_device(logits_w.device)
        logits_w = logits_w.detach().float()
        logits_s = logits_s.float()
        probs = torch.softmax(logits_w, dim=-1)
        if self.flag("dist_align"):
            probs = self.align(probs)
        scores, labels = probs.max(dim=-1)
        mask = (scores >= self.cfg.threshold).float()

        consistency = masked_consistency_loss(logits_s, labels, mask)
        recalibration = recalibration_loss(
            logits_w, logits_s, scores, self.param("rec_low"), self.param("rec_high")
        )
        loss = consistency + self.param("rec_weight") * recalibration
        logs = {
            "mask_rate": float(mask.mean()),
            "threshold": self.cfg.threshold,
            "unsup_loss": float(consistency.detach()),
            "recalibration_loss": float(recalibration.detach()),
        }
        if rfc_inputs is not None:
            rfc = self._compensation_loss(rfc_inputs[0].detach().float(), labels, mask, rfc_inputs[1], step)
            loss = loss + self.param("rfc_weight") * rfc
            logs["rfc_loss"] = float(rfc.detach())
        per_sample = F.cross_entropy(logits_s.detach(), labels, reduction="none")
        self.last_consistency = float(gather_across_ranks(per_sample).mean())
        return UnlabelledOutput(loss=self.lambda_u * loss, mask=mask, pseudo_labels=labels, logs=logs)

    @staticmethod
    def _rfc_inputs(
        feats_w: Tensor | None, classifier: Classifier | None, batch: int
    ) -> tuple[Tensor, Classifier]:
        if feats_w is None or classifier is None:
            raise ValueError("habit: RFC needs feats_w and classifier= (or set params rfc=0)")
        if feats_w.dim() != 2 or feats_w.shape[0] != batch:
            raise ValueError(f"habit: feats_w must be [B={batch}, D], got {tuple(feats_w.shape)}")
        return feats_w, classifier

    def _compensation_loss(
        self, feats_w: Tensor, labels: Tensor, mask: Tensor, classifier: Classifier, step: int
    ) -> Tensor:
        """CE of the classifier on RFC's synthetic features of the confident samples (0 if there are none).

        The draws come from a CPU generator seeded with (seed, step): reproducible on every device and
        after a resume without storing a generator state.
        """
        generator = torch.Generator().manual_seed(int(self.param("seed")) * 1_000_003 + step)
        selected = mask > 0
        synth, synth_labels = compensation_features(
            feats_w[selected],
            labels[selected],
            self.num_classes,
            feats_w.shape[0],
            self.param("rfc_eps"),
            generator,
        )
        if synth.shape[0] == 0:
            return feats_w.new_zeros(())
        logits = classifier(synth.to(feats_w.dtype))
        return F.cross_entropy(logits.float(), synth_labels)

    def ema_decay(self, base: float, model: nn.Module, ema_model: nn.Module) -> float:
        """CMH's momentum (``cmh`` = 1), from the last batch's consistency loss; ``base`` otherwise."""
        if not self.flag("cmh"):
            return base
        distance = norm_parameter_distance(model, ema_model)
        return cmh_decay(base, distance, self.last_consistency, self.param("cmh_scale"))
