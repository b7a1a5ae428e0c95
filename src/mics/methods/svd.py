"""Stage 2, the Shift Vector Dictionary (METHOD.md Eq. 10-14).

Per modality: encode every training image with the pre-trained encoder, cluster the CLS features with
k-means (C clusters), estimate each cluster's covariance with shrinkage, and draw P shift vectors per
cluster. Fine-tuning adds a drawn shift to the fused feature to simulate distribution shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from mics.config import SVDConfig
from mics.data.views import to_float
from mics.engine.logging import progress


@torch.no_grad()
def encode_features(
    encoder: torch.nn.Module,
    images: np.ndarray,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 128,
    desc: str = "encode",
) -> torch.Tensor:
    """CLS features of un-augmented images: uint8 [N, 3, H, W] (selected by ``indices``) ->
    float [n, D] on CPU."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in progress(range(0, len(indices), batch_size), desc=desc):
        sel = np.asarray(indices[start : start + batch_size])
        x = torch.from_numpy(np.ascontiguousarray(images[sel])).to(device)
        out.append(encoder(to_float(x))[:, 0].float().cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class ShiftDictionary:
    """C x P x D shift vectors with their C x D prototypes for one modality."""

    prototypes: torch.Tensor  # [C, D] k-means cluster means mu_j
    shifts: torch.Tensor  # [C, P, D] sampled shift vectors

    def to(self, device: torch.device) -> ShiftDictionary:
        return ShiftDictionary(self.prototypes.to(device), self.shifts.to(device))

    def choose_clusters(
        self, feats: torch.Tensor, rule: str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Cluster index per sample [B]: the nearest prototype of the sample's own feature, or random."""
        c = self.prototypes.shape[0]
        if rule == "nearest":
            return torch.cdist(feats.float(), self.prototypes.float()).argmin(dim=1)
        if rule == "random":
            return torch.randint(0, c, (feats.shape[0],), generator=generator).to(feats.device)
        raise ValueError(f"unknown prototype rule {rule!r}; use 'nearest' or 'random'")

    def sample(
        self, feats: torch.Tensor, rule: str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One shift per sample: feats [B, D] -> shifts [B, D] (a random one of the chosen cluster's P)."""
        clusters = self.choose_clusters(feats, rule, generator)
        p = self.shifts.shape[1]
        pick = torch.randint(0, p, (feats.shape[0],), generator=generator).to(feats.device)
        return self.shifts[clusters, pick].to(feats.dtype)


def shrunk_covariance(x: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Unbiased covariance of x [n, D] plus ``shrinkage * mean variance * I`` so it is positive definite
    even when n < D (Q_j can be smaller than D)."""
    d = x.shape[1]
    if x.shape[0] < 2:
        cov = torch.zeros(d, d, dtype=x.dtype)
        scale = torch.tensor(1.0, dtype=x.dtype)
    else:
        centred = x - x.mean(dim=0, keepdim=True)
        cov = centred.T @ centred / (x.shape[0] - 1)
        scale = torch.diagonal(cov).mean().clamp_min(1e-8)
    return cov + shrinkage * scale * torch.eye(d, dtype=x.dtype)


def build_dictionary(feats: torch.Tensor, num_clusters: int, cfg: SVDConfig, seed: int) -> ShiftDictionary:
    """k-means prototypes + per-cluster covariance + P sampled shifts (zero-mean or, as the paper writes,
    centred on the prototype). feats: [N, D] -> dictionary with [C, D] prototypes and [C, P, D] shifts."""
    if feats.shape[0] < num_clusters:
        raise ValueError(
            f"need at least {num_clusters} features for {num_clusters} clusters, got {feats.shape[0]}"
        )
    x = feats.double()
    km = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed % (2**31)).fit(x.numpy())
    labels = torch.from_numpy(km.labels_)
    gen = torch.Generator().manual_seed(seed)
    prototypes, shifts = [], []
    for j in range(num_clusters):
        members = x[labels == j]
        mu = members.mean(dim=0) if len(members) else torch.from_numpy(km.cluster_centers_[j])
        cov = shrunk_covariance(members, cfg.shrinkage)
        chol = torch.linalg.cholesky(cov)
        z = torch.randn(cfg.shifts_per_cluster, x.shape[1], generator=gen, dtype=torch.float64)
        s = z @ chol.T
        if cfg.shift_mean == "paper":
            s = s + mu
        elif cfg.shift_mean != "zero_mean":
            raise ValueError(f"unknown svd.shift_mean {cfg.shift_mean!r}; use 'zero_mean' or 'paper'")
        prototypes.append(mu)
        shifts.append(s * cfg.shift_scale)
    return ShiftDictionary(torch.stack(prototypes).float(), torch.stack(shifts).float())
