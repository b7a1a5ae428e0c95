"""SIABC: SIAVC (Li, Lin, Fan, Zhao, Zhang, IEEE TCSVT 2025; the MICS paper's ref. [38]) adapted to images.

Reference: AlchemyEmperor/SIAVC (``SIAVC.py``, ``Tool/SuperAugmentation.py``, ``Tool/OTSU.py``,
``utils/kit.py``). SIAVC is a FixMatch-style video method with three additions, kept here for images:

* SAB, super augmentation block: every unlabelled sample keeps a history of its unlabelled loss; when
  the latest value falls in the low class of an Otsu split of that history the sample has become easy
  and its strong view is augmented further (random pixels zeroed with probability 0.1, Gaussian noise);
* cross-set augmentation: labelled images (plus unlabelled images predicted with confidence above 0.9,
  with their hard pseudo-labels) are mixed with unlabelled images, alpha ~ Beta(1, 1) per pair, the
  targets mixed with the same alpha (one-hot labels with the unlabelled prediction);
* thresholds: FreeMatch's self-adaptive thresholding (EMA global threshold times the max-normalised EMA
  class-wise estimate) and its fairness term with weight 0.01.

Deviations from the released code, all deliberate: its global threshold is lambda + (1 - lambda) *
mean max p (the EMA term lambda * tau_{t-1} is missing) and its class-wise estimate is updated from the
probabilities of the first sample of the batch only; both are the correct EMAs here. Its Otsu search
tries integer thresholds 0..255 (meant for grey levels) on losses that are mostly below 5; here the split
runs over the observed values. Its mixing targets mix a one-hot label with raw logits and then apply a
softmax; here probabilities are mixed. Its confident-sample pool only looks at class 0 and labels the
samples 1 - argmax (a binary-task shortcut); here any class above the confidence counts with its argmax.
The 2-way head that predicts the mixing ratio (``ada_adv_loss``) needs a second output of the model and
is left out. Super augmentation acts on normalised tensors: zeroed pixels take the mean colour and the
noise standard deviation is in normalised units (SIAVC: 10 grey levels of 255).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mics.config import SSLConfig
from mics.methods.ssl.base import (
    Classifier,
    SSLAlgorithm,
    UnlabelledOutput,
    gather_across_ranks,
    last_occurrence,
    masked_consistency_loss,
    soft_cross_entropy,
)
from mics.methods.ssl.freematch import fairness_loss, self_adaptive_mask, update_self_adaptive


def otsu_split(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Otsu's split of each row of ``values`` into a low and a high class.

    Over the valid entries (sorted), every cut between the k smallest and the rest is scored by the
    between-class variance w1 w2 (m1 - m2)^2; the best cut gives the threshold halfway between the two
    neighbouring values. values, valid: [B, H]. Returns (threshold [B], separable [B] bool), separable
    False where fewer than two entries are valid or all valid entries are equal.
    """
    count = valid.sum(dim=1, keepdim=True)
    ordered = torch.sort(torch.where(valid, values, torch.full_like(values, float("inf"))), dim=1).values
    finite = torch.where(torch.isfinite(ordered), ordered, torch.zeros_like(ordered))
    prefix = finite.cumsum(dim=1)
    total = prefix[:, -1:]
    k = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype).unsqueeze(0)
    n = count.to(values.dtype)
    rest = (n - k).clamp(min=1.0)
    w_low = k / n.clamp(min=1.0)
    between = w_low * (1.0 - w_low) * (prefix / k - (total - prefix) / rest) ** 2
    between = torch.where(k < n, between, torch.full_like(between, -1.0))
    best_score, best = between.max(dim=1)
    upper = (best + 1).clamp(max=values.shape[1] - 1)
    threshold = 0.5 * (finite.gather(1, best.unsqueeze(1)) + finite.gather(1, upper.unsqueeze(1))).squeeze(1)
    return threshold, best_score > 0


def super_augment(x: Tensor, mask_prob: float, noise_std: float, generator: torch.Generator | None) -> Tensor:
    """SIAVC's super augmentation on normalised images: zero each pixel (all channels) with probability
    ``mask_prob``, then add N(0, noise_std^2) noise. x: [B, 3, H, W] -> [B, 3, H, W]."""
    device = generator.device if generator is not None else x.device
    batch, channels, height, width = x.shape
    drop = torch.rand(batch, 1, height, width, generator=generator, device=device).to(x.device) < mask_prob
    noise = torch.randn(batch, channels, height, width, generator=generator, device=device).to(x)
    return x.masked_fill(drop, 0.0) + noise_std * noise


def cross_set_mix(
    x_pool: Tensor,
    y_pool: Tensor,
    x_u: Tensor,
    probs_u: Tensor,
    count: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """``count`` mixtures alpha * pool image + (1 - alpha) * unlabelled image, alpha ~ U(0, 1) = Beta(1, 1).

    Pool entries are drawn without replacement (cycled if the pool is smaller), unlabelled partners as a
    cycled random permutation. x_pool: [P, 3, H, W], y_pool: [P, C] targets; x_u: [U, 3, H, W], probs_u:
    [U, C]. Returns (images [count, 3, H, W], soft targets [count, C]).
    """
    device = generator.device if generator is not None else x_u.device
    pool_order = torch.randperm(x_pool.shape[0], generator=generator, device=device).to(x_u.device)
    partner_order = torch.randperm(x_u.shape[0], generator=generator, device=device).to(x_u.device)
    alpha = torch.rand(count, generator=generator, device=device).to(x_u)
    a = pool_order[torch.arange(count, device=x_u.device) % x_pool.shape[0]]
    b = partner_order[torch.arange(count, device=x_u.device) % x_u.shape[0]]
    images = alpha.view(-1, 1, 1, 1) * x_pool[a] + (1.0 - alpha.view(-1, 1, 1, 1)) * x_u[b]
    targets = alpha.view(-1, 1) * y_pool[a] + (1.0 - alpha.view(-1, 1)) * probs_u[b]
    return images, targets


class SIABC(SSLAlgorithm):
    """SIAVC's thresholds, fairness term, super augmentation and cross-set mixing for images.

    ``mix_batch`` (after the weak forward pass) returns
      x_l' = [x_l; x_mix] (2 B_l images), y_l' = [onehot(y_l); y_mix] ([2 B_l, C] soft targets),
      x_u_w unchanged, x_u_s with super augmentation on the samples that have become easy.
    The B_l mixtures come from :func:`cross_set_mix` on the pool {labelled} U {unlabelled with max
    softmax(logits_u_w / T) > list_threshold}, partners the weak unlabelled views, targets mixed with
    softmax(logits_u_w / T). ``supervised_loss`` on that layout is CE(clean half) + mix_weight *
    CE(mixed half) (SIAVC: Lx + ada_reg_loss); on plain [B] labels it is the usual CE.

    ``unlabelled_loss``: p = softmax(logits_w / T); FreeMatch's SAT update and mask;
    loss = lambda_u * mean_b mask_b CE(logits_s_b, argmax p_b) + lambda_f * L_f; the per-sample CE of the
    strong view (all samples) is appended to each sample's loss history for the next SAB decision.
    """

    name: ClassVar[str] = "siabc"
    DEFAULTS: ClassVar[dict[str, float]] = {
        "T": 1.0,
        "ema_p": 0.999,
        "lambda_f": 0.01,
        "list_threshold": 0.9,
        "mix": 1.0,
        "mix_weight": 1.0,
        "sab": 1.0,
        "sab_history": 8.0,
        "sab_mask_prob": 0.1,
        "sab_noise_std": 10.0 / 255.0 / 0.25,
    }
    TENSOR_STATE: ClassVar[tuple[str, ...]] = (
        "tau",
        "p_tilde",
        "label_hist",
        "loss_history",
        "history_count",
    )
    mixes_inputs: ClassVar[bool] = True

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if num_unlabelled < 1:
            raise ValueError("siabc needs at least one unlabelled sample")
        if self.param("T") <= 0:
            raise ValueError(f"siabc: T must be positive, got {self.param('T')}")
        if not 0.0 <= self.param("ema_p") < 1.0:
            raise ValueError(f"siabc: ema_p must lie in [0, 1), got {self.param('ema_p')}")
        if int(self.param("sab_history")) < 2:
            raise ValueError(f"siabc: sab_history must be at least 2, got {self.param('sab_history')}")
        self.tau = torch.tensor(1.0 / num_classes)
        self.p_tilde = torch.full((num_classes,), 1.0 / num_classes)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes)
        self.loss_history = torch.zeros(num_unlabelled, int(self.param("sab_history")))
        self.history_count = torch.zeros(num_unlabelled, dtype=torch.long)

    def supervised_loss(self, logits_l: Tensor, y: Tensor) -> Tensor:
        """Plain CE for [B] labels; on ``mix_batch``'s [2 B_l, C] soft layout
        CE(clean half) + mix_weight * CE(mixed half)."""
        if y.dim() == 1:
            return super().supervised_loss(logits_l, y)
        if y.shape != logits_l.shape or y.shape[1] != self.num_classes or y.shape[0] % 2:
            raise ValueError(
                f"siabc: soft targets must be mix_batch's [2 B_l, {self.num_classes}] layout matching "
                f"the logits, got targets {tuple(y.shape)} and logits {tuple(logits_l.shape)}"
            )
        half = y.shape[0] // 2
        per_sample = soft_cross_entropy(logits_l.float(), y.float())
        return per_sample[:half].mean() + self.param("mix_weight") * per_sample[half:].mean()

    def easy_samples(self, idx: Tensor) -> Tensor:
        """SAB's trigger: the latest loss of each sample lies below the Otsu split of its history.

        idx: [B] long. Returns [B] bool.
        """
        self._to_device(idx.device)
        history = self.loss_history[idx]
        count = self.history_count[idx]
        size = history.shape[1]
        valid = torch.arange(size, device=idx.device).unsqueeze(0) < count.clamp(max=size).unsqueeze(1)
        threshold, separable = otsu_split(history, valid)
        latest = history.gather(1, ((count - 1).clamp(min=0) % size).unsqueeze(1)).squeeze(1)
        return separable & (latest <= threshold)

    def mix_batch(
        self,
        x_l: Tensor,
        y_l: Tensor,
        x_u_w: Tensor,
        x_u_s: Tensor,
        logits_u_w: Tensor | None,
        generator: torch.Generator | None,
        idx_u: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Super augmentation of the easy strong views, then B_l cross-set mixtures appended to the
        labelled batch (see the class docstring for the layout). ``generator`` drives every random draw
        (the global RNG when None)."""
        logits_u_w, idx_u = self._check_mix_inputs(x_l, y_l, x_u_w, x_u_s, logits_u_w, idx_u)
        if self.flag("sab"):
            easy = self.easy_samples(idx_u.to(device=x_u_s.device, dtype=torch.long))
            augmented = super_augment(
                x_u_s, self.param("sab_mask_prob"), self.param("sab_noise_std"), generator
            )
            x_u_s = torch.where(easy.view(-1, 1, 1, 1), augmented, x_u_s)
        if not self.flag("mix"):
            return x_l, y_l, x_u_w, x_u_s
        y_onehot = F.one_hot(y_l.long(), self.num_classes).to(x_l.dtype)
        probs_u = torch.softmax(logits_u_w.detach().float() / self.param("T"), dim=-1).to(x_l.dtype)
        confident = probs_u.max(dim=-1).values > self.param("list_threshold")
        confident_y = F.one_hot(probs_u[confident].argmax(dim=-1), self.num_classes).to(x_l.dtype)
        pool_x = torch.cat([x_l, x_u_w[confident]])
        pool_y = torch.cat([y_onehot, confident_y])
        x_mix, y_mix = cross_set_mix(pool_x, pool_y, x_u_w, probs_u, x_l.shape[0], generator)
        return torch.cat([x_l, x_mix]), torch.cat([y_onehot, y_mix]), x_u_w, x_u_s

    def _check_mix_inputs(
        self,
        x_l: Tensor,
        y_l: Tensor,
        x_u_w: Tensor,
        x_u_s: Tensor,
        logits_u_w: Tensor | None,
        idx_u: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        if logits_u_w is None or idx_u is None:
            raise ValueError("siabc: mix_batch needs logits_u_w (weak-view logits) and idx_u (indices)")
        shapes = f"{tuple(x_l.shape)}, {tuple(x_u_w.shape)}, {tuple(x_u_s.shape)}"
        if x_l.dim() != 4 or x_u_s.shape != x_u_w.shape or x_l.shape[1:] != x_u_w.shape[1:]:
            raise ValueError(f"siabc: images must be [B, 3, H, W] of one size, got {shapes}")
        if y_l.shape != x_l.shape[:1] or y_l.is_floating_point():
            raise ValueError(f"siabc: y_l must be [B_l]={x_l.shape[0]} class indices, got {tuple(y_l.shape)}")
        batch_u = x_u_w.shape[0]
        if logits_u_w.shape != (batch_u, self.num_classes) or idx_u.shape != (batch_u,):
            raise ValueError(
                f"siabc: logits_u_w must be [{batch_u}, {self.num_classes}] and idx_u [{batch_u}], "
                f"got {tuple(logits_u_w.shape)} and {tuple(idx_u.shape)}"
            )
        self._check_index_range(idx_u)
        return logits_u_w, idx_u

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
        logits_s = logits_s.float()
        probs = torch.softmax(logits_w / self.param("T"), dim=-1)
        self.tau, self.p_tilde, self.label_hist = update_self_adaptive(
            self.tau, self.p_tilde, self.label_hist, gather_across_ranks(probs), self.param("ema_p")
        )
        mask, thresholds = self_adaptive_mask(probs, self.tau, self.p_tilde)
        labels = probs.argmax(dim=-1)
        per_sample = soft_cross_entropy(logits_s, labels)
        consistency = masked_consistency_loss(logits_s, labels, mask)
        fairness = fairness_loss(logits_s, mask, self.p_tilde, self.label_hist)
        idx = idx.to(device=logits_w.device, dtype=torch.long)
        self._record_losses(gather_across_ranks(idx), gather_across_ranks(per_sample.detach()))
        return UnlabelledOutput(
            loss=self.lambda_u * consistency + self.param("lambda_f") * fairness,
            mask=mask,
            pseudo_labels=labels,
            logs={
                "mask_rate": float(mask.mean()),
                "threshold": float(self.tau),
                "class_threshold_min": float(thresholds.min()),
                "unsup_loss": float(consistency.detach()),
                "fairness_loss": float(fairness.detach()),
            },
        )

    def _record_losses(self, idx: Tensor, losses: Tensor) -> None:
        """Append each sample's loss to its ring buffer (the last occurrence of a repeated index wins)."""
        chosen, positions = last_occurrence(idx)
        slot = self.history_count[chosen] % self.loss_history.shape[1]
        self.loss_history[chosen, slot] = losses[positions]
        self.history_count[chosen] += 1
