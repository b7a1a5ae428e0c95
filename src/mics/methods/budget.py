"""Training budgets in optimiser steps, shared by MICS's stages (``mics.pipeline``) and the baselines
(``mics.methods.baseline``), which train for as many iterations as MICS's pre-training and fine-tuning."""

from __future__ import annotations

import math

from mics.config import RunConfig


def _steps(n: int, batch: int, drop_last: bool) -> int:
    return max(1, n // batch) if drop_last else max(1, math.ceil(n / batch))


def pretrain_steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    return _steps(n_train, cfg.pretrain.batch_size, drop_last=True)


def finetune_steps_per_epoch(cfg: RunConfig, n_labelled: int) -> int:
    return max(_steps(n_labelled, cfg.finetune.batch_size, drop_last=False), cfg.finetune.min_steps_per_epoch)
