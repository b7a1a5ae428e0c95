"""torch.distributed glue for ``torchrun``: setup, rank-0 I/O, reductions. A no-op in a single process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process' rank; before the process group exists, torchrun's ``RANK`` (so that work done before
    :func:`init_from_env`, such as writing a run folder's files, is already rank 0's alone)."""
    if is_distributed():
        return dist.get_rank()
    if dist.is_available() and dist.is_initialized():
        return 0
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); otherwise do nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in one process."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a copy); identity in one process."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def all_gather_object(obj: object) -> list[object]:
    """``obj`` of every rank, in rank order (pickled: for small values only); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank in rank order (no gradient)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: object) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Let rank 0 do a job (e.g. build a cache) before the other ranks read its result."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of a globally shuffled index list: every ``world_size``-th entry from the rank's
    offset (equal sizes: the tail is dropped). Strided, as ``DistributedSampler`` does, so that the ranks'
    batches i together hold exactly the entries of one process' batch i of the global batch size."""
    n = world_size()
    if n == 1:
        return indices
    per = len(indices) // n
    return indices[: per * n][rank() :: n]
