"""One small 2-process data-parallel check that runs in the default suite (the full set in tests/test_ddp.py
is marked ``ddp`` and deselected by default).

Two gloo processes fine-tune the smoke-sized fusion model without augmentation (``finetune_run`` of
tests/test_ddp.py): the ranks see disjoint halves of each global batch, end with bit-identical weights,
and follow the loss curve of one process on the same global batches. About 10 s on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tests.test_ddp import FT_EPOCHS, FT_STEPS, _assert_states_close, _free_port, finetune_run

from mics.engine import distributed as dist

WORLD = 2


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))
    try:
        result = finetune_run(Path(out) / "finetune")
        result["world"] = dist.world_size()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp-small")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = finetune_run(tmp_path_factory.mktemp("single") / "finetune")
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def test_two_processes_split_the_batches_and_agree_with_one(runs):
    ranks, single = runs
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    for step in range(FT_EPOCHS * FT_STEPS):
        parts = [set(r["seen"][step]) for r in ranks]
        assert parts[0] and not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(single["seen"][step])
    a, b = ranks
    assert a["loss"] == b["loss"] and all(np.isfinite(a["loss"]))
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    np.testing.assert_allclose(a["loss"], single["loss"], rtol=1e-4)
    _assert_states_close(a["state"], single["state"], FT_EPOCHS * FT_STEPS)
    # rank 0 alone wrote the metrics (one line per epoch) and the checkpoint
    assert a["metric_lines"] == FT_EPOCHS and a["checkpoint"]
