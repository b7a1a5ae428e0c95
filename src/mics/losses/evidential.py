"""Uncertainty-based evidential fusion (MICS Eq. 16-22), after TMC (Han et al., "Trusted Multi-View
Classification with Dynamic Evidential Fusion", TPAMI 2022).

Each view gives non-negative evidence e [B, C]; the Dirichlet alpha = e + 1 defines a subjective
opinion (belief b = e / S, uncertainty u = C / S, S = sum alpha) with sum(b) + u = 1. Opinions of two
views are merged with the reduced Dempster-Shafer rule and the result is mapped back to a Dirichlet.
The per-view loss is TMC's: the expected cross-entropy under the Dirichlet plus an annealed KL term that
pushes the evidence of the wrong classes to zero (MICS Eq. 21-22 print these with the wrong signs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mics.losses._validation import check_float_matrix, check_values, upcast

__all__ = [
    "EvidentialLoss",
    "Opinion",
    "annealing_coefficient",
    "combine_opinions",
    "ds_combine",
    "evidential_loss",
    "kl_dirichlet_uniform",
    "opinion_from_alpha",
    "opinion_from_evidence",
]


@dataclass
class Opinion:
    """A subjective opinion over C classes and its Dirichlet: belief [B, C], uncertainty [B, 1],
    alpha [B, C], strength S = sum(alpha) [B, 1]."""

    belief: Tensor
    uncertainty: Tensor
    alpha: Tensor
    strength: Tensor


def _check_classes(name: str, x: Tensor) -> None:
    check_float_matrix(name, x)
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {tuple(x.shape)}")


def _check_alpha(alpha: Tensor, name: str = "alpha") -> None:
    _check_classes(name, alpha)
    if check_values() and not (alpha >= 1).all():
        raise ValueError(f"{name} must be >= 1 everywhere (alpha = evidence + 1, evidence >= 0)")


def opinion_from_alpha(alpha: Tensor) -> Opinion:
    """Opinion of Dirichlet parameters alpha [B, C] (>= 1); computed in at least float32."""
    _check_alpha(alpha)
    alpha = upcast(alpha)
    strength = alpha.sum(dim=1, keepdim=True)
    return Opinion(
        belief=(alpha - 1) / strength,
        uncertainty=alpha.shape[1] / strength,
        alpha=alpha,
        strength=strength,
    )


def opinion_from_evidence(evidence: Tensor) -> Opinion:
    """Opinion of non-negative evidence [B, C] (e.g. softplus of logits): alpha = e + 1."""
    _check_classes("evidence", evidence)
    if check_values() and not (evidence >= 0).all():
        raise ValueError("evidence must be non-negative (use softplus/relu/exp on the logits)")
    return opinion_from_alpha(upcast(evidence) + 1)


def ds_combine(alpha1: Tensor, alpha2: Tensor) -> Tensor:
    """Reduced Dempster-Shafer combination of two Dirichlet opinions: alpha1, alpha2 [B, C] -> alpha [B, C].

    K = sum_{i != j} b1_i b2_j ; b = (b1 b2 + b1 u2 + b2 u1) / (1 - K) ; u = u1 u2 / (1 - K) ;
    S = C / u ; alpha = b S + 1.
    """
    _check_alpha(alpha1, "alpha1")
    _check_alpha(alpha2, "alpha2")
    if alpha1.shape != alpha2.shape:
        raise ValueError(f"alpha1 {tuple(alpha1.shape)} and alpha2 {tuple(alpha2.shape)} differ in shape")
    o1, o2 = opinion_from_alpha(alpha1), opinion_from_alpha(alpha2)
    b1, u1, b2, u2 = o1.belief, o1.uncertainty, o2.belief, o2.uncertainty
    # sum_{i,j} b1_i b2_j = (1 - u1)(1 - u2), so 1 - K = u1 + u2 - u1 u2 + <b1, b2>: non-negative terms
    # that stay positive, where 1 - K itself rounds to 0 (then 0 / 0) for two confident conflicting views.
    agreement = (b1 * b2).sum(dim=1, keepdim=True)
    one_minus_conflict = u1 + u2 - u1 * u2 + agreement
    belief = (b1 * b2 + b1 * u2 + b2 * u1) / one_minus_conflict
    uncertainty = u1 * u2 / one_minus_conflict
    strength = alpha1.shape[1] / uncertainty
    return belief * strength + 1


def combine_opinions(alphas: Sequence[Tensor]) -> Tensor:
    """Fold :func:`ds_combine` over the views left to right: ((a1 + a2) + a3) + ... -> alpha [B, C]."""
    if len(alphas) == 0:
        raise ValueError("combine_opinions needs at least one opinion")
    combined = alphas[0]
    _check_alpha(combined, "alphas[0]")
    combined = upcast(combined)
    for alpha in alphas[1:]:
        combined = ds_combine(combined, alpha)
    return combined


def kl_dirichlet_uniform(alpha: Tensor) -> Tensor:
    """KL(Dir(alpha) || Dir(1, ..., 1)) per sample: alpha [B, C] -> [B].

    = lgamma(S) - sum_k lgamma(alpha_k) - lgamma(C) + sum_k (alpha_k - 1)(digamma(alpha_k) - digamma(S)).
    """
    _check_classes("alpha", alpha)
    if check_values() and not (alpha > 0).all():
        raise ValueError("alpha must be positive")
    # lgamma/digamma of bf16 inputs are far too coarse for a loss
    alpha = upcast(alpha)
    num_classes = alpha.shape[1]
    strength = alpha.sum(dim=1)
    log_norm = torch.lgamma(strength) - torch.lgamma(alpha).sum(dim=1)
    log_norm_uniform = torch.lgamma(alpha.new_tensor(float(num_classes)))
    expected_log = ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength)[:, None])).sum(dim=1)
    return log_norm - log_norm_uniform + expected_log


def _check_target(target: Tensor, batch: int, num_classes: int) -> None:
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] != batch:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must be class indices of shape [{batch}], got {shape}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got {target.dtype}")
    if check_values() and not ((target >= 0) & (target < num_classes)).all():
        raise ValueError(f"target class indices must lie in [0, {num_classes})")


def evidential_loss(alpha: Tensor, target: Tensor, lambda_t: float, weight: Tensor | None = None) -> Tensor:
    """TMC's loss of one view, averaged over the batch (weighted by ``weight`` [B] >= 0 if given:
    sum_i w_i l_i / sum_i w_i, as cross-entropy with class weights).

    alpha: [B, C] Dirichlet parameters (>= 1); target: [B] class indices; lambda_t >= 0: KL weight.
    Per sample: sum_k y_k (digamma(S) - digamma(alpha_k)) + lambda_t KL(Dir(alpha~) || Dir(1)),
    alpha~ = y + (1 - y) alpha (the target's evidence removed, so only misleading evidence is penalised).
    """
    _check_alpha(alpha)
    if alpha.shape[0] == 0:
        raise ValueError("alpha is empty: the batch mean of the loss is undefined")
    _check_target(target, alpha.shape[0], alpha.shape[1])
    if not isinstance(lambda_t, int | float) or not 0 <= float(lambda_t) < float("inf"):
        raise ValueError(f"lambda_t must be a finite number >= 0, got {lambda_t!r}")
    alpha = upcast(alpha)
    onehot = F.one_hot(target.long(), alpha.shape[1]).to(alpha.dtype)
    strength = alpha.sum(dim=1, keepdim=True)
    expected_ce = (onehot * (torch.digamma(strength) - torch.digamma(alpha))).sum(dim=1)
    misleading = onehot + (1 - onehot) * alpha
    per_sample = expected_ce + lambda_t * kl_dirichlet_uniform(misleading)
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight must be [{per_sample.shape[0]}], got {tuple(weight.shape)}")
    weight = weight.to(per_sample.dtype)
    return (weight * per_sample).sum() / weight.sum().clamp_min(1e-12)


def annealing_coefficient(epoch: int, annealing_epochs: int) -> float:
    """lambda_t = min(1, epoch / annealing_epochs); annealing_epochs = 0 means no annealing (1.0)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if annealing_epochs < 0:
        raise ValueError(f"annealing_epochs must be >= 0, got {annealing_epochs}")
    if annealing_epochs == 0:
        return 1.0
    return min(1.0, epoch / annealing_epochs)


class EvidentialLoss(nn.Module):
    """Module form of :func:`evidential_loss`; lambda_t is passed per call because it follows the epoch
    (see :func:`annealing_coefficient`)."""

    def forward(self, alpha: Tensor, target: Tensor, lambda_t: float, weight: Tensor | None = None) -> Tensor:
        return evidential_loss(alpha, target, lambda_t, weight)
