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

from mics.config import ConfigError, FinetuneConfig, ModelConfig, SVDConfig
from mics.data.views import to_float, weak, weak_pair
from mics.engine.train import BatchFn, StepInfo
from mics.losses.evidential import (
    annealing_coefficient,
    combine_opinions,
    evidential_loss,
    opinion_from_alpha,
)
from mics.methods.pretrain import build_encoder, labelled_order
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

    class_weights: torch.Tensor  # buffer [C]

    def __init__(
        self, model: ModelConfig, cfg: FinetuneConfig, svd: SVDConfig, image_size: int, num_classes: int
    ) -> None:
        super().__init__()
        if not cfg.head_lr_mult > 0:
            raise ConfigError(f"finetune.head_lr_mult must be positive, got {cfg.head_lr_mult}")
        self.cfg, self.svd_cfg, self.num_classes = cfg, svd, num_classes
        self.enc_a = build_encoder(model, image_size)
        if cfg.use_nbi:
            self.enc_b = build_encoder(model, image_size)
            self.fusion = FusionEncoder(model.width, model.fusion_depth, model.heads, model.mlp_ratio)
        self.classifier = Classifier(model.width, num_classes)
        if cfg.use_tmc:
            self.evidence_a = EvidentialHead(model.width, num_classes)
            if cfg.fused_evidence == "head":
                self.evidence_f = EvidentialHead(model.width, num_classes)
            if cfg.use_nbi:
                self.evidence_b = EvidentialHead(model.width, num_classes)
        # per-class weights of the labelled losses (data.class_balance="reweight"); ones = unweighted
        self.register_buffer("class_weights", torch.ones(num_classes))

    def lr_scale(self, name: str) -> float:
        """Learning-rate factor of parameter ``name``: 1 for the pre-trained encoders, ``head_lr_mult`` for
        the layers fine-tuning adds (fusion encoder, classifier, evidence heads)."""
        return 1.0 if name.startswith(("enc_a.", "enc_b.")) else self.cfg.head_lr_mult

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

    def opinions(
        self, feats: dict[str, torch.Tensor], logits: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Dirichlet parameters alpha [B, C] of each view: WLI, NBI (if used), fused. The fused view's
        evidence is softplus of the Eq. 15 classifier's ``logits`` [B, C] (computed when not given), or,
        with ``fused_evidence="head"``, of a separate head."""
        alphas = [self.evidence_a(feats["cls_a"]) + 1]
        if self.cfg.use_nbi:
            alphas.append(self.evidence_b(feats["cls_b"]) + 1)
        if self.cfg.fused_evidence == "head":
            alphas.append(self.evidence_f(feats["z"]) + 1)
        else:
            if logits is None:
                logits = self.classifier(feats["z"])
            alphas.append(F.softplus(logits.float()) + 1)
        return alphas

    def shift(
        self, which: str, feats: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> torch.Tensor | None:
        """One sampled shift [B, D] per sample from modality ``which``'s dictionary (None without one), its
        cluster chosen by that modality's own feature; with ``svd.calibrate="fused"`` rescaled by
        mean ||z^f|| / mean ||feature|| so it keeps its size relative to the feature it was estimated on."""
        dictionary, key = self._dictionary(which), f"cls_{which}"
        if dictionary is None or key not in feats:
            return None
        own = feats[key].detach()
        s = dictionary.sample(own, self.svd_cfg.prototype, generator)
        if self.svd_cfg.calibrate == "fused":
            ratio = feats["z"].detach().float().norm(dim=1).mean() / own.float().norm(dim=1).mean().clamp_min(
                1e-8
            )
            s = s * ratio.to(s.dtype)
        return s

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # weights of ones give the plain batch mean
        return F.cross_entropy(
            logits.float(), y, weight=self.class_weights, label_smoothing=self.cfg.label_smoothing
        )

    def forward(self, batch: dict[str, torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        y = batch["y"]
        feats = self.encode(batch["a"], batch.get("b"))
        z = feats["z"]
        logits = self.classifier(z)
        l_f = self._ce(logits, y)
        logs: dict[str, Any] = {"l_ce": l_f.detach()}
        if self.cfg.use_svd:
            z_norm = z.detach().float().norm(dim=1).mean().clamp_min(1e-8)
            for which in ("a", "b"):
                s = self.shift(which, feats, info.generator)
                if s is None:
                    continue
                l_shift = self._ce(self.classifier(z + s), y)
                l_f = l_f + l_shift
                logs[f"l_shift_{which}"] = l_shift.detach()
                # how large the simulated shift is next to the feature it moves (issue: scale matching)
                logs[f"shift_ratio_{which}"] = (s.detach().float().norm(dim=1).mean() / z_norm).detach()
        loss = l_f
        if self.cfg.use_tmc:
            lam = annealing_coefficient(info.epoch + 1, self.cfg.annealing_epochs)
            alphas = self.opinions(feats, logits)
            # ETMC: every view gets the loss; the first version left the separate fused head without one
            views = alphas if self.cfg.fused_evidence == "classifier" else alphas[:-1]
            weight = self.class_weights[y]
            l_views = torch.stack([evidential_loss(alpha, y, lam, weight) for alpha in views]).sum()
            l_fuse = evidential_loss(combine_opinions(alphas), y, lam, weight)
            loss = loss + l_views + l_fuse
            logs.update(l_views=l_views.detach(), l_fuse=l_fuse.detach())
        return loss, logs

    @torch.no_grad()
    def predict(self, a: torch.Tensor, b: torch.Tensor | None) -> Prediction:
        """Class probabilities and uncertainty. With TMC, u is the combined opinion's uncertainty and the
        probabilities are its expected ones (``predict_from="combined"``) or the classifier's softmax
        (``predict_from="classifier"``); without TMC, softmax and u = 1 - max probability."""
        feats = self.encode(a, b)
        logits = self.classifier(feats["z"])
        softmax = logits.float().softmax(dim=-1)
        if self.cfg.use_tmc:
            op = opinion_from_alpha(combine_opinions(self.opinions(feats, logits)))
            probs = op.alpha / op.strength if self.cfg.predict_from == "combined" else softmax
            return Prediction(probs.float(), op.uncertainty.squeeze(-1).float(), feats["z"].float())
        return Prediction(softmax, 1.0 - softmax.max(dim=-1).values, feats["z"].float())


def labelled_batches(
    arrays_a: np.ndarray,
    arrays_b: np.ndarray | None,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    steps_per_epoch: int,
    device: torch.device,
    seed: int,
    balance: str = "none",
    shared_aug: bool = False,
) -> BatchFn:
    """``steps_per_epoch`` batches of weakly augmented labelled pairs ``{"a", "b", "y", "index"}`` per epoch,
    cycling through fresh permutations when the labelled set is smaller than an epoch needs (or, with
    ``balance="sampler"``, class-balanced draws). ``shared_aug``: one flip/crop for both images of a pair."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        # enough for this rank's steps: a rank's share of one permutation is 1 / world of it
        order = labelled_order(indices, labels, seed, str(epoch), steps_per_epoch * batch_size, balance)
        for i in range(steps_per_epoch):
            sel = order[i * batch_size : (i + 1) * batch_size].numpy()
            a = torch.from_numpy(np.ascontiguousarray(arrays_a[sel])).to(device)
            batch = {"y": labels_t[sel].to(device), "index": torch.from_numpy(sel)}
            if arrays_b is not None:
                b = torch.from_numpy(np.ascontiguousarray(arrays_b[sel])).to(device)
                view_a, view_b = weak_pair(a, b, generator, shared=shared_aug)
                batch["a"], batch["b"] = to_float(view_a), to_float(view_b)
            else:
                batch["a"] = to_float(weak(a, generator))
            yield batch

    return batches
