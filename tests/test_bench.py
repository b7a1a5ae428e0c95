"""The bench: grid parsing, cell expansion and ids, resume / skip / shared pre-training planning, the
scheduler (with a fake ``python`` that plays ``mics``), aggregation into results.csv / results.md, and one
real end-to-end bench on the bundled sample."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mics import bench
from mics.bench import Grid, GridError, cell_id, expand_cells, format_ratio, parse_grid, plan_cells
from mics.config import apply_overrides
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def small_grid(**extra) -> Grid:
    data = {
        "name": "t",
        "preset": "smoke",
        "seeds": [0, 1],
        "labels": [0.5, 0.1],
        "datasets": [
            {"name": "a", "path": "/nonexistent/a", "pair": "auto"},
            {"name": "b", "path": "/nonexistent/b", "labels": [0.3]},
        ],
        "methods": [
            "mics",
            {"name": "fixmatch"},
            {"name": "full", "method": "supervised", "ways": ["standard"], "labels": [1.0]},
        ],
    }
    data.update(extra)
    return parse_grid(data)


# ------------------------------------------------------------------------------------------------ parsing


def test_format_ratio_and_cell_ids():
    assert [format_ratio(x) for x in (0.05, 0.1, 0.3, 0.125, 0.5, 1.0)] == [
        "5",
        "10",
        "30",
        "12.5",
        "50",
        "100",
    ]
    assert cell_id("milk10k", "fixmatch", "standard", 0.1, 0) == "milk10k__fixmatch-standard__l10__s0"
    assert cell_id("kvasir-v2", "mics", None, 0.05, 2) == "kvasir-v2__mics__l5__s2"


def test_method_shorthands_and_defaults():
    g = small_grid()
    mics, fixmatch, full = g.methods
    assert (mics.method, mics.ways, mics.label) == ("mics", (None,), "mics")
    assert (fixmatch.method, fixmatch.ways) == ("fixmatch", ("standard", "multimodal"))
    assert (full.method, full.ways, full.labels) == ("supervised", ("standard",), (1.0,))
    assert g.row_label("fixmatch", "multimodal") == "fixmatch (multimodal)"


def test_cell_expansion_counts_order_and_label_precedence():
    cells = expand_cells(small_grid())
    # per seed: data set a: mics x2 ratios, fixmatch 2 ways x2 ratios, full x1 -> 7;
    # b: ratio 0.3 only -> 1 + 2 + 1 = 4
    assert len(cells) == 2 * (7 + 4)
    ids = [c.id for c in cells]
    assert ids[:7] == [
        "a__mics__l50__s0",
        "a__mics__l10__s0",
        "a__fixmatch-standard__l50__s0",
        "a__fixmatch-standard__l10__s0",
        "a__fixmatch-multimodal__l50__s0",
        "a__fixmatch-multimodal__l10__s0",
        "a__full-standard__l100__s0",
    ]
    assert {c.labels for c in cells if c.dataset == "b" and c.name != "full"} == {0.3}
    assert {c.labels for c in cells if c.name == "full"} == {1.0}
    assert len(set(ids)) == len(ids)


def test_overrides_apply_in_order_grid_dataset_method_cell_cli():
    g = small_grid(
        set=["finetune.epochs=2"],
        datasets=[{"name": "a", "path": "/x", "set": ["finetune.epochs=3", "finetune.lr=0.5"]}],
        methods=[{"name": "m", "method": "mics", "set": ["finetune.epochs=4"]}, "fixmatch"],
        cells=[{"match": "a__m__*__s1", "set": ["finetune.epochs=5"]}],
    )
    cells = {c.id: c for c in expand_cells(g, overrides=["ssl.threshold=0.5"])}
    assert cells["a__m__l50__s0"].overrides == (
        "finetune.epochs=2",
        "finetune.epochs=3",
        "finetune.lr=0.5",
        "finetune.epochs=4",
        "ssl.threshold=0.5",
    )
    assert cells["a__m__l50__s0"].config().finetune.epochs == 4
    assert cells["a__m__l50__s1"].config().finetune.epochs == 5
    assert cells["a__fixmatch-standard__l50__s0"].config().finetune.epochs == 3
    assert cells["a__fixmatch-standard__l50__s0"].config().ssl.threshold == 0.5
    assert cells["a__m__l50__s0"].config().finetune.lr == 0.5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ["nosuchmatch"]}, "unknown method"),
        ({"methods": [{"name": "fixmatch", "ways": ["sideways"]}]}, "unknown way"),
        ({"methods": [{"name": "mics", "ways": ["standard"]}]}, "no ways"),
        ({"labels": [10]}, "fraction"),
        ({"methods": ["mics", "mics"]}, "more than once"),
        ({"methods": [{"name": "a__b", "method": "mics"}]}, "__"),
        ({"set": ["pretrain.epochs"]}, "section.key=value"),
        ({"colour": "red"}, "unknown key"),
        ({"preset": "huge"}, "preset"),
        ({"datasets": [{"name": "a"}]}, "path"),
        ({"labels": [0.1, 0.1]}, "more than once"),
    ],
)
def test_bad_grids_are_rejected_with_a_message(change, message):
    with pytest.raises(GridError, match=message):
        expand_cells(small_grid(**change))


def test_an_override_that_the_config_rejects_names_the_cell():
    with pytest.raises(GridError, match=r"cell a__mics__l50__s0: .*unknown config key"):
        expand_cells(small_grid(set=["pretrain.nonsense=1"]))


def test_pretrain_key_is_shared_across_ratios_and_finetuning_only():
    g = small_grid(
        methods=[
            "mics",
            {"name": "no-svd", "method": "mics", "set": ["finetune.use_svd=false"]},
            {"name": "w1", "method": "mics", "set": ["pretrain.w_reconstruction=1"]},
            {"name": "plain", "method": "mics", "set": ["data.class_balance=none"]},
            {"name": "small", "method": "mics", "set": ["data.image_size=16"]},
            "fixmatch",
        ]
    )
    cells = expand_cells(g)
    key = {c.id: c.pretrain_key for c in cells}
    assert key["a__mics__l50__s0"] == key["a__mics__l10__s0"] == key["a__no-svd__l10__s0"]
    # how labelled batches are drawn does not reach label-free pre-training; the image size does
    assert key["a__mics__l10__s0"] == key["a__plain__l10__s0"] != key["a__small__l10__s0"]
    assert key["a__mics__l50__s0"] != key["a__mics__l50__s1"]  # seed: split and initialisation
    assert key["a__mics__l50__s0"] != key["b__mics__l30__s0"]  # data set
    assert key["a__mics__l50__s0"] != key["a__w1__l50__s0"]  # pre-training option
    assert key["a__fixmatch-standard__l50__s0"] is None


def test_data_paths_from_env_vars_set_data_and_the_grid_folder(tmp_path, monkeypatch):
    (tmp_path / "repo" / "configs").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "x").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    grid_file = tmp_path / "repo" / "configs" / "g.yaml"
    grid_file.write_text(
        textwrap.dedent("""
        preset: smoke
        datasets:
          - {name: rel, path: data/x}
          - {name: env, path: "${MICS_TEST_DATA}/y"}
        methods: [mics]
    """)
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("MICS_TEST_DATA", "/some/where")
    cells = {c.dataset: c for c in expand_cells(bench.load_grid(grid_file))}
    assert cells["rel"].data == str((tmp_path / "repo" / "data" / "x").resolve())
    assert cells["env"].data == "/some/where/y"
    cells = {c.dataset: c for c in expand_cells(bench.load_grid(grid_file), data_paths={"env": "/mine"})}
    assert cells["env"].data == "/mine"
    with pytest.raises(GridError, match="not data sets"):
        expand_cells(bench.load_grid(grid_file), data_paths={"kvasir": "/k"})
    assert bench.parse_assignments(["kvasir=/a=b"], "--set-data") == {"kvasir": "/a=b"}
    with pytest.raises(GridError, match="NAME=PATH"):
        bench.parse_assignments(["kvasir"], "--set-data")


def test_method_names_match_the_pipeline():
    from mics import pipeline

    assert bench.BASELINES == pipeline.BASELINE_METHODS
    assert bench.WAYS == pipeline.WAYS


# ------------------------------------------------------------------------------------------ the grids


def _grid(name: str) -> Grid:
    return bench.load_grid(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("scale", ["smoke", "cpu", "paper"])
def test_table2_grids_have_all_16_methods_and_ways_plus_fully_supervised(scale):
    g = _grid(f"table2-{scale}")
    rows = {(m.method, w) for m in g.methods if m.name != "fully-supervised" for w in m.ways}
    expected = {("mics", None), ("supervised", "standard")} | {
        (b, w) for b in bench.BASELINES[1:] for w in bench.WAYS
    }
    assert rows == expected and len(rows) == 16
    full = next(m for m in g.methods if m.name == "fully-supervised")
    assert (full.method, full.labels) == ("supervised", (1.0,))
    assert g.preset == scale
    assert g.paper["Kvasir"]["mics"] == {0.5: 76.67, 0.3: 75.33, 0.1: 67.17, 0.05: 60.88}
    assert g.paper["Kvasir v2"]["mics"] == {0.5: 78.67, 0.3: 77.92, 0.1: 74.33, 0.05: 70.25}


def test_grid_scales_data_sets_seeds_and_ratios():
    smoke, cpu, paper = _grid("table2-smoke"), _grid("table2-cpu"), _grid("table2-paper")
    assert len(smoke.seeds) == 1 and len(smoke.labels) == 1
    assert all((REPO / d.path).is_dir() for d in smoke.datasets)
    assert cpu.seeds == (0, 1, 2) and cpu.labels == (0.1, 0.05)
    assert {d.path: d.pair for d in cpu.datasets} == {
        "../shared/data/milk10k-paired-128": "suffix:clinical,dermoscopic",
        "../shared/data/hyperkvasir-5class-128": "virtual-nbi",
    }
    assert {d.name: d.labels for d in cpu.datasets} == {"milk10k": (0.5, 0.3, 0.1, 0.05), "hyperkvasir": None}
    # 16 method rows at 4 + 2 ratios, fully supervised and MICS's first wiring (10 %) on both packs, 3 seeds
    cells = expand_cells(cpu)
    assert len(cells) == 3 * (16 * (4 + 2) + 2 + 2)
    first = [c for c in cells if c.id.startswith("milk10k__mics-first-wiring__")]
    mics = {c.id: c for c in cells}
    assert len(first) == 3 and all(c.labels == 0.1 for c in first)
    # fine-tunes from the MICS cell's pre-training
    assert all(c.pretrain_key == mics[c.id.replace("mics-first-wiring", "mics")].pretrain_key for c in first)
    assert paper.labels == (0.5, 0.3, 0.1, 0.05)
    assert {d.name: (d.path, d.paper) for d in paper.datasets} == {
        "kvasir": ("${MICS_KVASIR}", "Kvasir"),
        "kvasir-v2": ("${MICS_KVASIR_V2}", "Kvasir v2"),
    }
    assert all(d.paper is None for g in (smoke, cpu) for d in g.datasets)


@pytest.mark.parametrize("scale", ["smoke", "cpu", "paper"])
def test_ablation_grids(scale):
    t3, t4, oc = _grid(f"table3-{scale}"), _grid(f"table4-{scale}"), _grid(f"open-choices-{scale}")
    assert t3.labels == t4.labels == (0.5,)
    c3 = {c.name: c.config().pretrain for c in expand_cells(t3) if c.seed == t3.seeds[0]}
    assert c3["no-pretrain"].epochs == 0
    assert [(p.consistency, p.reconstruction, p.alignment) for n, p in c3.items() if n != "no-pretrain"] == [
        (True, False, False),
        (True, True, False),
        (True, True, True),
    ]
    c4 = {c.name: c.config().finetune for c in expand_cells(t4) if c.seed == t4.seeds[0]}
    assert (c4["wli-only"].use_nbi, c4["wli-only"].use_svd, c4["wli-only"].use_tmc) == (False, False, False)
    assert (c4["full"].use_nbi, c4["full"].use_svd, c4["full"].use_tmc) == (True, True, True)
    assert len({c.pretrain_key for c in expand_cells(t4)}) == len(t4.seeds) * len(t4.datasets)
    choices = {
        (c.config().svd.shift_mean, c.config().svd.prototype, c.config().pretrain.w_reconstruction)
        for c in expand_cells(oc)
    }
    assert {
        ("zero_mean", "nearest", 10.0),
        ("paper", "nearest", 10.0),
        ("zero_mean", "random", 10.0),
        ("zero_mean", "nearest", 1.0),
    } <= choices
    if scale == "paper":
        assert t3.paper["Kvasir"] == {"no-pretrain": {0.5: 70.33}, "full": {0.5: 77.04}}
        assert t3.paper["Kvasir v2"] == {"no-pretrain": {0.5: 70.92}, "full": {0.5: 78.67}}
    if scale != "paper":
        assert all(d.name == "milk10k" for g in (t3, t4) for d in g.datasets)


# -------------------------------------------------------------------------------------------- planning


def _finish(out: Path, cid: str, top1: float = 0.5, encoders: bool = False, **extra) -> Path:
    rd = bench.run_dir_of(out, cid)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "run.json").write_text(
        json.dumps({"preset": "smoke", "git_commit": "abc1234", "classes": ["x", "y"]})
    )
    (rd / "metrics.json").write_text(
        json.dumps(
            {
                "test": {"top1": top1, "balanced_accuracy": top1 / 2, "macro_f1": top1 / 4},
                "wall_s": 10.0,
                **extra,
            }
        )
    )
    if encoders:
        _encoders(out, cid)
    return rd


def _encoders(out: Path, cid: str) -> None:
    (bench.run_dir_of(out, cid) / "pretrain").mkdir(parents=True, exist_ok=True)
    (bench.run_dir_of(out, cid) / "pretrain" / "encoders.json").write_text("{}")


def test_plan_skips_finished_resumes_started_and_shares_pretraining(tmp_path):
    cells = [c for c in expand_cells(small_grid()) if c.dataset == "a"]
    _finish(tmp_path, "a__fixmatch-standard__l50__s0")
    (bench.run_dir_of(tmp_path, "a__fixmatch-standard__l10__s0")).mkdir(parents=True)
    (bench.run_dir_of(tmp_path, "a__fixmatch-standard__l10__s0") / "run.json").write_text("{}")
    plan = plan_cells(cells, tmp_path)
    assert [c.id for c in plan.done] == ["a__fixmatch-standard__l50__s0"]
    tasks = {t.cell.id: t for t in plan.tasks}
    assert (
        tasks["a__fixmatch-standard__l10__s0"].resume and not tasks["a__fixmatch-multimodal__l50__s0"].resume
    )
    owner, other = tasks["a__mics__l50__s0"], tasks["a__mics__l10__s0"]
    assert (owner.pretrained, owner.waits_for, owner.role) == (None, None, "pre-trains")
    assert (other.pretrained, other.waits_for) == (None, "a__mics__l50__s0")
    assert tasks["a__mics__l50__s1"].role == "pre-trains"  # another seed, another pre-training
    assert plan.n_pretrainings == 2

    # once the owner's encoders exist (even in a cell left out by --only), later benches reuse them
    _finish(tmp_path, "a__mics__l50__s0", encoders=True)
    selected = [c for c in cells if c.id == "a__mics__l10__s0"]
    plan = plan_cells(selected, tmp_path, all_cells=cells)
    assert plan.tasks[0].pretrained == bench.run_dir_of(tmp_path, "a__mics__l50__s0")
    assert plan.n_pretrainings == 0


def test_plan_names_a_cell_without_pretraining_and_does_not_count_it(tmp_path):
    cells = [c for c in expand_cells(_grid("table3-smoke")) if c.seed == 0]
    plan = plan_cells(cells, tmp_path)
    roles = {t.cell.name: t.role for t in plan.tasks}
    assert roles["no-pretrain"] == "no pre-training (random init)"
    assert roles["cons"] == roles["cons-rec"] == roles["full"] == "pre-trains"
    assert plan.n_pretrainings == 3
    assert "[no pre-training (random init)]" in bench.describe_plan(plan, tmp_path)


def test_a_started_owner_resumes_its_own_pretraining(tmp_path):
    cells = [c for c in expand_cells(small_grid()) if c.dataset == "a" and c.method == "mics" and c.seed == 0]
    rd = bench.run_dir_of(tmp_path, cells[1].id)
    rd.mkdir(parents=True)
    (rd / "run.json").write_text("{}")
    _encoders(tmp_path, cells[1].id)
    tasks = plan_cells(cells, tmp_path).tasks
    assert tasks[1].resume and (tasks[1].pretrained, tasks[1].waits_for) == (None, None)
    assert tasks[0].pretrained == rd  # its finished pre-training serves the other ratio


def _recorded_run(rd: Path, cell, cfg, *, method: str = "mics") -> Path:
    """A run folder as ``mics run`` leaves it after pre-training: run.json, config.yaml, encoders."""
    from mics.config import dump_yaml

    (rd / "pretrain").mkdir(parents=True)
    (rd / "run.json").write_text(
        json.dumps({"method": method, "data": cell.data, "pair": cell.pair, "seed": cell.seed})
    )
    dump_yaml(cfg, rd / "config.yaml")
    (rd / "pretrain" / "encoders.json").write_text("{}")
    return rd


def test_reuse_finds_pretrainings_of_other_benches_by_what_they_recorded(tmp_path):
    cells = {c.id: c for c in expand_cells(small_grid())}
    cell = cells["a__mics__l10__s0"]
    cfg = cell.config()
    other = tmp_path / "other"
    same = _recorded_run(other / "runs" / "x__full__l50__s0", cell, cfg)
    # a pre-training of another seed, another config, and a baseline: none matches the cell
    _recorded_run(other / "runs" / "y", cells["a__mics__l10__s1"], cells["a__mics__l10__s1"].config())
    _recorded_run(other / "runs" / "z", cell, apply_overrides(cfg, ["pretrain.epochs=7"]))
    _recorded_run(other / "runs" / "w", cell, cfg, method="supervised")
    found = bench.reusable_pretrainings([other])
    assert found[cell.pretrain_key] == same
    assert sorted(p.name for p in found.values()) == ["x__full__l50__s0", "y", "z"]  # not the baseline
    plan = plan_cells([cell, cells["a__mics__l50__s0"]], tmp_path / "new", reuse=found)
    assert [t.pretrained for t in plan.tasks] == [same, same] and plan.n_pretrainings == 0
    # a single run folder works too; a folder that is neither is a clear error
    assert bench.reusable_pretrainings([same]) == {cell.pretrain_key: same}
    with pytest.raises(GridError, match="neither a bench folder"):
        bench.reusable_pretrainings([tmp_path / "new"])


def test_commands_of_cells(tmp_path):
    g = small_grid(
        datasets=[{"name": "a", "path": "/d", "pair": "suffix:x,y", "skip_bad": True}],
        set=["finetune.epochs=1"],
    )
    cells = {c.id: c for c in expand_cells(g)}
    cmd = cells["a__mics__l10__s1"].command(
        tmp_path / "r", resume=True, pretrained=tmp_path / "p", python="py"
    )
    assert cmd[:5] == ["py", "-m", "mics", "--debug", "run"]
    text = " ".join(cmd)
    for part in (
        "--data /d",
        "--pair suffix:x,y",
        "--preset smoke",
        "--labels 0.1",
        "--seed 1",
        "--set finetune.epochs=1",
        "--skip-bad",
        "--resume",
        f"--pretrained {tmp_path / 'p'}",
    ):
        assert part in text
    cmd = cells["a__fixmatch-multimodal__l50__s0"].command(tmp_path / "r", python="py")
    assert cmd[4:9] == ["baseline", "--method", "fixmatch", "--way", "multimodal"]
    assert "--resume" not in cmd and "--pretrained" not in cmd


# ------------------------------------------------------------------------------------------- scheduler

FAKE_MICS = """#!{python}
# plays `python -m mics --debug run|baseline ...`: writes what a run folder needs and logs its arguments
import json, os, sys, time
from pathlib import Path
args = sys.argv[4:]
opts = {{}}
i = 1
while i < len(args):
    if args[i] in ("--resume", "--skip-bad"):
        opts[args[i]] = True; i += 1
    else:
        opts.setdefault(args[i], []).append(args[i + 1]); i += 2
out = Path(opts["--out"][0])
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps({{"cell": out.name, "command": args[0], "resume": "--resume" in opts,
                         "pretrained": opts.get("--pretrained", [None])[0],
                         "threads": os.environ.get("OMP_NUM_THREADS"), "t": time.time()}}) + "\\n")
if Path(opts["--data"][0]).name == "broken":
    print("error: the data is broken", file=sys.stderr)
    sys.exit(2)
out.mkdir(parents=True, exist_ok=True)
(out / "run.json").write_text(json.dumps({{"preset": "smoke", "git_commit": "f00", "classes": ["x", "y"]}}))
if args[0] == "run" and "--pretrained" not in opts:
    time.sleep(0.3)
    (out / "pretrain").mkdir(exist_ok=True)
    (out / "pretrain" / "encoders.json").write_text("{{}}")
seed = int(opts["--seed"][0])
top1 = 0.5 + 0.1 * seed + (0.2 if args[0] == "run" else 0.0)
(out / "metrics.json").write_text(json.dumps({{"test": {{"top1": top1, "balanced_accuracy": top1,
                                                       "macro_f1": top1}}, "wall_s": 1.5}}))
"""


@pytest.fixture()
def fake_python(tmp_path, monkeypatch) -> Path:
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_MICS.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    return exe


def _calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _fake_grid(tmp_path: Path, **extra) -> Grid:
    for name in ("good", "broken"):
        (tmp_path / name).mkdir(exist_ok=True)
    data = {
        "name": "fake",
        "preset": "smoke",
        "seeds": [0, 1],
        "labels": [0.5, 0.1],
        "datasets": [{"name": "good", "path": str(tmp_path / "good")}],
        "methods": ["mics", {"name": "fixmatch", "ways": ["standard"]}],
    }
    data.update(extra)
    return parse_grid(data)


def test_bench_runs_each_cell_once_shares_pretraining_and_resumes(tmp_path, fake_python):
    out = tmp_path / "bench"
    grid = _fake_grid(tmp_path)
    _finish(out, "good__fixmatch-standard__l50__s1")  # finished by an earlier bench: skipped
    partial = bench.run_dir_of(out, "good__fixmatch-standard__l10__s1")
    partial.mkdir(parents=True)
    (partial / "run.json").write_text("{}")  # killed mid-run: resumed
    result = bench.run_bench(grid, out, jobs=2, python=str(fake_python), poll_s=0.05, progress=False)
    calls = {c["cell"]: c for c in _calls(tmp_path)}
    assert len(calls) == 7 and "good__fixmatch-standard__l50__s1" not in calls
    assert calls["good__fixmatch-standard__l10__s1"]["resume"]
    assert not calls["good__fixmatch-standard__l10__s0"]["resume"]
    assert calls["good__mics__l50__s0"]["pretrained"] is None
    assert calls["good__mics__l10__s0"]["pretrained"] == str(bench.run_dir_of(out, "good__mics__l50__s0"))
    assert calls["good__mics__l10__s1"]["pretrained"] == str(bench.run_dir_of(out, "good__mics__l50__s1"))
    assert calls["good__mics__l10__s0"]["t"] >= calls["good__mics__l50__s0"]["t"]
    assert {c["threads"] for c in calls.values()} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
    assert not result.failed and len(result.done) == 8 and len(result.ran) == 7
    rows = bench.read_csv(result.results_csv)
    assert len(rows) == 8
    mics_l10_s0 = next(r for r in rows if r["cell"] == "good__mics__l10__s0")
    assert mics_l10_s0["pretrained_from"] == "good__mics__l50__s0" and mics_l10_s0["git_commit"] == "f00"
    state = json.loads((out / "bench.json").read_text())["cells"]
    assert state["good__mics__l10__s0"]["status"] == "done"

    # a second bench over the same folder has nothing left to do
    (tmp_path / "calls.jsonl").unlink()
    again = bench.run_bench(grid, out, python=str(fake_python), poll_s=0.05, progress=False)
    assert _calls(tmp_path) == [] and again.ran == [] and len(again.done) == 8


def test_a_failing_cell_does_not_stop_the_bench_and_its_dependents_are_skipped(tmp_path, fake_python):
    grid = _fake_grid(
        tmp_path,
        seeds=[0],
        datasets=[
            {"name": "bad", "path": str(tmp_path / "broken")},
            {"name": "good", "path": str(tmp_path / "good")},
        ],
    )
    out = tmp_path / "bench"
    result = bench.run_bench(grid, out, python=str(fake_python), poll_s=0.05, progress=False)
    called = [c["cell"] for c in _calls(tmp_path)]
    assert "bad__mics__l10__s0" not in called  # its pre-training owner failed: never started
    assert set(result.failed) == {
        "bad__mics__l50__s0",
        "bad__mics__l10__s0",
        "bad__fixmatch-standard__l50__s0",
        "bad__fixmatch-standard__l10__s0",
    }
    assert "the data is broken" in result.failed["bad__mics__l50__s0"]
    assert "pre-training cell bad__mics__l50__s0 failed" in result.failed["bad__mics__l10__s0"]
    assert sorted(result.ran) == sorted(c.id for c in expand_cells(grid) if c.dataset == "good")
    assert "the data is broken" in (out / "logs" / "bad__mics__l50__s0.log").read_text()
    md = result.results_md.read_text()
    assert "Not finished (4)" in md and "`bad__mics__l10__s0`" in md


def test_cli_bench_exits_1_when_a_cell_failed(tmp_path, fake_python, monkeypatch, capsys):
    (tmp_path / "broken").mkdir()
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"preset: smoke\ndatasets: [{{name: bad, path: {tmp_path / 'broken'}}}]\nmethods: [mics]\n"
    )
    monkeypatch.setattr(sys, "executable", str(fake_python))
    code = _main(monkeypatch, "bench", "--grid", grid, "--out", tmp_path / "b")
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: bad__mics__l10__s0: exit code 2: error: the data is broken" in captured.err
    assert "0 cell(s) run, 0 finished in all, 1 failed" in captured.out


def test_the_reason_of_a_failure_is_the_last_exception_of_the_log(tmp_path):
    log = tmp_path / "c.log"
    log.write_text(
        "$ python -m mics run ...\nfinetune:  40%|####\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise CheckpointError("bad")\n'
        "mics.engine.checkpoint.CheckpointError: best.safetensors is bad\n\n"
    )
    assert bench.last_error(log) == "mics.engine.checkpoint.CheckpointError: best.safetensors is bad"
    log.write_text("checking images\nerror: class folder 'x' is empty\n")
    assert bench.last_error(log) == "error: class folder 'x' is empty"
    assert bench.last_error(tmp_path / "missing.log") == "no log"


def test_threads_are_shared_out_between_jobs(monkeypatch):
    monkeypatch.delenv("MICS_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert "OMP_NUM_THREADS" not in bench.child_env(1)  # one job: torch's own default
    env = bench.child_env(4)
    assert env["OMP_NUM_THREADS"] == env["MICS_THREADS"] == str(max(1, cpus // 4))
    monkeypatch.setenv("MICS_THREADS", "3")
    assert bench.child_env(1)["OMP_NUM_THREADS"] == "3"


def test_missing_data_is_reported_before_anything_runs(tmp_path, fake_python):
    from mics.data.errors import DataError

    grid = parse_grid(
        {
            "preset": "smoke",
            "datasets": [{"name": "kvasir", "path": "${MICS_NO_SUCH_VAR_X}"}],
            "methods": ["mics"],
        }
    )
    with pytest.raises(DataError, match=r"kvasir.*--set-data"):
        bench.run_bench(grid, tmp_path / "b", python=str(fake_python), progress=False)
    assert _calls(tmp_path) == []


def test_only_selects_cells_by_glob():
    cells = expand_cells(small_grid())
    assert {c.id for c in bench.select_cells(cells, ["a__mics__*__s0"])} == {
        "a__mics__l50__s0",
        "a__mics__l10__s0",
    }
    with pytest.raises(GridError, match="matches none"):
        bench.select_cells(cells, ["nothing*"])


# ----------------------------------------------------------------------------------------- aggregation


def _rows(values: dict[tuple[str, str, float], list[float]], dataset: str = "d") -> list[dict]:
    return [
        {
            "dataset": dataset,
            "method": m,
            "way": w,
            "labels": lab,
            "seed": s,
            "top1": v,
            "balanced_accuracy": v / 2,
            "macro_f1": 1 - v,
            "wall_s": 60.0,
        }
        for (m, w, lab), vs in values.items()
        for s, v in enumerate(vs)
    ]


def test_summaries_are_mean_and_sample_std():
    values = [0.70, 0.74, 0.81]
    s = bench.summarise(values)
    assert s.mean == pytest.approx(np.mean(values)) and s.std == pytest.approx(np.std(values, ddof=1))
    assert bench.summarise([0.5]).std == 0.0


def _table_cells(md: str, heading: str) -> dict[str, list[str]]:
    block = md.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [
        ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith(("| method", "| ---"))
    ]
    return {r.split(" | ")[0][2:]: [c.strip(" |") for c in r.split(" | ")[1:]] for r in rows}


def test_results_markdown_bolds_the_best_mean_per_column_and_shows_paper_rows():
    rows = _rows(
        {
            ("mics", "", 0.1): [0.80, 0.84],
            ("mics", "", 0.05): [0.60, 0.62],
            ("fixmatch", "standard", 0.1): [0.70, 0.74],
            ("fixmatch", "standard", 0.05): [0.66, 0.70],
            ("full", "standard", 1.0): [0.9, 0.9],
        }
    )
    rows += _rows({("mics", "", 0.1): [0.5]}, dataset="other")
    grid = parse_grid(
        {
            "preset": "smoke",
            "seeds": [0, 1],
            "datasets": [{"name": "d", "path": "/d", "paper": "Kvasir"}, {"name": "other", "path": "/o"}],
            "methods": [
                {"name": "mics", "label": "MICS"},
                {"name": "fixmatch", "label": "FixMatch"},
                {"name": "full", "method": "supervised"},
            ],
            "paper": {"source": "the paper", "results": {"Kvasir": {"mics": {0.1: 67.17, 0.05: 60.88}}}},
        }
    )
    md = bench.results_markdown(rows, grid)
    top1 = _table_cells(md, "## d: Top-1 accuracy")
    assert top1["MICS"] == [f"**82.00 ± {100 * np.std([0.8, 0.84], ddof=1):.2f}**", "61.00 ± 1.41", "–"]
    assert top1["FixMatch (standard)"] == ["72.00 ± 2.83", "**68.00 ± 2.83**", "–"]
    assert top1["full (standard)"] == ["–", "–", "90.00 ± 0.00"]  # alone in its column: nothing to beat
    assert top1["*MICS, paper (Kvasir)*"] == ["*67.17*", "*60.88*", "–"]
    assert "| method | 10 % | 5 % | 100 % |" in md
    f1 = _table_cells(md, "## d: Macro-F1")
    assert f1["FixMatch (standard)"][0].startswith("**28.00")  # lower top-1 -> higher (1 - v) macro-F1 here
    assert not any("paper" in k for k in f1)
    other = _table_cells(md, "## other: Top-1 accuracy")
    assert other == {
        "MICS": ["50.00 (n=1)"]
    }  # one of two seeds finished; no paper rows: not the paper's data


def test_a_lead_within_the_seeds_spread_is_a_tie_not_bold():
    md = bench.markdown_table(
        {
            ("a", ""): {0.1: bench.summarise([0.50, 0.56]), 0.05: bench.summarise([0.40, 0.42])},
            ("b", ""): {0.1: bench.summarise([0.49, 0.53]), 0.05: bench.summarise([0.30, 0.31])},
            ("c", ""): {0.1: bench.summarise([0.20, 0.22])},
        },
        labels=[0.1, 0.05],
    )
    # 10 %: a leads b by 2 points, a's std is 4.24 -> tie, no bold; 5 %: 10 points apart -> bold
    assert "**53.00" not in md and "**41.00 ± 1.41**" in md
    assert "- 10 %: tie, a and b within the seeds' spread." in md.splitlines()


def test_one_seed_is_never_bold_and_lower_is_better_for_ece():
    one = bench.markdown_table(
        {("a", ""): {0.1: bench.summarise([0.5])}, ("b", ""): {0.1: bench.summarise([0.4])}}, labels=[0.1]
    )
    assert "**" not in one and "- 10 %: best mean a, from one seed (no spread to compare)." in one
    ece = bench.markdown_table(
        {("a", ""): {0.1: bench.summarise([0.30, 0.31])}, ("b", ""): {0.1: bench.summarise([0.10, 0.11])}},
        labels=[0.1],
        lower_is_better=True,
    )
    assert "**10.50 ± 0.71**" in ece and "**30.50" not in ece


def test_results_csv_and_md_from_metrics_files(tmp_path):
    grid = small_grid(seeds=[0, 1], labels=[0.1], datasets=[{"name": "a", "path": "/a"}], methods=["mics"])
    _finish(tmp_path, "a__mics__l10__s0", top1=0.6)
    _finish(tmp_path, "a__mics__l10__s1", top1=0.7)
    csv_path, md_path = bench.write_results(grid, tmp_path)
    with open(csv_path, newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert list(raw[0]) == list(bench.CSV_COLUMNS)
    assert [
        (r["dataset"], r["method"], r["way"], r["labels"], r["seed"], r["top1"], r["preset"], r["git_commit"])
        for r in raw
    ] == [
        ("a", "mics", "", "0.1", "0", "0.6", "smoke", "abc1234"),
        ("a", "mics", "", "0.1", "1", "0.7", "smoke", "abc1234"),
    ]
    md = md_path.read_text()
    assert re.search(r"\| mics \| 65\.00 ± 7\.07 \|", md)
    assert "Total wall time of the finished runs: 20 s" in md


# ------------------------------------------------------------------------------------------ command line


def _mics(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MICS_CACHE": os.environ["MICS_CACHE"]}
    return subprocess.run(
        [sys.executable, "-m", "mics", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def _main(monkeypatch, *args: object) -> int:
    """``mics ARGS`` in this process (no interpreter start-up); returns the exit code."""
    from mics.cli import main

    monkeypatch.setattr(sys, "argv", ["mics", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_dry_run_lists_every_cell(tmp_path, monkeypatch, capsys):
    code = _main(
        monkeypatch, "bench", "--grid", CONFIGS / "table2-smoke.yaml", "--out", tmp_path / "b", "--dry-run"
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[-1].startswith("34 cells: 0 done, 0 to resume, 34 new; 2 MICS pre-training(s)")
    assert any(
        ln.startswith("hyperkvasir__siabc-multimodal__l10__s0 ") and "baseline --method siabc" in ln
        for ln in lines
    )
    assert not (tmp_path / "b").exists()


def test_bad_grid_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "g.yaml"
    bad.write_text("datasets: [{name: a, path: /a}]\nmethods: [nosuch]\n")
    code = _main(monkeypatch, "bench", "--grid", bad, "--out", tmp_path / "b", "--dry-run")
    err = capsys.readouterr().err
    assert code == 2 and "unknown method 'nosuch'" in err and "Traceback" not in err


def test_bench_end_to_end_on_the_bundled_sample(tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--grid",
        CONFIGS / "table2-smoke.yaml",
        "--out",
        out,
        "--jobs",
        "2",
        "--only",
        "milk10k__mics__*",
        "--only",
        "milk10k__supervised-standard__*",
        "--only",
        "milk10k__fixmatch-standard__*",
        "--set",
        "pretrain.epochs=1",
        "--set",
        "finetune.epochs=1",
        "--set",
        "ssl.iterations=4",
    ]
    proc = _mics(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = bench.read_csv(out / "results.csv")
    assert sorted((r["method"], r["way"]) for r in rows) == [
        ("fixmatch", "standard"),
        ("mics", ""),
        ("supervised", "standard"),
    ]
    for r in rows:
        assert 0.0 <= r["top1"] <= 1.0 and r["preset"] == "smoke" and r["labels"] == 0.1
        run = out / "runs" / r["cell"]
        assert (run / "metrics.json").exists() and (run / "test_features.npz").exists()
        assert (run / "metrics.jsonl").exists()
    md = (out / "results.md").read_text()
    assert "| MICS |" in md and "| FixMatch (standard) |" in md and "Not finished (31)" in md
    # a second bench over the folder finds the three cells finished and runs nothing
    proc = _mics(*args)
    assert proc.returncode == 0 and "0 cell(s) run, 3 finished" in proc.stdout


def test_usage_error_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    # a glob given twice without repeating --only is an extra argument: click's usage error
    code = _main(
        monkeypatch, "bench", "--grid", CONFIGS / "table2-smoke.yaml", "--out", tmp_path, "--only", "a", "b"
    )
    err = capsys.readouterr().err
    assert code == 2 and "unexpected extra argument" in err and "Traceback" not in err
