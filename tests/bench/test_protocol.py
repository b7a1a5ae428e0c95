"""Results-level resume: protocol keys, value order, and a results file that a bench skips, fills a row at
a time and re-runs where its rows are of an older protocol (with the fake ``python`` of the bench tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.test_bench import FAKE_MICS, _calls, _fake_grid, _main, small_grid

from mics import bench
from mics.bench import protocol
from mics.bench.protocol import ResultsFile, order_by_value, protocol_key
from mics.data.errors import DataError


@pytest.fixture()
def fake_python(tmp_path, monkeypatch) -> Path:
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_MICS.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    return exe


def test_protocol_key_follows_config_data_seed_and_training_code(tmp_path, monkeypatch):
    data = tmp_path / "good"
    data.mkdir()
    (data / "a.png").write_bytes(b"12345")
    cells = {c.id: c for c in bench.expand_cells(_fake_grid(tmp_path))}
    cell = cells["good__mics__l10__s0"]
    key = protocol_key(cell)
    assert key == protocol_key(bench.expand_cells(_fake_grid(tmp_path))[1])  # same cell, same key
    others = {protocol_key(cells[c]) for c in cells if c != cell.id}
    assert key not in others and len(others) == len(cells) - 1  # ratio, seed, method, way
    changed = bench.expand_cells(_fake_grid(tmp_path, set=["finetune.epochs=3"]))[1]
    assert protocol_key(changed) != key
    on_gpu = bench.expand_cells(_fake_grid(tmp_path, set=["device=cuda", "data.num_workers=4"]))[1]
    assert protocol_key(on_gpu) == key  # where a cell runs is not what it learns
    protocol.data_manifest.cache_clear()
    (data / "a.png").write_bytes(b"123456")  # another size: other data
    assert protocol_key(cell) != key
    (data / "a.png").write_bytes(b"12345")
    protocol.data_manifest.cache_clear()
    assert protocol_key(cell) == key
    monkeypatch.setattr(protocol, "TRAINING_CODE_VERSION", protocol.TRAINING_CODE_VERSION + 1)
    assert protocol_key(cell) != key


def test_value_order_runs_small_ratios_first_a_seed_at_a_time():
    g = small_grid(
        labels=[0.5, 0.3, 0.1, 0.05],
        datasets=[{"name": "a", "path": "/a"}, {"name": "b", "path": "/b"}],
        methods=["mics", {"name": "full", "method": "supervised", "ways": ["standard"], "labels": [1.0]}],
    )
    ids = [c.id for c in order_by_value(bench.expand_cells(g))]
    assert ids[:6] == [
        "a__mics__l10__s0",
        "b__mics__l10__s0",
        "a__mics__l5__s0",
        "b__mics__l5__s0",
        "a__full-standard__l100__s0",
        "b__full-standard__l100__s0",
    ]
    assert ids[6] == "a__mics__l10__s1"  # the next seed of the first group before any 50 % cell
    first_large = ids.index("a__mics__l50__s0")
    assert all("__l50__" in i or "__l30__" in i for i in ids[first_large:])
    assert ids[first_large : first_large + 4] == [
        "a__mics__l50__s0",
        "b__mics__l50__s0",
        "a__mics__l30__s0",
        "b__mics__l30__s0",
    ]


def test_results_file_is_skipped_filled_per_cell_and_stale_rows_rerun(tmp_path, fake_python, monkeypatch):
    grid = _fake_grid(tmp_path, seeds=[0])
    out, table = tmp_path / "bench", tmp_path / "results" / "table2.csv"
    ids = [c.id for c in bench.expand_cells(grid)]
    kw = {"python": str(fake_python), "poll_s": 0.05, "progress": False, "results": table, "order": "value"}
    bench.run_bench(grid, out, only=[ids[0]], **kw)
    assert [r["cell"] for r in ResultsFile(table).rows()] == [ids[0]]
    bench.run_bench(grid, out, **kw)
    rows = ResultsFile(table).rows()
    assert sorted(r["cell"] for r in rows) == sorted(ids) and all(len(r["protocol"]) == 16 for r in rows)
    assert len(_calls(tmp_path)) == len(ids)  # each cell ran once

    # another machine: only the committed file, no run folders: nothing runs
    (tmp_path / "calls.jsonl").unlink()
    bench.run_bench(grid, tmp_path / "elsewhere", **kw)
    assert _calls(tmp_path) == []

    # the training code changed: every row is stale, every cell runs again from a fresh run folder
    monkeypatch.setattr(protocol, "TRAINING_CODE_VERSION", protocol.TRAINING_CODE_VERSION + 1)
    again = bench.run_bench(grid, out, **kw)
    assert sorted(again.ran) == sorted(ids) and len(_calls(tmp_path)) == len(ids)
    assert all(not c["resume"] for c in _calls(tmp_path))
    assert (out / "runs" / f"{ids[0]}.stale" / "metrics.json").exists()
    new_rows = ResultsFile(table).rows()
    assert len(new_rows) == len(ids) and not {r["protocol"] for r in new_rows} & {r["protocol"] for r in rows}


def test_dry_run_lists_only_the_cells_missing_from_the_results(tmp_path, fake_python, monkeypatch, capsys):
    grid_file = tmp_path / "g.yaml"
    (tmp_path / "good").mkdir()
    grid_file.write_text(
        f"preset: smoke\nlabels: [0.5, 0.1]\ndatasets: [{{name: good, path: {tmp_path / 'good'}}}]\n"
        "methods: [mics]\n"
    )
    table = tmp_path / "t.csv"
    grid = bench.load_grid(grid_file)
    bench.run_bench(
        grid, tmp_path / "b", python=str(fake_python), progress=False, results=table, only=["*l10*"]
    )
    capsys.readouterr()
    code = _main(
        monkeypatch, "bench", "--grid", grid_file, "--out", tmp_path / "c", "--results", table, "--dry-run"
    )
    out = capsys.readouterr().out
    assert code == 0 and "good__mics__l50__s0" in out and "good__mics__l10__s0" not in out
    assert out.strip().splitlines()[-1].startswith("1 cells: 0 done, 0 to resume, 1 new")
    assert not (tmp_path / "c").exists()


def test_missing_data_is_an_error_before_any_run_folder_is_set_aside(tmp_path, fake_python):
    grid = _fake_grid(tmp_path, seeds=[0])
    (tmp_path / "good" / "a.png").write_bytes(b"12345")
    out, table = tmp_path / "bench", tmp_path / "results" / "table2.csv"
    kw = {"python": str(fake_python), "poll_s": 0.05, "progress": False, "results": table}
    bench.run_bench(grid, out, **kw)
    rows = ResultsFile(table).rows()
    (tmp_path / "good").rename(tmp_path / "moved")  # the data unmounted, or a wrong path
    protocol.data_manifest.cache_clear()
    with pytest.raises(DataError, match="not found") as err:
        bench.run_bench(grid, out, **kw)
    assert str(tmp_path / "good") in str(err.value)
    assert not list((out / "runs").glob("*.stale")) and ResultsFile(table).rows() == rows
    with pytest.raises(DataError, match="not found"):
        protocol_key(bench.expand_cells(grid)[0])
