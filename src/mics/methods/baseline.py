"""The semi-supervised baselines' training: one loop for every algorithm in ``mics.methods.ssl``.

Same backbone as MICS's WLI encoder (same size preset, random init) with a linear head, an EMA copy for
evaluation, and the same number of optimiser iterations as MICS's pre-training + fine-tuning combined.
``standard`` way: strong view = RandAugment of the same image; ``multimodal`` way: strong view = the weakly
augmented partner image (NBI / second modality). Evaluation uses modality A only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mics.config import ModelConfig, RunConfig, SSLConfig
from mics.data.views import strong, to_float, weak
from mics.engine import distributed as dist
from mics.engine.train import BatchFn, StepInfo
from mics.methods.budget import finetune_steps_per_epoch, pretrain_steps_per_epoch
from mics.methods.finetune import Prediction
from mics.methods.pretrain import build_encoder, cycled_order, labelled_order
from mics.methods.ssl import SSLAlgorithm
from mics.models.heads import Classifier

Way = Literal["standard", "multimodal"]


class SSLTraining(nn.Module):
    """Backbone + linear head trained with a labelled loss and an algorithm's unlabelled loss."""

    def __init__(
        self, model: ModelConfig, image_size: int, num_classes: int, algorithm: SSLAlgorithm
    ) -> None:
        super().__init__()
        self.backbone = build_encoder(model, image_size)
        self.head = Classifier(model.width, num_classes)
        self.algorithm = algorithm
        self.num_classes = num_classes

    def ema_decay(self, base: float, ema_module: nn.Module) -> float:
        """The evaluated EMA's decay this step (HABIT adapts it; the others keep ``base``)."""
        return self.algorithm.ema_decay(base, self, ema_module)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> CLS features [B, D]."""
        return self.backbone(x)[:, 0]

    def forward(self, batch: dict[str, torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        x_l, y_l = batch["x_l"], batch["y_l"]
        if "x_u_w" not in batch:
            sup = self.algorithm.supervised_loss(self.head(self.features(x_l)), y_l)
            self.algorithm.observe_supervised(float(sup.detach()), info.step)
            return sup, {"l_sup": sup.detach()}
        x_u_w, x_u_s, idx_u = batch["x_u_w"], batch["x_u_s"], batch["idx_u"]
        algo = self.algorithm
        # the weak view only makes targets: a forward pass without a graph costs a third of one with it
        with torch.no_grad():
            feats_w = self.features(x_u_w)
            logits_w = self.head(feats_w)
        if algo.mixes_inputs:
            x_l, y_l, x_u_w, x_u_s = algo.mix_batch(
                x_l, y_l, x_u_w, x_u_s, logits_w, info.generator, idx_u=idx_u
            )
        n_l = x_l.shape[0]
        feats = self.features(torch.cat([x_l, x_u_s]))
        logits = self.head(feats)
        sup = algo.supervised_loss(logits[:n_l], y_l)
        algo.observe_supervised(float(sup.detach()), info.step)
        out = algo.unlabelled_loss(
            logits_w,
            logits[n_l:],
            idx_u,
            info.step,
            info.total_steps,
            feats_w=feats_w,
            feats_s=feats[n_l:],
            classifier=self.head if algo.needs_classifier else None,
        )
        logs: dict[str, Any] = {
            "l_sup": sup.detach(),
            "l_unsup": out.loss.detach(),
            "mask_rate": out.mask.float().mean().detach(),
        }
        if "y_u" in batch:  # pseudo-label accuracy on the unlabelled batch: monitoring only, never trained on
            logs["pseudo_acc"] = (out.pseudo_labels == batch["y_u"]).float().mean().detach()
        logs.update({k: v for k, v in out.logs.items() if k not in logs})
        return sup + out.loss, logs

    uses_partner = False  # evaluated on modality A alone, whatever way it was trained

    @torch.no_grad()
    def predict(self, a: torch.Tensor, b: torch.Tensor | None = None) -> Prediction:
        """Probabilities [B, C], uncertainty 1 - max probability [B] and features [B, D] of modality A."""
        feats = self.features(a).float()
        probs = self.head(feats).float().softmax(dim=-1)
        return Prediction(probs, 1.0 - probs.max(dim=-1).values, feats)


def ssl_iterations(cfg: RunConfig, n_train: int, n_labelled: int) -> int:
    """The baselines' budget: SSLConfig.iterations if set, else MICS's pre-training + fine-tuning steps."""
    if cfg.ssl.iterations > 0:
        return cfg.ssl.iterations
    return cfg.pretrain.epochs * pretrain_steps_per_epoch(
        cfg, n_train
    ) + cfg.finetune.epochs * finetune_steps_per_epoch(cfg, n_labelled)


def ssl_batches(
    arrays_a: np.ndarray,
    arrays_b: np.ndarray,
    labels: np.ndarray,
    labelled: np.ndarray,
    unlabelled: np.ndarray,
    cfg: SSLConfig,
    way: Way,
    steps_per_epoch: int,
    device: torch.device,
    seed: int,
    use_unlabelled: bool = True,
    balance: str = "none",
) -> BatchFn:
    """Per step: B labelled weak views, and uratio*B unlabelled (weak, strong) views with their indices into
    ``unlabelled``. Each stream cycles through fresh seeded permutations (the labelled one draws
    class-balanced with ``balance="sampler"``, as MICS's fine-tuning does)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    # SSLConfig.batch_size is the global labelled batch, as pre-training's and fine-tuning's are
    b_l = cfg.batch_size // dist.world_size()
    b_u = b_l * cfg.uratio
    positions = np.arange(len(unlabelled))

    def stream(indices: np.ndarray, batch: int, tag: str, epoch: int) -> torch.Tensor:
        return cycled_order(indices, seed, f"{tag}.{epoch}", steps_per_epoch * batch)

    def load(arrays: np.ndarray, sel: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arrays[sel])).to(device)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order_l = labelled_order(labelled, labels, seed, f"l.{epoch}", steps_per_epoch * b_l, balance)
        order_u = stream(positions, b_u, "u", epoch) if use_unlabelled else None
        for i in range(steps_per_epoch):
            sel_l = order_l[i * b_l : (i + 1) * b_l].numpy()
            batch = {
                "x_l": to_float(weak(load(arrays_a, sel_l), generator)),
                "y_l": labels_t[sel_l].to(device),
            }
            if order_u is not None:
                pos = order_u[i * b_u : (i + 1) * b_u].numpy()
                sel_u = unlabelled[pos]
                u_a = load(arrays_a, sel_u)
                batch["x_u_w"] = to_float(weak(u_a, generator))
                if way == "standard":
                    batch["x_u_s"] = to_float(strong(u_a, cfg.randaugment_ops, cfg.randaugment_magnitude))
                else:
                    batch["x_u_s"] = to_float(weak(load(arrays_b, sel_u), generator))
                batch["idx_u"] = torch.from_numpy(pos).to(device)
                batch["y_u"] = labels_t[sel_u].to(device)
            yield batch

    return batches
