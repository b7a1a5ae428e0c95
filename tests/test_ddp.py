"""Data-parallel training on CPU: 2 processes (gloo) against 1 process with the same global batch.

Run with ``pytest -m ddp`` (kept out of the default run: it starts processes; about 2 minutes on 2 cores,
half of it the two ``torchrun`` end-to-end runs).

What makes the comparison meaningful: the batches of these checks carry no augmentation, so a sample
looks the same whichever rank draws it, and the only randomness left in the fine-tuning and baseline
steps (the choice among an SVD cluster's shifts) is removed by giving every cluster one shift. The two
runs then see the same global batches (``epoch_order`` shards the same permutation, strided), and
gradient averaging over ranks equals the gradient of the global mean, so the loss curves agree up to
float32 summation order. Tolerance: losses within 1e-4 relative; weights within 1e-5 + 2 * lr * steps
absolute (Adam divides by sqrt(v): a gradient near zero whose sign differs in the last bits moves a weight
by up to lr per step either way). Pre-training cannot be compared this way: its contrastive losses use
each rank's batch as negatives and its masks come from each rank's RNG (as in ALBEF and MAE); for it the
checks are that every rank ends with bit-identical weights, momentum encoders and queues, including the
ablations that drop losses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mics.config import FinetuneConfig, PretrainConfig, SSLConfig, SVDConfig, preset
from mics.data.views import to_float
from mics.engine import distributed as dist
from mics.engine.logging import MetricsLogger
from mics.engine.train import Schedule, fit, seed_all
from mics.methods.baseline import SSLTraining
from mics.methods.finetune import FusionFinetuning
from mics.methods.pretrain import SynergisticPretraining, epoch_order, pair_batches
from mics.methods.ssl import build_algorithm
from mics.methods.svd import ShiftDictionary

pytestmark = pytest.mark.ddp

WORLD = 2
SMOKE = preset("smoke")
SIZE = SMOKE.data.image_size
CLASSES = 3
LR = 1e-3
FT_EPOCHS, FT_STEPS, FT_BATCH = 3, 2, 8  # global batch; the labelled set is exactly one epoch
SSL_EPOCHS, SSL_STEPS, SSL_BATCH, SSL_URATIO = 2, 2, 4, 2


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, SIZE, SIZE), dtype=np.uint8)


def _load(arrays: np.ndarray, sel: np.ndarray) -> torch.Tensor:
    return to_float(torch.from_numpy(np.ascontiguousarray(arrays[sel])))


# ------------------------------------------------------------------------------------------- fine-tuning


FINETUNE_ABLATIONS = {
    "no-nbi": {"use_nbi": False},
    "no-tmc": {"use_tmc": False},
    "no-svd": {"use_svd": False},
}


def finetune_run(out: Path, **ablation: bool) -> dict[str, Any]:
    """Fusion fine-tuning with NBI, SVD (one shift per cluster) and TMC unless switched off by ``ablation``;
    returns the loss curve, the final weights, the samples each step saw and the files the run wrote."""
    world = dist.world_size()
    n = FT_STEPS * FT_BATCH
    arrays_a, arrays_b = _images(n, 1), _images(n, 2)
    labels = torch.arange(n) % CLASSES
    seen: list[list[int]] = []

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = epoch_order(np.arange(n), seed=0, epoch=epoch)
        per = FT_BATCH // world
        for i in range(FT_STEPS):
            sel = order[i * per : (i + 1) * per].numpy()
            seen.append(sel.tolist())
            yield {"a": _load(arrays_a, sel), "b": _load(arrays_b, sel), "y": labels[sel]}

    seed_all(0)
    cfg = FinetuneConfig(epochs=FT_EPOCHS, batch_size=FT_BATCH, annealing_epochs=2, **ablation)
    svd = SVDConfig(shifts_per_cluster=1, prototype="nearest")
    model = FusionFinetuning(SMOKE.model, cfg, svd, SIZE, CLASSES)
    gen = torch.Generator().manual_seed(3)
    width = SMOKE.model.width
    dictionary = ShiftDictionary(
        torch.randn(CLASSES, width, generator=gen), torch.randn(CLASSES, 1, width, generator=gen)
    )
    if cfg.use_svd:
        model.set_dictionaries(dictionary, dictionary if cfg.use_nbi else None)
    schedule = Schedule(FT_EPOCHS, FT_STEPS, LR, 1e-5, 0.02, warmup_steps=1, ema=0.9)
    out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, tensorboard=False)
    result = fit(
        model,
        batches,
        schedule,
        stage="ft",
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=out / "ckpt",
        logger=logger,
    )
    logger.close()
    dist.barrier()
    metrics = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return {
        "loss": [h["loss"] for h in result.history],
        "state": model.state_dict(),
        "seen": seen,
        "metric_lines": len(metrics),
        "checkpoint": (out / "ckpt" / "last.json").exists(),
    }


# ---------------------------------------------------------------------------------------------- baseline


SSL_METHODS = {
    # FlexMatch: class-wise thresholds from every rank's confident samples; 0.38 lets 11 of 16 in
    "flexmatch": 0.38,
    # SoftMatch: per-sample weights from the mean and variance of every rank's confidences
    "softmatch": 0.95,
}


def ssl_run(method: str) -> dict[str, Any]:
    """A baseline the multimodal way without augmentation (the strong view is the partner image as it is),
    whose running state is updated from the pseudo-labels of all ranks."""
    world = dist.world_size()
    n_l, n_u = SSL_STEPS * SSL_BATCH, SSL_STEPS * SSL_BATCH * SSL_URATIO
    arrays_a, arrays_b = _images(n_u, 4), _images(n_u, 5)
    labels = torch.arange(n_u) % CLASSES
    b_l, b_u = SSL_BATCH // world, SSL_BATCH * SSL_URATIO // world

    def batches(epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order_l = epoch_order(np.arange(n_l), seed=0, epoch=f"l.{epoch}")
        order_u = epoch_order(np.arange(n_u), seed=0, epoch=f"u.{epoch}")
        for i in range(SSL_STEPS):
            sel_l = order_l[i * b_l : (i + 1) * b_l].numpy()
            sel_u = order_u[i * b_u : (i + 1) * b_u].numpy()
            yield {
                "x_l": _load(arrays_a, sel_l),
                "y_l": labels[sel_l],
                "x_u_w": _load(arrays_a, sel_u),
                "x_u_s": _load(arrays_b, sel_u),
                "idx_u": torch.from_numpy(sel_u),
            }

    seed_all(0)
    cfg = SSLConfig(batch_size=SSL_BATCH, uratio=SSL_URATIO, threshold=SSL_METHODS[method])
    algorithm = build_algorithm(method, CLASSES, n_u, cfg)
    model = SSLTraining(SMOKE.model, SIZE, CLASSES, algorithm)
    schedule = Schedule(SSL_EPOCHS, SSL_STEPS, LR, 1e-5, 0.02, warmup_steps=1, ema=0.9)
    result = fit(
        model,
        batches,
        schedule,
        stage=method,
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=None,
        logger=MetricsLogger(None),
        extra=algorithm,
    )
    return {
        "loss": [h["loss"] for h in result.history],
        "mask_rate": [h["mask_rate"] for h in result.history],
        "state": model.state_dict(),
        "algorithm": algorithm.state_dict(),
    }


# ---------------------------------------------------------------------------------------------- pretrain

PRETRAIN_VARIANTS = {
    "full": {},
    "consistency-only": {"reconstruction": False, "alignment": False},
    "reconstruction-only": {"consistency": False, "alignment": False},
    "no-consistency": {"consistency": False},
}


def pretrain_run(variant: str) -> dict[str, Any]:
    """3 steps of pre-training on the real batch function (augmented, sharded); the final state."""
    n, batch = 24, 8
    seed_all(0)
    cfg = PretrainConfig(batch_size=batch, queue_size=16, **PRETRAIN_VARIANTS[variant])
    model = SynergisticPretraining(SMOKE.model, cfg, SIZE, n, batch)
    batches = pair_batches(
        _images(n, 6), _images(n, 7), np.arange(n), batch // dist.world_size(), torch.device("cpu"), seed=0
    )
    schedule = Schedule(1, n // batch, LR, 1e-5, 0.02, warmup_steps=1)
    result = fit(
        model,
        batches,
        schedule,
        stage=f"pretrain-{variant}",
        seed=0,
        device=torch.device("cpu"),
        ckpt_dir=None,
        logger=MetricsLogger(None),
    )
    return {"loss": [h["loss"] for h in result.history], "state": model.state_dict()}


# ----------------------------------------------------------------------------------------------- workers


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))  # the package's own set-up, as under torchrun
    try:
        folder = Path(out)
        results: dict[str, Any] = {"rank": dist.rank(), "world": dist.world_size()}
        results["finetune"] = finetune_run(folder / "finetune")
        for name, ablation in FINETUNE_ABLATIONS.items():
            results[f"finetune/{name}"] = finetune_run(folder / f"finetune-{name}", **ablation)
        for method in SSL_METHODS:
            results[method] = ssl_run(method)
        for variant in PRETRAIN_VARIANTS:
            results[f"pretrain/{variant}"] = pretrain_run(variant)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"finetune": finetune_run(out / "finetune"), **{m: ssl_run(m) for m in SSL_METHODS}}
    finally:
        torch.set_num_threads(threads)


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], steps: int) -> None:
    assert a.keys() == b.keys()
    atol = 1e-5 + 2 * LR * steps
    for k in a:
        torch.testing.assert_close(
            a[k].float(), b[k].float(), rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


# ------------------------------------------------------------------------------------------------- tests


def test_processes_joined_the_group(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)


def test_ranks_split_each_global_batch_into_disjoint_halves(ranks, single):
    steps = FT_EPOCHS * FT_STEPS
    for step in range(steps):
        parts = [set(r["finetune"]["seen"][step]) for r in ranks]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(single["finetune"]["seen"][step])


def test_finetune_loss_curve_matches_one_process(ranks, single):
    for r in ranks:
        np.testing.assert_allclose(r["finetune"]["loss"], single["finetune"]["loss"], rtol=1e-4)
    _assert_states_close(ranks[0]["finetune"]["state"], single["finetune"]["state"], FT_EPOCHS * FT_STEPS)


@pytest.mark.parametrize("variant", ["finetune", *(f"finetune/{name}" for name in FINETUNE_ABLATIONS)])
def test_finetune_ranks_hold_identical_weights(ranks, variant):
    """Also for the ablations of Table IV, which drop the NBI encoder, the evidential heads or the shifts."""
    a, b = ranks[0][variant], ranks[1][variant]
    assert a["loss"] == b["loss"] and all(np.isfinite(a["loss"]))
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_only_rank_zero_writes(ranks):
    # one line per epoch: the ranks' metrics are all-reduced and rank 0 alone appends them
    assert ranks[0]["finetune"]["metric_lines"] == FT_EPOCHS
    assert ranks[0]["finetune"]["checkpoint"]


@pytest.mark.parametrize("method", list(SSL_METHODS))
def test_baseline_loss_curve_and_state_match_one_process(ranks, single, method):
    ref = single[method]
    assert max(ref["mask_rate"]) > 0, "the check needs some pseudo-labels that count"
    for r in ranks:
        np.testing.assert_allclose(r[method]["loss"], ref["loss"], rtol=1e-4)
        np.testing.assert_allclose(r[method]["mask_rate"], ref["mask_rate"], rtol=1e-4)
        for key, value in ref["algorithm"].items():
            torch.testing.assert_close(r[method]["algorithm"][key], value)
    _assert_states_close(ranks[0][method]["state"], ref["state"], SSL_EPOCHS * SSL_STEPS)


@pytest.mark.parametrize("variant", list(PRETRAIN_VARIANTS))
def test_pretraining_ranks_stay_identical(ranks, variant):
    """Weights, momentum encoders (frozen parameters DDP does not reduce) and feature queues (all-gathered
    buffers DDP does not broadcast) are bit-identical on both ranks after 3 steps, for every ablation."""
    a, b = ranks[0][f"pretrain/{variant}"], ranks[1][f"pretrain/{variant}"]
    assert a["loss"] == b["loss"] and all(np.isfinite(a["loss"]))
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    if "queue_a.ptr" in a["state"]:
        # 3 steps of the global batch 8 in a queue of 16: both ranks' momentum features went in
        assert int(a["state"]["queue_a.ptr"]) == (3 * 8) % 16


def test_momentum_encoders_moved_and_follow_the_online_ones(ranks):
    state = ranks[0]["pretrain/full"]["state"]
    seed_all(0)
    fresh = SynergisticPretraining(
        SMOKE.model, PretrainConfig(batch_size=8, queue_size=16), SIZE, 24, 8
    ).state_dict()
    key = "enc_a_m.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[key], fresh[key])
    assert not torch.equal(state[key], state["enc_a.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("command", [["run"], ["baseline", "--method", "flexmatch"]])
def test_torchrun_end_to_end(tmp_path, gi_dir, command):
    """``torchrun --nproc-per-node 2 -m mics ...`` on the bundled images with the smoke preset."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "mics",
            *command,
            "--data",
            str(gi_dir),
            "--out",
            str(out),
            "--preset",
            "smoke",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").exists()
