"""The losses of MICS, each as a function and as an ``nn.Module``.

consistency (Eq. 1-4), reconstruction (Eq. 5-6), alignment (Eq. 7-8) for pre-training; evidential
opinions, Dempster-Shafer fusion and TMC's loss (Eq. 16-22) for fine-tuning.
"""

from mics.losses.alignment import InfoNCELoss, info_nce
from mics.losses.consistency import MomentumDistilledContrastiveLoss, momentum_distilled_contrastive
from mics.losses.evidential import (
    EvidentialLoss,
    Opinion,
    annealing_coefficient,
    combine_opinions,
    ds_combine,
    evidential_loss,
    kl_dirichlet_uniform,
    opinion_from_alpha,
    opinion_from_evidence,
)
from mics.losses.reconstruction import MaskedReconstructionLoss, masked_reconstruction, normalize_patches

__all__ = [
    "EvidentialLoss",
    "InfoNCELoss",
    "MaskedReconstructionLoss",
    "MomentumDistilledContrastiveLoss",
    "Opinion",
    "annealing_coefficient",
    "combine_opinions",
    "ds_combine",
    "evidential_loss",
    "info_nce",
    "kl_dirichlet_uniform",
    "masked_reconstruction",
    "momentum_distilled_contrastive",
    "normalize_patches",
    "opinion_from_alpha",
    "opinion_from_evidence",
]
