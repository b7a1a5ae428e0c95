"""Stage 3, multimodal fusion fine-tuning with distribution-shifted features (Eq. 15) and
uncertainty-based evidential fusion (TMC, Eq. 16-22)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mics.config import FinetuneConfig, ModelConfig, SVDConfig
from mics.data.views import to_float, weak
from mics.engine.train import BatchFn, StepInfo
from mics.losses.evidential import (
    annealing_coefficient,
    combine_opinions,
    evidential_loss,
    opinion_from_alpha,
)
from mics.methods.pretrain import build_encoder, cycled_order
from mics.methods.svd import ShiftDictionary
from mics.models.fusion import FusionEncoder
from mics.models.heads import Classifier, EvidentialHead


@dataclass
class Prediction:
    probs: torch.Tensor  # [B, C] expected class probabilities (alpha / S with TMC, softmax otherwise)
    uncertainty: torch.Tensor  # [B] TMC uncertainty u = C / S in [0, 1] (1 - max prob without TMC)
    features: torch.Tensor  # [B, D] the feature the classifier sees (fused, or WLI-only)


class FusionFinetuning(nn.Module):
    """f_theta + f_phi (from pre-training) -> fusion encoder f_M -> classifier, with SVD shifts and
    evidential heads on the WLI, NBI and fused views. Ablation switches follow Table IV."""

    def __init__(
        self, model: ModelConfig, cfg: FinetuneConfig, svd: SVDConfig, image_size: int, num_classes: int
    ) -> None:
        super().__init__()
        self.cfg, self.svd_cfg, self.num_classes = cfg, svd, num_classes
        self.enc_a = build_encoder(model, image_size)
        if cfg.use_nbi:
            self.enc_b = build_encoder(model, image_size)
            self.fusion = FusionEncoder(model.width, model.fusion_depth, model.heads, model.mlp_ratio)
        self.classifier = Classifier(model.width, num_classes)
        if cfg.use_tmc:
            self.evidence_a = EvidentialHead(model.width, num_classes)
            self.evidence_f = EvidentialHead(model.width, num_classes)
            if cfg.use_nbi:
                self.evidence_b = EvidentialHead(model.width, num_classes)
        self.dict_a: ShiftDictionary | None = None
        self.dict_b: ShiftDictionary | None = None

    @property
    def uses_partner(self) -> bool:
        """Whether prediction needs the modality-B image."""
        return self.cfg.use_nbi

    def set_dictionaries(self, dict_a: ShiftDictionary, dict_b: ShiftDictionary | None) -> None:
        # kept as buffers so they travel with .to(device) and land in checkpoints
        self.register_buffer("svd_a_prototypes", dict_a.prototypes.clone())
        self.register_buffer("svd_a_shifts", dict_a.shifts.clone())
        if dict_b is not None:
            self.register_buffer("svd_b_prototypes", dict_b.prototypes.clone())
            self.register_buffer("svd_b_shifts", dict_b.shifts.clone())

    def _dictionary(self, which: str) -> ShiftDictionary | None:
        protos = getattr(self, f"svd_{which}_prototypes", None)
        if protos is None:
            return None
        return ShiftDictionary(protos, getattr(self, f"svd_{which}_shifts"))

    def encode(self, a: torch.Tensor, b: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """a, b: [B, 3, H, W] -> CLS features ``cls_a``, ``cls_b`` [B, D] and fused feature ``z`` [B, D]."""
        tokens_a = self.enc_a(a)
        out = {"cls_a": tokens_a[:, 0]}
        if self.cfg.use_nbi:
            if b is None:
                raise ValueError("this model fuses two modalities: give the partner image")
            tokens_b = self.enc_b(b)
            out["cls_b"] = tokens_b[:, 0]
            out["z"] = self.fusion(tokens_a, tokens_b)[:, 0]
        else:
            out["z"] = out["cls_a"]
        return out

    def opinions(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Dirichlet parameters alpha [B, C] of each view: WLI, NBI (if used), fused."""
        alphas = [self.evidence_a(feats["cls_a"]) + 1]
        if self.cfg.use_nbi:
            alphas.append(self.evidence_b(feats["cls_b"]) + 1)
        alphas.append(self.evidence_f(feats["z"]) + 1)
        return alphas

    def forward(self, batch: dict[str, torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        y = batch["y"]
        feats = self.encode(batch["a"], batch.get("b"))
        z = feats["z"]
        l_f = F.cross_entropy(self.classifier(z), y, label_smoothing=self.cfg.label_smoothing)
        logs: dict[str, Any] = {"l_ce": l_f.detach()}
        if self.cfg.use_svd:
            for which, key in (("a", "cls_a"), ("b", "cls_b")):
                dictionary = self._dictionary(which)
                if dictionary is None or key not in feats:
                    continue
                shift = dictionary.sample(feats[key].detach(), self.svd_cfg.prototype, info.generator)
                l_shift = F.cross_entropy(
                    self.classifier(z + shift), y, label_smoothing=self.cfg.label_smoothing
                )
                l_f = l_f + l_shift
                logs[f"l_shift_{which}"] = l_shift.detach()
        loss = l_f
        if self.cfg.use_tmc:
            lam = annealing_coefficient(info.epoch + 1, self.cfg.annealing_epochs)
            alphas = self.opinions(feats)
            l_views = torch.stack([evidential_loss(alpha, y, lam) for alpha in alphas[:-1]]).sum()
            l_fuse = evidential_loss(combine_opinions(alphas), y, lam)
            loss = loss + l_views + l_fuse
            logs.update(l_views=l_views.detach(), l_fuse=l_fuse.detach())
        return loss, logs

    @torch.no_grad()
    def predict(self, a: torch.Tensor, b: torch.Tensor | None) -> Prediction:
        """Class probabilities and uncertainty; with TMC the argmax of the combined opinion is the class."""
        feats = self.encode(a, b)
        if self.cfg.use_tmc:
            op = opinion_from_alpha(combine_opinions(self.opinions(feats)))
            probs = op.alpha / op.strength
            return Prediction(probs.float(), op.uncertainty.squeeze(-1).float(), feats["z"].float())
        probs = self.classifier(feats["z"]).float().softmax(dim=-1)
        return Prediction(probs, 1.0 - probs.max(dim=-1).values, feats["z"].float())


def labelled_batches(
    arrays_a: np.ndarray,
    arrays_b: np.ndarray | None,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    steps_per_epoch: int,
    device: torch.device,
    seed: int,
) -> BatchFn:
    """``steps_per_epoch`` batches of weakly augmented labelled pairs ``{"a", "b", "y"}`` per epoch, cycling
    through fresh permutations when the labelled set is smaller than an epoch needs."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        # enough for this rank's steps: a rank's share of one permutation is 1 / world of it
        order = cycled_order(indices, seed, str(epoch), steps_per_epoch * batch_size)
        for i in range(steps_per_epoch):
            sel = order[i * batch_size : (i + 1) * batch_size].numpy()
            a = torch.from_numpy(np.ascontiguousarray(arrays_a[sel])).to(device)
            batch = {"a": to_float(weak(a, generator)), "y": labels_t[sel].to(device)}
            if arrays_b is not None:
                b = torch.from_numpy(np.ascontiguousarray(arrays_b[sel])).to(device)
                batch["b"] = to_float(weak(b, generator))
            yield batch

    return batches
