from __future__ import annotations

import pytest

from mics.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, preset


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_presets_round_trip_through_yaml(tmp_path, name):
    cfg = preset(name)
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(
        preset("cpu"),
        [
            "pretrain.epochs=3",
            "svd.shift_mean=paper",
            "finetune.use_tmc=false",
            "data.split=[0.5, 0.25, 0.25]",
            "pretrain.lr=1e-3",
        ],
    )
    assert cfg.pretrain.epochs == 3 and cfg.svd.shift_mean == "paper" and cfg.finetune.use_tmc is False
    assert cfg.data.split == (0.5, 0.25, 0.25) and cfg.pretrain.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.epoch=3", "unknown config key 'pretrain.epoch'"),
        ("svd.shift_mean=mean", "must be one of"),
        ("pretrain.epochs=three", "must be an integer"),
        ("finetune.use_tmc=maybe", "true or false"),
        ("pretrain=3", "is a section"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("cpu"), [override])


def test_unknown_preset_and_partial_dict():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    cfg = from_dict({"preset": "smoke", "seed": 7})
    assert cfg.seed == 7 and cfg.model == preset("smoke").model


def test_dump_yaml_is_atomic_so_a_full_disk_keeps_the_old_config(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "config.yaml"
    dump_yaml(preset("smoke"), path)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        dump_yaml(preset("paper"), path)
    assert info.value.filename == str(path)
    monkeypatch.undo()
    assert load_yaml(path) == preset("smoke")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
