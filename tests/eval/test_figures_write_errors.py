"""A figure that cannot be written (full disk) leaves no truncated PNG behind and names its path."""

from __future__ import annotations

import errno
import os

import pytest

from mics.eval import figures

SERIES = {"MICS": {0.05: [0.6], 0.1: [0.7]}}


def test_full_disk_leaves_no_partial_png(tmp_path, monkeypatch):
    target = tmp_path / "figs" / "le.png"
    real_replace = os.replace

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as info:
        figures.plot_label_efficiency(SERIES, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list((tmp_path / "figs").iterdir()) == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert figures.plot_label_efficiency(SERIES, target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_folder_below_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        figures.plot_label_efficiency(SERIES, tmp_path / "file" / "figs" / "le.png")
    assert str(tmp_path / "file") in str(info.value.filename)
