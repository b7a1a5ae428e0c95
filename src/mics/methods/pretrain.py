"""Stage 1, synergistic pre-training (METHOD.md Eq. 1-9): consistency + reconstruction + alignment.

Labels are never used: every training-split pair feeds this stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from mics.config import ModelConfig, PretrainConfig
from mics.data.views import to_float, weak_pair
from mics.engine import distributed as dist
from mics.engine.train import BatchFn, StepInfo, derive_seed
from mics.losses.alignment import info_nce
from mics.losses.consistency import momentum_distilled_contrastive
from mics.losses.reconstruction import masked_reconstruction
from mics.models.decoder import SharedDecoder
from mics.models.heads import GlobalEmbedding, Projection
from mics.models.momentum import FeatureQueue, momentum_copy, momentum_update
from mics.models.vit import ViTEncoder


def build_encoder(model: ModelConfig, image_size: int) -> ViTEncoder:
    """One modality's encoder; both modalities use this architecture with separate weights."""
    return ViTEncoder(
        img_size=image_size,
        patch_size=model.patch_size,
        width=model.width,
        depth=model.depth,
        heads=model.heads,
        mlp_ratio=model.mlp_ratio,
        drop_path=model.drop_path,
    )


def queue_length(requested: int, n_train: int, global_batch: int) -> int:
    """K: at most the requested size and the data set, a multiple of the global batch, at least one batch."""
    k = min(requested, n_train)
    return max(global_batch, (k // global_batch) * global_batch)


class SynergisticPretraining(nn.Module):
    """Two encoders f_theta (modality A, WLI) and f_phi (modality B, NBI) trained with
    L_pre = a_dis * L_cons + a_res * L_res + a_a * L_a (Eq. 9); each term can be switched off (Table III).
    """

    def __init__(
        self, model: ModelConfig, cfg: PretrainConfig, image_size: int, n_train: int, global_batch: int
    ) -> None:
        super().__init__()
        if not (cfg.consistency or cfg.reconstruction or cfg.alignment):
            raise ValueError("pre-training needs at least one of consistency, reconstruction, alignment")
        self.cfg = cfg
        self.enc_a = build_encoder(model, image_size)
        self.enc_b = build_encoder(model, image_size)
        if cfg.reconstruction:
            self.decoder = SharedDecoder(
                self.enc_a.num_patches,
                model.patch_size,
                model.width,
                model.decoder_width,
                model.decoder_depth,
                model.decoder_heads,
                model.mlp_ratio,
            )
        if cfg.consistency:
            self.proj_a = Projection(model.width, model.proj_dim)
            self.proj_b = Projection(model.width, model.proj_dim)
            self.enc_a_m, self.enc_b_m = momentum_copy(self.enc_a), momentum_copy(self.enc_b)
            self.proj_a_m, self.proj_b_m = momentum_copy(self.proj_a), momentum_copy(self.proj_b)
            k = queue_length(cfg.queue_size, n_train, global_batch)
            # one index queue serves both: the A and B features of a sample are enqueued together
            self.queue_a = FeatureQueue(model.proj_dim, k, track_index=cfg.queue_positives == "index")
            self.queue_b = FeatureQueue(model.proj_dim, k)
            self.temp = nn.Parameter(torch.tensor(cfg.temp))
        if cfg.alignment:
            self.gloe_a = GlobalEmbedding(model.width, model.gloe_mult * model.width)
            self.gloe_b = GlobalEmbedding(model.width, model.gloe_mult * model.width)
            self.temp_align = nn.Parameter(torch.tensor(cfg.temp))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.enc_a, self.enc_a_m),
            (self.enc_b, self.enc_b_m),
            (self.proj_a, self.proj_a_m),
            (self.proj_b, self.proj_b_m),
        ]

    def forward_consistency(
        self,
        cls_a: torch.Tensor,
        cls_b: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        info: StepInfo,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 1-4: momentum-distilled contrastive loss between modalities with feature queues.

        cls_a, cls_b: [B, D] online CLS features; a, b: [B, 3, H, W] the same views for the momentum encoders;
        index: [B] sample indices (needed with ``queue_positives="index"``).
        """
        by_index = self.queue_a.track_index
        if by_index and index is None:
            raise ValueError("queue_positives='index' needs the batch's sample indices (batch['index'])")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            for online, target in self.momentum_pairs():
                momentum_update(online, target, self.cfg.momentum)
            z_a_m = self.proj_a_m(self.enc_a_m(a)[:, 0])
            z_b_m = self.proj_b_m(self.enc_b_m(b)[:, 0])
        # alpha is ramped linearly from 0 over the first epoch (ALBEF)
        alpha = self.cfg.alpha * min(1.0, info.epoch + info.epoch_progress)
        z_a, z_b = self.proj_a(cls_a), self.proj_b(cls_b)
        # cloned: the queues are updated in place below, before backward
        loss = momentum_distilled_contrastive(
            z_a,
            z_b,
            z_a_m,
            z_b_m,
            self.queue_a.features.clone(),
            self.queue_b.features.clone(),
            self.temp,
            alpha,
            index.to(z_a.device) if by_index and index is not None else None,
            self.queue_a.indices.clone() if by_index else None,
        )
        self.queue_a.enqueue(z_a_m, index if by_index else None)
        self.queue_b.enqueue(z_b_m)
        return loss

    def forward_reconstruction(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Eq. 5-6: each encoder sees its own masked image (Mask(w), Mask(n)); ONE decoder
        reconstructs both; the two losses are summed (Eq. 6) or, with ``reconstruction_reduce="mean"``,
        averaged."""
        losses = []
        for enc, x in ((self.enc_a, a), (self.enc_b, b)):
            tokens, mask, ids_restore = enc.forward_masked(x, self.cfg.mask_ratio)
            pred = self.decoder(tokens, ids_restore)
            losses.append(masked_reconstruction(enc.patchify(x), pred, mask, norm_pix=self.cfg.norm_pix_loss))
        total = losses[0] + losses[1]
        return total if self.cfg.reconstruction_reduce == "sum" else total / 2

    def forward_alignment(self, cls_a: torch.Tensor, cls_b: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8: InfoNCE between high-dimensional global embeddings of both modalities."""
        with torch.no_grad():
            self.temp_align.clamp_(0.001, 0.5)
        return info_nce(self.gloe_a(cls_a), self.gloe_b(cls_b), self.temp_align)

    def forward(self, batch: dict[str, torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        a, b = batch["a"], batch["b"]
        logs: dict[str, Any] = {}
        loss = a.new_zeros(())
        if self.cfg.consistency or self.cfg.alignment:
            cls_a, cls_b = self.enc_a(a)[:, 0], self.enc_b(b)[:, 0]
        if self.cfg.consistency:
            l_cons = self.forward_consistency(cls_a, cls_b, a, b, info, batch.get("index"))
            loss = loss + self.cfg.w_consistency * l_cons
            logs["l_cons"] = l_cons.detach()
        if self.cfg.reconstruction:
            l_res = self.forward_reconstruction(a, b)
            loss = loss + self.cfg.w_reconstruction * l_res
            logs["l_res"] = l_res.detach()
        if self.cfg.alignment:
            l_a = self.forward_alignment(cls_a, cls_b)
            loss = loss + self.cfg.w_alignment * l_a
            logs["l_align"] = l_a.detach()
        return loss, logs


def epoch_order(indices: np.ndarray, seed: int, epoch: object) -> torch.Tensor:
    """This rank's share of the epoch's permutation of ``indices``; the permutation itself is the same on
    every rank (seeded by seed and epoch only), so N processes see the batches one process would."""
    idx_all = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    order_gen = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return dist.shard(idx_all[torch.randperm(len(idx_all), generator=order_gen)])


def cycled_order(indices: np.ndarray, seed: int, tag: str, needed: int) -> torch.Tensor:
    """At least ``needed`` entries: this rank's shares of fresh permutations ``tag.0``, ``tag.1``, ...
    (every rank draws as many permutations as the others, since the shares have equal sizes)."""
    parts: list[torch.Tensor] = []
    have = 0
    while have < needed:
        part = epoch_order(indices, seed, f"{tag}.{len(parts)}")
        if len(part) == 0:
            raise ValueError(f"{len(indices)} samples cannot be shared by {dist.world_size()} processes")
        parts.append(part)
        have += len(part)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def balanced_order(indices: np.ndarray, labels: np.ndarray, seed: int, tag: str, needed: int) -> torch.Tensor:
    """At least ``needed`` entries of this rank's share of a class-balanced draw from ``indices``: every
    class is equally likely at each draw (with replacement), so rare classes repeat within an epoch.
    ``labels`` [N] holds the class of every sample (indexed by the entries of ``indices``)."""
    idx_all = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if len(idx_all) == 0:
        raise ValueError("no samples to draw from")
    classes = torch.as_tensor(np.asarray(labels)[np.asarray(indices)], dtype=torch.long)
    counts = torch.bincount(classes)
    weights = 1.0 / counts[classes].double()
    world = dist.world_size()
    gen = torch.Generator().manual_seed(derive_seed(seed, "balanced", tag))
    # the draw is the same on every rank; each takes its strided share, as with the permutations
    draws = torch.multinomial(weights, needed * world, replacement=True, generator=gen)
    return dist.shard(idx_all[draws])


def labelled_order(
    indices: np.ndarray, labels: np.ndarray, seed: int, tag: str, needed: int, balance: str
) -> torch.Tensor:
    """This rank's labelled sample order: balanced draws with ``balance="sampler"``, else fresh
    permutations (:func:`cycled_order`)."""
    if balance == "sampler":
        return balanced_order(indices, labels, seed, tag, needed)
    return cycled_order(indices, seed, tag, needed)


def class_weights(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights [C] of the labelled set, n / (C * n_c), normalised so a balanced set gets
    1 everywhere; a class absent from the set gets 0."""
    counts = np.bincount(np.asarray(labels)[np.asarray(indices)], minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(weights, dtype=torch.float32)


def pair_batches(
    arrays_a: np.ndarray,
    arrays_b: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    seed: int,
    drop_last: bool = True,
    shared_aug: bool = False,
) -> BatchFn:
    """Shuffled batches of weakly augmented, normalised pairs: ``{"a", "b"}`` each [B, 3, H, W], and the
    samples' ``index`` [B]. ``batch_size`` is per process; ``shared_aug``: one flip/crop for both images.
    """

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        perm = epoch_order(indices, seed, epoch)
        n = len(perm) // batch_size * batch_size if drop_last else len(perm)
        for start in range(0, n, batch_size):
            sel = perm[start : start + batch_size].numpy()
            sel.sort()  # sorted reads are faster on a memory-mapped cache; order inside a batch is irrelevant
            a = torch.from_numpy(np.ascontiguousarray(arrays_a[sel])).to(device, non_blocking=True)
            b = torch.from_numpy(np.ascontiguousarray(arrays_b[sel])).to(device, non_blocking=True)
            view_a, view_b = weak_pair(a, b, generator, shared=shared_aug)
            yield {"a": to_float(view_a), "b": to_float(view_b), "index": torch.from_numpy(sel)}

    return batches
