"""The contract between the semi-supervised baselines and the training loop.

One :class:`SSLAlgorithm` subclass per baseline turns the logits of a weak and a strong view of an
unlabelled batch into a per-sample mask (or weight), pseudo-labels and a loss, and keeps whatever
running state the method needs (class-wise learning status, EMA thresholds, loss histories). The loop
owns the model, the optimiser and the batches; per iteration it calls, in this order::

    x_l, y_l, x_u_w, x_u_s = algo.mix_batch(...)      # only where algo.mixes_inputs (after the weak pass)
    sup = algo.supervised_loss(logits_l, y_l)
    out = algo.unlabelled_loss(logits_w.detach(), logits_s, idx, step, total_steps, feats_w, feats_s,
                               classifier=head)         # feats/classifier only where the method needs them
    algo.observe_supervised(sup.item(), step)
    loss = sup + out.loss
    ...optimiser step...
    decay = algo.ema_decay(cfg.ema, model, ema_model)  # momentum of the evaluated EMA weights

``step`` is the 0-based index of the optimiser iteration and ``total_steps`` the number of iterations
of the run, so every schedule is a pure function of them and resumes exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mics.config import SSLConfig

Classifier = Callable[[Tensor], Tensor]


@dataclass
class UnlabelledOutput:
    """What one unlabelled batch contributes.

    loss: 0-dim, already weighted by lambda_u (and by any method-specific weights); carries the graph
        of ``logits_s`` (and of the classifier, for HABIT's feature compensation).
    mask: [B] float in [0, 1], the per-sample weight actually applied to the consistency loss.
    pseudo_labels: [B] long, the class each sample was pushed towards (argmax of a soft target).
    logs: scalar diagnostics, e.g. ``mask_rate`` and ``threshold``.
    """

    loss: Tensor
    mask: Tensor
    pseudo_labels: Tensor
    logs: dict[str, float] = field(default_factory=dict)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy for hard ([B] long) or soft ([B, C] probability) targets.

    logits: [B, C]. Returns [B].
    """
    log_p = F.log_softmax(logits, dim=-1)
    if targets.dim() == 1:
        return -log_p.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return -(targets * log_p).sum(dim=-1)


def masked_consistency_loss(logits_s: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over the whole batch of ``mask * CE(logits_s, targets)`` (FixMatch's form, USB's
    ``consistency_loss``): masked-out samples count in the denominator, so the loss shrinks with the mask
    rate instead of being renormalised by it.

    logits_s: [B, C]; targets: [B] long or [B, C] soft; mask: [B] float. Returns a 0-dim tensor.
    """
    return (soft_cross_entropy(logits_s, targets) * mask).mean()


class MaskedConsistencyLoss(nn.Module):
    """Module form of :func:`masked_consistency_loss` that validates its arguments."""

    def forward(self, logits_s: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        if logits_s.dim() != 2:
            raise ValueError(f"logits_s must be [B, C], got shape {tuple(logits_s.shape)}")
        batch, classes = logits_s.shape
        if targets.dim() == 1:
            if targets.shape[0] != batch or targets.is_floating_point():
                raise ValueError(f"hard targets must be [B]={batch} integers, got {tuple(targets.shape)}")
        elif targets.shape != logits_s.shape:
            raise ValueError(f"soft targets must be [B, C]={batch, classes}, got {tuple(targets.shape)}")
        if mask.shape != (batch,):
            raise ValueError(f"mask must be [B]={batch}, got {tuple(mask.shape)}")
        return masked_consistency_loss(logits_s, targets, mask)


def pseudo_targets(logits_w: Tensor, hard: bool, temperature: float) -> Tensor:
    """Hard argmax labels [B] or temperature-sharpened soft labels softmax(logits / T) [B, C]."""
    if hard:
        return logits_w.argmax(dim=-1)
    return torch.softmax(logits_w / temperature, dim=-1)


def hard_labels(targets: Tensor) -> Tensor:
    """[B] long from hard [B] or soft [B, C] targets."""
    return targets if targets.dim() == 1 else targets.argmax(dim=-1)


def last_occurrence(idx: Tensor) -> tuple[Tensor, Tensor]:
    """Unique dataset indices of a batch and the batch position of the last occurrence of each.

    Writing per-sample state through these makes "the last write wins" deterministic on every device
    (a plain ``state[idx] = values`` with repeated indices is not on CUDA).
    idx: [B] long. Returns (unique [U], positions [U]).
    """
    unique, inverse = torch.unique(idx, return_inverse=True)
    positions = torch.arange(idx.shape[0], device=idx.device)
    last = torch.full((unique.shape[0],), -1, dtype=torch.long, device=idx.device)
    last = last.scatter_reduce(0, inverse, positions, reduce="amax")
    return unique, last


def gather_across_ranks(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` along dim 0 over all DDP processes (USB's ``concat_all_gather``) so every
    process updates its running state from the same global batch; the identity outside a multi-process
    ``torch.distributed`` run. Batches of different sizes are padded for the exchange and trimmed again.
    No gradient flows through the result.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def zero_loss(logits_s: Tensor) -> Tensor:
    """A 0-dim zero that is still connected to ``logits_s`` so backward and DDP see every parameter."""
    return logits_s.sum() * 0.0


class SSLAlgorithm(ABC):
    """Base class of the baselines. Subclasses set ``name``, ``DEFAULTS`` (method parameters read from
    ``cfg.params`` by name) and the names of their state attributes, and implement ``unlabelled_loss``.

    Flags the loop reads:
      needs_features: pass ``feats_w`` / ``feats_s`` ([B, D] backbone features) to ``unlabelled_loss``.
      needs_classifier: pass ``classifier=`` (the classification head, [N, D] -> [N, C] logits) to
          ``unlabelled_loss``; HABIT feeds it synthetic features.
      mixes_inputs: call ``mix_batch`` after the weak-view forward pass and train on what it returns.
    """

    name: ClassVar[str] = "base"
    DEFAULTS: ClassVar[dict[str, float]] = {}
    TENSOR_STATE: ClassVar[tuple[str, ...]] = ()
    NUMBER_STATE: ClassVar[tuple[str, ...]] = ()
    needs_features: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    mixes_inputs: ClassVar[bool] = False

    def __init__(self, num_classes: int, num_unlabelled: int, cfg: SSLConfig) -> None:
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be at least 2, got {num_classes}")
        if num_unlabelled < 0:
            raise ValueError(f"{self.name}: num_unlabelled must be non-negative, got {num_unlabelled}")
        if cfg.lambda_u < 0:
            raise ValueError(f"{self.name}: lambda_u must be non-negative, got {cfg.lambda_u}")
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"{self.name}: threshold must lie in (0, 1], got {cfg.threshold}")
        if cfg.temperature <= 0:
            raise ValueError(f"{self.name}: temperature must be positive, got {cfg.temperature}")
        self.num_classes = num_classes
        self.num_unlabelled = num_unlabelled
        self.cfg = cfg
        self.lambda_u = float(cfg.lambda_u)
        self.params = {key: float(cfg.params.get(key, default)) for key, default in self.DEFAULTS.items()}
        # inverse-frequency weights [C] of the labelled loss (data.class_balance="reweight");
        # None = plain mean
        self.class_weights: Tensor | None = None

    def param(self, key: str) -> float:
        """The method parameter ``key``: ``cfg.params[key]`` if given, else the documented default."""
        return self.params[key]

    def flag(self, key: str) -> bool:
        """A boolean method parameter (stored as 0.0 / 1.0 in ``cfg.params``)."""
        return self.params[key] != 0.0

    def supervised_loss(self, logits_l: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the labelled batch. logits_l: [B, C]; y: [B] long. Returns 0-dim."""
        if logits_l.dim() != 2 or logits_l.shape[1] != self.num_classes:
            raise ValueError(f"logits_l must be [B, {self.num_classes}], got {tuple(logits_l.shape)}")
        if y.shape != logits_l.shape[:1] or y.is_floating_point():
            raise ValueError(
                f"y must be [B]={logits_l.shape[0]} class indices, got {tuple(y.shape)} {y.dtype}"
            )
        weight = None if self.class_weights is None else self.class_weights.to(logits_l.device)
        return F.cross_entropy(logits_l.float(), y.long(), weight=weight)

    @abstractmethod
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
        """Mask, pseudo-labels and the weighted unlabelled loss of one batch; updates the running state.

        logits_w: [B, C] weak-view logits (detached here in any case); logits_s: [B, C] strong-view logits
        (with grad); idx: [B] long positions of the samples in the unlabelled set; feats_*: [B, D].
        """

    def observe_supervised(self, sup_loss: float, step: int) -> None:  # noqa: B027 (optional hook)
        """Told the labelled loss of every iteration; only Dash uses it (its warm-up estimate of rho)."""

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
        """Input-level augmentation across the labelled and unlabelled sets; the identity by default.

        x_*: [B, 3, H, W] normalised float images; y_l: [B_l] long; logits_u_w: [B_u, C] weak logits;
        idx_u: [B_u] unlabelled indices. Returns (x_l, y_l, x_u_w, x_u_s) to train on.
        """
        return x_l, y_l, x_u_w, x_u_s

    def ema_decay(self, base: float, model: nn.Module, ema_model: nn.Module) -> float:
        """Momentum for this iteration's update of the evaluated EMA weights; ``base`` by default."""
        return base

    def state_dict(self) -> dict[str, Tensor | float | int]:
        """Everything needed to resume exactly: CPU tensor copies and plain numbers."""
        state: dict[str, Tensor | float | int] = {}
        for key in self.TENSOR_STATE:
            state[key] = getattr(self, key).detach().cpu().clone()
        for key in self.NUMBER_STATE:
            state[key] = getattr(self, key)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; key, shape and dtype mismatches raise ``ValueError``."""
        expected = set(self.TENSOR_STATE) | set(self.NUMBER_STATE)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"{self.name} state: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
            )
        for key in self.TENSOR_STATE:
            current, value = getattr(self, key), state[key]
            if not isinstance(value, Tensor) or value.shape != current.shape or value.dtype != current.dtype:
                got = (
                    f"{tuple(value.shape)} {value.dtype}"
                    if isinstance(value, Tensor)
                    else type(value).__name__
                )
                raise ValueError(
                    f"{self.name} state {key!r}: expected a {tuple(current.shape)} {current.dtype} tensor, "
                    f"got {got}"
                )
            setattr(self, key, value.detach().clone().to(current.device))
        for key in self.NUMBER_STATE:
            value = state[key]
            if isinstance(value, Tensor):
                value = value.item()
            setattr(self, key, type(getattr(self, key))(value))

    def _to_device(self, device: torch.device) -> None:
        """Move the state tensors lazily to the device of the logits they are combined with."""
        for key in self.TENSOR_STATE:
            tensor = getattr(self, key)
            if tensor.device != device:
                setattr(self, key, tensor.to(device))

    def _check_logits(self, logits_w: Tensor, logits_s: Tensor, idx: Tensor) -> None:
        if logits_w.dim() != 2 or logits_w.shape[1] != self.num_classes:
            raise ValueError(f"logits_w must be [B, {self.num_classes}], got {tuple(logits_w.shape)}")
        if logits_s.shape != logits_w.shape:
            raise ValueError(
                f"logits_s must match logits_w {tuple(logits_w.shape)}, got {tuple(logits_s.shape)}"
            )
        if idx.shape != logits_w.shape[:1] or idx.is_floating_point():
            raise ValueError(
                f"idx must be [B]={logits_w.shape[0]} integers, got {tuple(idx.shape)} {idx.dtype}"
            )

    def _check_index_range(self, idx: Tensor) -> None:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_unlabelled):
            raise ValueError(
                f"{self.name}: idx must lie in [0, {self.num_unlabelled}), "
                f"got [{int(idx.min())}, {int(idx.max())}]"
            )

    def _check_steps(self, step: int, total_steps: int) -> None:
        if total_steps < 1 or not 0 <= step < total_steps:
            raise ValueError(f"step must lie in [0, total_steps), got step={step}, total_steps={total_steps}")
