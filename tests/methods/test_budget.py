"""Steps per epoch: pre-training drops the last partial batch, fine-tuning keeps it and cycles a small
labelled set up to ``min_steps_per_epoch``; both give at least one step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mics.config import preset
from mics.methods.budget import finetune_steps_per_epoch, pretrain_steps_per_epoch

CPU = preset("cpu")


def _cfg(pretrain_batch: int, finetune_batch: int, min_steps: int):
    return replace(
        CPU,
        pretrain=replace(CPU.pretrain, batch_size=pretrain_batch),
        finetune=replace(CPU.finetune, batch_size=finetune_batch, min_steps_per_epoch=min_steps),
    )


@pytest.mark.parametrize(
    ("n", "batch", "steps"), [(64, 16, 4), (65, 16, 4), (79, 16, 4), (80, 16, 5), (15, 16, 1), (0, 16, 1)]
)
def test_pretraining_drops_the_last_partial_batch(n, batch, steps):
    assert pretrain_steps_per_epoch(_cfg(batch, 7, 1), n) == steps


@pytest.mark.parametrize(
    ("n", "batch", "steps"), [(64, 16, 4), (65, 16, 5), (80, 16, 5), (81, 16, 6), (3, 16, 1), (0, 16, 1)]
)
def test_finetuning_keeps_the_last_partial_batch(n, batch, steps):
    assert finetune_steps_per_epoch(_cfg(5, batch, 1), n) == steps


@pytest.mark.parametrize(("n", "min_steps", "steps"), [(40, 6, 6), (40, 5, 5), (40, 4, 5), (40, 0, 5)])
def test_finetuning_cycles_a_small_labelled_set_up_to_the_minimum(n, min_steps, steps):
    assert finetune_steps_per_epoch(_cfg(16, 8, min_steps), n) == steps
    # the minimum is fine-tuning's alone
    assert pretrain_steps_per_epoch(_cfg(8, 16, min_steps), n) == 5
