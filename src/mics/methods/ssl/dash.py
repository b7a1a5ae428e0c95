"""Dash (Xu et al., ICML 2021): a loss threshold rho_t that decays geometrically after a supervised warm-up.

Reference: USB ``semilearn/algorithms/dash`` (``DashThresholdingHook``: rho = C * gamma^-k * rho_init,
floored at rho_min, k incremented every 10 epochs; soft labels with T until rho reaches rho_min, hard
labels afterwards). USB warms up for 2048 of 2^20 iterations and updates rho every 10 * 1024 iterations;
here both are fractions of ``total_steps`` so short runs keep the same shape of schedule.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mics.config import SSLConfig
from mics.methods.ssl.base import (
    Classifier,
    SSLAlgorithm,
    UnlabelledOutput,
    hard_labels,
    masked_consistency_loss,
    pseudo_targets,
    soft_cross_entropy,
    zero_loss,
)


def dash_rho(rho_hat: float, updates: int, gamma: float, c: float, rho_min: float) -> float:
    """rho after ``updates`` decay steps: max(C * gamma^-updates * rho_hat, rho_min)."""
    return max(c * gamma ** (-updates) * rho_hat, rho_min)


class Dash(SSLAlgorithm):
    """Selects unlabelled samples whose weak-view loss against their own pseudo-label is below rho_t.

    Steps [0, W) are the supervised warm-up (zero unlabelled loss); rho_hat is the mean labelled loss the
    loop reported through :meth:`observe_supervised` over the END of the warm-up, its last
    max(1, round(``rho_window_frac`` * W)) steps (USB computes rho from the model at the end of warm-up;
    a mean over all of it would include the loss at initialisation, log C, and start rho far too high).
    From step W on, with k = (step - W) // period, rho = max(C * gamma^-k * rho_hat, rho_min); the target
    is softmax(logits_w / T) while rho > rho_min and argmax once rho = rho_min;
    mask_b = 1[CE(logits_w_b, target_b) <= rho];
    L_u = lambda_u * mean_b mask_b * CE(logits_s_b, target_b).
    W = ``warmup_steps`` if positive, else round(``warmup_frac`` * total_steps) (at least 1);
    period = max(1, round(``rho_period_frac`` * total_steps)); T = ``cfg.temperature``.
    """

    name: ClassVar[str] = "dash"
    DEFAULTS: ClassVar[dict[str, float]] = {
        "warmup_steps": 0.0,
        "warmup_frac": 0.1,
        "rho_period_frac": 10.0 / 1024.0,
        "gamma": 1.27,
        "C": 1.0001,
        "rho_min": 0.05,
        "rho_window_frac": 0.1,
    }
    NUMBER_STATE: ClassVar[tuple[str, ...]] = ("warmup_loss_sum", "warmup_loss_count", "warmup_length")

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        super().__init__(num_classes, num_unlabelled, cfg)
        if self.param("gamma") <= 1.0:
            raise ValueError(f"dash: gamma must exceed 1 for rho to decay, got {self.param('gamma')}")
        if self.param("rho_min") <= 0.0:
            raise ValueError(f"dash: rho_min must be positive, got {self.param('rho_min')}")
        if not 0.0 < self.param("rho_window_frac") <= 1.0:
            raise ValueError(f"dash: rho_window_frac must lie in (0, 1], got {self.param('rho_window_frac')}")
        self.warmup_loss_sum = 0.0
        self.warmup_loss_count = 0
        self.warmup_length = -1
        # (step, loss) observed before the warm-up length is known (step 0 in the training loop)
        self._provisional: list[tuple[int, float]] = []

    def warmup_steps(self, total_steps: int) -> int:
        """Number of supervised-only iterations at the start of a run of ``total_steps``."""
        fixed = int(self.param("warmup_steps"))
        steps = fixed if fixed > 0 else round(self.param("warmup_frac") * total_steps)
        return max(1, steps)

    def rho_period(self, total_steps: int) -> int:
        """Iterations between two decays of rho."""
        return max(1, round(self.param("rho_period_frac") * total_steps))

    def rho_window(self, warmup: int) -> int:
        """Number of final warm-up steps whose labelled losses make rho_hat."""
        return max(1, min(warmup, round(self.param("rho_window_frac") * warmup)))

    def rho_hat(self) -> float:
        """Mean labelled loss over the last :meth:`rho_window` steps of the warm-up."""
        if self.warmup_loss_count == 0:
            raise RuntimeError(
                "dash: no labelled loss was observed during the warm-up; the loop must call "
                "observe_supervised(loss, step) every iteration"
            )
        return self.warmup_loss_sum / self.warmup_loss_count

    def rho(self, step: int, total_steps: int) -> float:
        """The loss threshold at ``step`` (only defined after the warm-up)."""
        updates = (step - self.warmup_steps(total_steps)) // self.rho_period(total_steps)
        return dash_rho(self.rho_hat(), updates, self.param("gamma"), self.param("C"), self.param("rho_min"))

    def observe_supervised(self, sup_loss: float, step: int) -> None:
        """Accumulate the labelled losses of the last steps of the warm-up; others are ignored.

        The warm-up length depends on total_steps, which only ``unlabelled_loss`` is told; it is kept in
        the state. Losses observed before the first ``unlabelled_loss`` call are held and filtered there.
        """
        if not math.isfinite(sup_loss):
            raise ValueError(f"dash: the labelled loss at step {step} is not finite ({sup_loss})")
        if self.warmup_length < 0:
            self._provisional.append((step, float(sup_loss)))
            return
        window_start = self.warmup_length - self.rho_window(self.warmup_length)
        if window_start <= step < self.warmup_length:
            self.warmup_loss_sum += float(sup_loss)
            self.warmup_loss_count += 1

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
        self._check_steps(step, total_steps)
        warmup = self.warmup_steps(total_steps)
        if self.warmup_length < 0:
            start = warmup - self.rho_window(warmup)
            kept = [loss for s, loss in self._provisional if start <= s < warmup]
            self.warmup_loss_sum += sum(kept)
            self.warmup_loss_count += len(kept)
            self._provisional.clear()
        self.warmup_length = warmup
        logits_w = logits_w.detach().float()
        if step < warmup:
            return UnlabelledOutput(
                loss=zero_loss(logits_s),
                mask=torch.zeros(logits_w.shape[0], device=logits_w.device),
                pseudo_labels=logits_w.argmax(dim=-1),
                logs={"mask_rate": 0.0, "warmup": 1.0},
            )
        rho = self.rho(step, total_steps)
        hard = rho <= self.param("rho_min")
        targets = pseudo_targets(logits_w, hard, self.cfg.temperature)
        mask = (soft_cross_entropy(logits_w, targets) <= rho).float()
        consistency = masked_consistency_loss(logits_s.float(), targets, mask)
        return UnlabelledOutput(
            loss=self.lambda_u * consistency,
            mask=mask,
            pseudo_labels=hard_labels(targets),
            logs={
                "mask_rate": float(mask.mean()),
                "threshold": rho,
                "unsup_loss": float(consistency.detach()),
                "hard_label": float(hard),
                "warmup": 0.0,
            },
        )
