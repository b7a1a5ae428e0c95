"""README "Bad inputs, crashes and untrusted files": the guarantees not covered by the data layer's own
tests, checked where the user meets them (the command line and ``pipeline.init_run``)."""

from __future__ import annotations

import csv
import shutil

import pytest

from mics.config import preset
from mics.data.errors import DataError
from mics.pipeline import init_run
from tests.conftest import GI, MILK
from tests.test_cli_os_errors import cli


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_a_bad_label_ratio_is_one_message(tmp_path, monkeypatch, capsys, ratio):
    code, err = cli(monkeypatch, capsys, "run", "--data", MILK, "--out", tmp_path / "r", "--labels", ratio)
    assert code == 2 and "Traceback" not in err
    assert f"error: --labels must be a fraction in (0, 1], got {float(ratio)}" in err


def test_skip_bad_drops_a_broken_image_and_lists_it(tmp_path, capsys):
    data = tmp_path / "gi"
    for cls in ("normal-cecum", "polyps"):  # a few images per class keep it quick
        (data / cls).mkdir(parents=True)
        for image in sorted((GI / cls).glob("*.jpg"))[:10]:
            shutil.copy(image, data / cls / image.name)
    broken = data / "polyps" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        init_run(data, tmp_path / "strict", cfg=preset("smoke"), labels=0.3)
    capsys.readouterr()
    ctx = init_run(data, tmp_path / "run", cfg=preset("smoke"), labels=0.3, skip_bad=True)
    said = capsys.readouterr().err
    assert f"dropped 1 bad samples; list written to {tmp_path / 'run' / 'dropped.csv'}" in said.splitlines()
    rows = list(csv.DictReader((tmp_path / "run" / "dropped.csv").open(encoding="utf-8")))
    assert [row["path"] for row in rows] == [str(broken)] and rows[0]["reason"]
    assert all(s.path_a != broken for s in ctx.images.samples)
