from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from mics.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _optimizer_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def test_round_trip_restores_nested_state_exactly(tmp_path):
    state = _optimizer_state()
    state["extra"] = {"rho": 0.5, "counts": torch.arange(5), "name": "dash", "none": None}
    save_checkpoint(tmp_path / "ck", state, info={"epoch": 3})
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info == {"epoch": 3}
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt.load_state_dict(loaded["optimizer"])  # int keys and param_groups lists come back as torch expects
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert (
        loaded["extra"]["rho"] == 0.5
        and loaded["extra"]["name"] == "dash"
        and loaded["extra"]["none"] is None
    )


def test_corrupted_weights_are_detected(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(10)})
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_weights(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "torch.safetensors")
    with pytest.raises(CheckpointError):
        load_weights(tmp_path / "torch.safetensors")
    assert not marker.exists()


def test_no_partial_files_are_left(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(3)})
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
    assert torch.equal(load_checkpoint(tmp_path / "ck")[0]["w"], torch.zeros(3))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path / "rng", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "rng")[0]["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_headers_whose_length_starts_with_0x80_are_still_safetensors(tmp_path):
    # the first byte is the low byte of the JSON header length: any value is legal, 0x80 included
    from safetensors.torch import save_file

    for n in range(1, 400):
        path = tmp_path / "w.safetensors"
        save_file({"x" * n: torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            assert torch.equal(load_weights(path)["x" * n], torch.zeros(1))
            return
    pytest.fail("no key length gave a header length with low byte 0x80")
