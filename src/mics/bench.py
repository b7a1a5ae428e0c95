"""Grid runner for the paper's tables: expand a grid YAML into cells, run each cell in its own process,
resume what an interrupted bench left, and aggregate the run folders into ``results.csv`` / ``results.md``.

    mics bench --grid configs/table2-smoke.yaml --out runs/table2-smoke --jobs 2

A *cell* is one (data set, method row, way, label ratio, seed) and one run folder ``OUT/runs/<cell-id>/``,
made by ``python -m mics run|baseline`` in a subprocess: a crash in one cell does not stop the bench, and
every cell returns its memory. A cell whose ``metrics.json`` exists is skipped; a cell with a run folder
but no ``metrics.json`` is continued with ``--resume``. Pre-training never sees a label, so MICS cells
that differ only in label ratio (or in fine-tuning options) share one pre-training: the first such cell
pre-trains and the others get ``--pretrained`` as soon as its encoders are written.

Grid YAML (every key but ``datasets`` and ``methods`` optional)::

    name: table2-smoke              # defaults to the file name
    title: Table II (smoke)
    preset: smoke                   # smoke | cpu | paper
    seeds: [0, 1, 2]
    labels: [0.5, 0.3, 0.1, 0.05]   # label ratios of the training split
    ways: [standard, multimodal]    # default ways of the baselines (MICS has none)
    set: [finetune.epochs=5]        # config overrides of every cell
    datasets:
      - {name: kvasir, path: ${MICS_KVASIR}, pair: auto, paper: Kvasir, labels: [...], set: [...]}
    methods:
      - mics                        # shorthand: name = method
      - {name: fully-supervised, method: supervised, ways: [standard], labels: [1.0]}
      - {name: no-pretrain, method: mics, label: "No pre-training", set: [pretrain.epochs=0]}
    cells:                          # overrides of the cells whose id matches a glob
      - {match: "kvasir__fixmatch-*", set: [ssl.threshold=0.9]}
    paper:                          # the paper's top-1 (%), shown beside rows of data sets tagged ``paper``
      source: Lin et al., Table II
      results: {Kvasir: {mics: {0.5: 76.67}}}

Overrides apply in the order grid, data set, method, cell match, command line (the last wins).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mics.config import PRESETS, ConfigError, RunConfig, apply_overrides, load_yaml, to_dict
from mics.config import preset as preset_config

MICS = "mics"
# the same names as mics.pipeline.BASELINE_METHODS / WAYS, repeated so that the bench process need not
# import torch (tests check that the two stay equal)
BASELINES = ("supervised", "fixmatch", "flexmatch", "dash", "freematch", "softmatch", "habit", "siabc")
WAYS = ("standard", "multimodal")
METRICS = ("top1", "balanced_accuracy", "macro_f1")
METRIC_TITLES = {"top1": "Top-1 accuracy", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro-F1"}
CSV_COLUMNS = (
    "dataset",
    "method",
    "way",
    "labels",
    "seed",
    "top1",
    "balanced_accuracy",
    "macro_f1",
    "wall_s",
    "preset",
    "git_commit",
    "cell",
    "algorithm",
    "pretrained_from",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class GridError(ConfigError):
    """A grid file, a cell selection or a bench folder that cannot be used as asked."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str  # as written in the grid: may hold ${ENV_VARS}; resolved by :func:`resolve_data_path`
    pair: str = "auto"
    paper: str | None = None  # key of ``Grid.paper`` when this is one of the paper's data sets
    labels: tuple[float, ...] | None = None
    overrides: tuple[str, ...] = ()
    skip_bad: bool = False


@dataclass(frozen=True)
class MethodSpec:
    name: str  # row name, used in cell ids and as the key of the paper's numbers
    method: str  # mics or one of BASELINES
    ways: tuple[str | None, ...]  # (None,) for mics
    label: str  # display name in tables and figures
    labels: tuple[float, ...] | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class CellOverride:
    match: str  # fnmatch glob on cell ids
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    name: str
    title: str
    preset: str
    seeds: tuple[int, ...]
    labels: tuple[float, ...]
    datasets: tuple[DatasetSpec, ...]
    methods: tuple[MethodSpec, ...]
    overrides: tuple[str, ...] = ()
    cell_overrides: tuple[CellOverride, ...] = ()
    paper: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)  # tag -> row -> ratio -> %
    paper_source: str = ""
    source: Path | None = None  # the grid file

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise GridError(f"grid {self.name!r} has no data set {name!r}")

    def row_label(self, name: str, way: str | None) -> str:
        """Display name of a (method row, way), e.g. ``FixMatch (multimodal)``."""
        label = next((m.label for m in self.methods if m.name == name), name)
        return label if not way else f"{label} ({way})"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``OUT/runs/<id>/``."""

    id: str
    dataset: str
    data: str  # the data folder (absolute when it was found) or the unresolved path as written
    pair: str
    name: str
    method: str
    way: str | None
    labels: float
    seed: int
    preset: str
    overrides: tuple[str, ...]
    skip_bad: bool = False
    pretrain_key: str | None = None  # MICS cells with equal keys can share one pre-training

    def config(self) -> RunConfig:
        return apply_overrides(preset_config(self.preset), list(self.overrides))

    def command(
        self,
        run_dir: Path,
        *,
        resume: bool = False,
        pretrained: Path | None = None,
        python: str | None = None,
    ) -> list[str]:
        """The ``python -m mics run|baseline`` command line of this cell."""
        cmd = [python or sys.executable, "-m", "mics", "--debug"]
        if self.method == MICS:
            cmd += ["run"]
        else:
            cmd += ["baseline", "--method", self.method, "--way", self.way or "standard"]
        cmd += [
            "--data",
            self.data,
            "--out",
            str(run_dir),
            "--pair",
            self.pair,
            "--preset",
            self.preset,
            "--labels",
            f"{self.labels:g}",
            "--seed",
            str(self.seed),
        ]
        for item in self.overrides:
            cmd += ["--set", item]
        if self.skip_bad:
            cmd.append("--skip-bad")
        if resume:
            cmd.append("--resume")
        if pretrained is not None:
            cmd += ["--pretrained", str(pretrained)]
        return cmd


# ---------------------------------------------------------------------------------------------------- grids


def _as_tuple(value: Any, what: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise GridError(f"{what} must be a list, got {value!r}")


def _ratios(value: Any, what: str) -> tuple[float, ...]:
    out = []
    for v in _as_tuple(value, what):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise GridError(f"{what}: label ratio {v!r} is not a number") from None
        if not 0.0 < x <= 1.0:
            raise GridError(f"{what}: label ratio {v!r} must be a fraction in (0, 1], e.g. 0.1 for 10 %")
        out.append(x)
    return tuple(out)


def _overrides(value: Any, what: str) -> tuple[str, ...]:
    items = _as_tuple(value, what)
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise GridError(f"{what}: override {item!r} must look like section.key=value")
    return items


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or "__" in value:
        raise GridError(
            f"{what}: name {value!r} must be letters, digits and _ . + - (no '__': it separates "
            "the parts of a cell id)"
        )
    return value


def _check_keys(entry: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise GridError(
            f"{what}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}"
        )


def _parse_dataset(entry: Any, i: int) -> DatasetSpec:
    what = f"datasets[{i}]"
    if not isinstance(entry, dict):
        raise GridError(f"{what} must be a mapping with at least name and path")
    _check_keys(entry, {"name", "path", "pair", "paper", "labels", "set", "skip_bad"}, what)
    if "path" not in entry:
        raise GridError(f"{what}: missing 'path'")
    return DatasetSpec(
        name=_name(entry.get("name"), what),
        path=str(entry["path"]),
        pair=str(entry.get("pair", "auto")),
        paper=None if entry.get("paper") is None else str(entry["paper"]),
        labels=_ratios(entry["labels"], what) if "labels" in entry else None,
        overrides=_overrides(entry.get("set"), what),
        skip_bad=bool(entry.get("skip_bad", False)),
    )


def _parse_method(entry: Any, i: int, default_ways: tuple[str, ...]) -> MethodSpec:
    what = f"methods[{i}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise GridError(f"{what} must be a method name or a mapping")
    _check_keys(entry, {"name", "method", "ways", "label", "labels", "set"}, what)
    name = _name(entry.get("name"), what)
    method = str(entry.get("method", name))
    if method != MICS and method not in BASELINES:
        raise GridError(f"{what}: unknown method {method!r}; choose mics or one of {', '.join(BASELINES)}")
    if method == MICS:
        if entry.get("ways"):
            raise GridError(f"{what}: mics has no ways (standard / multimodal are for the baselines)")
        ways: tuple[str | None, ...] = (None,)
    else:
        ways = tuple(str(w) for w in _as_tuple(entry.get("ways"), what)) or default_ways
        bad = [w for w in ways if w not in WAYS]
        if bad:
            raise GridError(f"{what}: unknown way(s) {bad}; choose from {', '.join(WAYS)}")
    return MethodSpec(
        name=name,
        method=method,
        ways=ways,
        label=str(entry.get("label", name)),
        labels=_ratios(entry["labels"], what) if "labels" in entry else None,
        overrides=_overrides(entry.get("set"), what),
    )


def _parse_paper(block: Any) -> tuple[dict[str, dict[str, dict[float, float]]], str]:
    if block is None:
        return {}, ""
    if not isinstance(block, dict):
        raise GridError("paper must be a mapping with 'results' (and optionally 'source')")
    _check_keys(block, {"source", "results"}, "paper")
    results: dict[str, dict[str, dict[float, float]]] = {}
    for tag, rows in (block.get("results") or {}).items():
        if not isinstance(rows, dict):
            raise GridError(f"paper.results.{tag} must map row names to {{ratio: top-1 %}}")
        results[str(tag)] = {}
        for row, values in rows.items():
            if not isinstance(values, dict):
                raise GridError(f"paper.results.{tag}.{row} must map label ratios to top-1 %")
            results[str(tag)][str(row)] = {
                _ratios(k, f"paper.results.{tag}.{row}")[0]: float(v) for k, v in values.items()
            }
    return results, str(block.get("source", ""))


def parse_grid(data: Mapping[str, Any], *, name: str = "grid", source: Path | None = None) -> Grid:
    """A :class:`Grid` from the mapping of a grid YAML file (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise GridError("a grid must be a mapping with 'datasets' and 'methods'")
    _check_keys(
        data,
        {
            "name",
            "title",
            "preset",
            "seeds",
            "labels",
            "ways",
            "set",
            "datasets",
            "methods",
            "cells",
            "paper",
        },
        "grid",
    )
    preset = str(data.get("preset", "cpu"))
    if preset not in PRESETS:
        raise GridError(f"grid preset {preset!r} is not one of {', '.join(PRESETS)}")
    seeds = tuple(int(s) for s in _as_tuple(data.get("seeds", [0]), "seeds"))
    default_ways = tuple(str(w) for w in _as_tuple(data.get("ways", list(WAYS)), "ways"))
    if not seeds:
        raise GridError("grid needs at least one seed")
    datasets = tuple(_parse_dataset(d, i) for i, d in enumerate(_as_tuple(data.get("datasets"), "datasets")))
    methods = tuple(
        _parse_method(m, i, default_ways) for i, m in enumerate(_as_tuple(data.get("methods"), "methods"))
    )
    if not datasets or not methods:
        raise GridError("grid needs at least one entry under 'datasets' and one under 'methods'")
    for kind, names in (("data set", [d.name for d in datasets]), ("method", [m.name for m in methods])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GridError(f"grid has the {kind} name(s) {', '.join(dup)} more than once")
    cells = []
    for i, entry in enumerate(_as_tuple(data.get("cells"), "cells")):
        if not isinstance(entry, dict) or "match" not in entry:
            raise GridError(f"cells[{i}] must be a mapping with 'match' (a glob on cell ids) and 'set'")
        _check_keys(entry, {"match", "set"}, f"cells[{i}]")
        cells.append(CellOverride(str(entry["match"]), _overrides(entry.get("set"), f"cells[{i}]")))
    paper, paper_source = _parse_paper(data.get("paper"))
    return Grid(
        name=str(data.get("name", name)),
        title=str(data.get("title", data.get("name", name))),
        preset=preset,
        seeds=seeds,
        labels=_ratios(data.get("labels", [0.1]), "labels"),
        datasets=datasets,
        methods=methods,
        overrides=_overrides(data.get("set"), "set"),
        cell_overrides=tuple(cells),
        paper=paper,
        paper_source=paper_source,
        source=source,
    )


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid YAML file."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} not found (the grids of the paper's tables are in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise GridError(f"{path} is not valid YAML: {err}") from None
    return parse_grid(data or {}, name=path.stem, source=path)


def format_ratio(labels: float) -> str:
    """0.05 -> '5', 0.125 -> '12.5', 1.0 -> '100': the label ratio in percent, as short as it is exact."""
    return f"{round(100 * labels, 6):g}"


def cell_id(dataset: str, name: str, way: str | None, labels: float, seed: int) -> str:
    """``<dataset>__<name>[-<way>]__l<percent>__s<seed>``, e.g. ``milk10k__fixmatch-standard__l10__s0``."""
    row = name if not way else f"{name}-{way}"
    return f"{dataset}__{row}__l{format_ratio(labels)}__s{seed}"


def resolve_data_path(path: str, grid_file: Path | None = None) -> str:
    """Expand ``${VARS}`` and ``~``; a relative path is looked up in the current folder, then above the grid
    file's folder (the repository root for the grids in configs/). Returned absolute when found, as
    expanded otherwise (a missing folder is reported when a cell needs it)."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    candidates = [Path(expanded)]
    if not Path(expanded).is_absolute() and grid_file is not None:
        candidates += [grid_file.resolve().parent / expanded, grid_file.resolve().parent.parent / expanded]
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    return expanded


def pretrain_key(cell: Cell, cfg: RunConfig) -> str:
    """Everything pre-training depends on: data, pairing, seed (split and initialisation), and the data,
    model and pre-training sections of the config. Label ratio and fine-tuning options are not in it."""
    return _pretrain_key(cell.data, cell.pair, cell.seed, cell.skip_bad, cfg)


def _pretrain_key(data: str, pair: str, seed: int, skip_bad: bool, cfg: RunConfig) -> str:
    payload = {
        "path": data,
        "pair": pair,
        "seed": seed,
        "skip_bad": skip_bad,
        "precision": cfg.precision,
        **{k: to_dict(getattr(cfg, k)) for k in ("data", "model", "pretrain")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def recorded_pretrain_key(run_dir: Path) -> str | None:
    """The pre-training key of a MICS run folder with finished encoders, from what the run recorded
    (``run.json`` and the resolved ``config.yaml``); None for anything else. A run that dropped bad files
    counts as ``--skip-bad``; one that did not matches only cells without it, so a key never matches a
    pre-training on other data."""
    run_dir = Path(run_dir)
    if not _has_encoders(run_dir) or not (run_dir / "config.yaml").is_file():
        return None
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        if info.get("method") != MICS:
            return None
        return _pretrain_key(
            str(info["data"]),
            str(info["pair"]),
            int(info["seed"]),
            (run_dir / "dropped.csv").exists(),
            load_yaml(run_dir / "config.yaml"),
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None


def reusable_pretrainings(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Pre-training key -> run folder, over finished MICS pre-trainings in ``paths`` (bench folders, whose
    ``runs/*`` are scanned, or single run folders), for ``mics bench --reuse``."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / "run.json").is_file():
            candidates = [path]
        elif (path / "runs").is_dir():
            candidates = sorted(p for p in (path / "runs").iterdir() if p.is_dir())
        else:
            raise GridError(
                f"--reuse {path}: neither a bench folder (with runs/) nor a run folder (with run.json)"
            )
        for rd in candidates:
            key = recorded_pretrain_key(rd)
            if key is not None:
                found.setdefault(key, rd)
    return found


def expand_cells(
    grid: Grid, *, data_paths: Mapping[str, str] | None = None, overrides: Sequence[str] = ()
) -> list[Cell]:
    """Every cell of the grid in run order (data set, seed, method row, way, label ratio), with its
    overrides checked against the config. ``data_paths`` replaces data set paths by name (``--set-data``);
    ``overrides`` (``--set``) apply to every cell, last."""
    data_paths = dict(data_paths or {})
    unknown = set(data_paths) - {d.name for d in grid.datasets}
    if unknown:
        raise GridError(
            f"--set-data names {', '.join(sorted(unknown))} are not data sets of grid {grid.name!r} "
            f"({', '.join(d.name for d in grid.datasets)})"
        )
    cells: list[Cell] = []
    for ds in grid.datasets:
        raw = data_paths.get(ds.name, ds.path)
        data = resolve_data_path(raw, grid.source if ds.name not in data_paths else None)
        for seed in grid.seeds:
            for m in grid.methods:
                for way in m.ways:
                    for labels in m.labels or ds.labels or grid.labels:
                        cid = cell_id(ds.name, m.name, way, labels, seed)
                        extra = tuple(
                            x
                            for co in grid.cell_overrides
                            if fnmatch.fnmatchcase(cid, co.match)
                            for x in co.overrides
                        )
                        cell = Cell(
                            id=cid,
                            dataset=ds.name,
                            data=data,
                            pair=ds.pair,
                            name=m.name,
                            method=m.method,
                            way=way,
                            labels=labels,
                            seed=seed,
                            preset=grid.preset,
                            overrides=(*grid.overrides, *ds.overrides, *m.overrides, *extra, *overrides),
                            skip_bad=ds.skip_bad,
                        )
                        try:
                            cfg = cell.config()
                        except ConfigError as err:
                            raise GridError(f"cell {cid}: {err}") from None
                        if m.method == MICS:
                            cell = replace(cell, pretrain_key=pretrain_key(cell, cfg))
                        cells.append(cell)
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise GridError(
            f"grid {grid.name!r} makes the cell id(s) {', '.join(dup[:5])} more than once "
            "(repeated label ratios or seeds?)"
        )
    return cells


def select_cells(cells: Sequence[Cell], only: Sequence[str]) -> list[Cell]:
    """The cells whose id matches any of the globs in ``only`` (all when it is empty)."""
    if not only:
        return list(cells)
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.id, pat) for pat in only)]
    if not chosen:
        raise GridError(
            f"--only {' '.join(only)} matches none of the {len(cells)} cells; list them with --dry-run"
        )
    return chosen


# ------------------------------------------------------------------------------------------------- planning


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file (the bench's own
    helper: mics.engine.checkpoint has one too, but importing it starts torch in the bench process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir_of(out: Path, cell: Cell | str) -> Path:
    return Path(out) / "runs" / (cell if isinstance(cell, str) else cell.id)


def _has_encoders(run_dir: Path) -> bool:
    # the JSON half of a checkpoint is written last, so its presence means the weights are complete
    return (run_dir / "pretrain" / "encoders.json").exists()


@dataclass
class Task:
    """A cell that still has to run, and where its pre-trained encoders come from."""

    cell: Cell
    run_dir: Path
    resume: bool  # the run folder exists: continue it
    pretrained: Path | None = None  # a finished pre-training to reuse
    waits_for: str | None = None  # the id of the cell whose pre-training this one will reuse

    @property
    def role(self) -> str:
        if self.cell.method != MICS:
            return "-"
        if self.pretrained is not None:
            return f"reuses {self.pretrained.name}"
        if self.waits_for is not None:
            return f"reuses {self.waits_for}"
        return "pre-trains"


@dataclass
class Plan:
    done: list[Cell]
    tasks: list[Task]

    @property
    def n_pretrainings(self) -> int:
        return sum(1 for t in self.tasks if t.cell.method == MICS and t.role == "pre-trains")


def plan_cells(
    cells: Sequence[Cell],
    out: Path,
    *,
    all_cells: Sequence[Cell] | None = None,
    reuse: Mapping[str, Path] | None = None,
) -> Plan:
    """Which cells are finished, which resume, and which pre-training each MICS cell uses.

    A finished pre-training of any grid cell (``all_cells``, not only the selected ones) or of ``reuse``
    (key -> run folder elsewhere, see :func:`reusable_pretrainings`) with the same pre-training key is
    reused; otherwise the first selected cell of that key pre-trains and the others wait for its encoders.
    """
    out = Path(out)
    own: dict[str, Path] = {}
    for c in all_cells if all_cells is not None else cells:
        if c.pretrain_key and c.pretrain_key not in own and _has_encoders(run_dir_of(out, c)):
            own[c.pretrain_key] = run_dir_of(out, c)
    sources = {**(reuse or {}), **own}
    owners: dict[str, str] = {}
    done: list[Cell] = []
    tasks: list[Task] = []
    for c in cells:
        rd = run_dir_of(out, c)
        if (rd / "metrics.json").exists():
            done.append(c)
            continue
        task = Task(c, rd, resume=(rd / "run.json").exists())
        if c.pretrain_key is not None and not _has_encoders(rd):
            if c.pretrain_key in sources:
                task.pretrained = sources[c.pretrain_key]
            elif c.pretrain_key in owners:
                task.waits_for = owners[c.pretrain_key]
            else:
                owners[c.pretrain_key] = c.id
        tasks.append(task)
    return Plan(done, tasks)


def describe_plan(plan: Plan, out: Path, *, python: str | None = None) -> str:
    """The ``--dry-run`` listing: one line per cell with its state and command, then a summary."""
    lines = [f"{'cell':<58} {'state':<7} pre-training / command"]
    for c in plan.done:
        lines.append(f"{c.id:<58} {'done':<7} {run_dir_of(out, c) / 'metrics.json'}")
    for t in plan.tasks:
        pretrained = t.pretrained or (run_dir_of(out, t.waits_for) if t.waits_for else None)
        cmd = shlex.join(t.cell.command(t.run_dir, resume=t.resume, pretrained=pretrained, python=python))
        lines.append(f"{t.cell.id:<58} {'resume' if t.resume else 'new':<7} [{t.role}] {cmd}")
    n_resume = sum(t.resume for t in plan.tasks)
    lines.append(
        f"{len(plan.done) + len(plan.tasks)} cells: {len(plan.done)} done, {n_resume} to resume, "
        f"{len(plan.tasks) - n_resume} new; {plan.n_pretrainings} MICS pre-training(s) to run"
    )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- running


@dataclass
class BenchResult:
    done: list[str]  # cells finished before or during this bench
    ran: list[str]  # cells finished by this bench
    failed: dict[str, str]  # cell id -> reason
    results_csv: Path
    results_md: Path


def _threads(jobs: int) -> int:
    if os.environ.get("MICS_THREADS", "").isdigit():
        return max(1, int(os.environ["MICS_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // jobs)


def child_env(jobs: int) -> dict[str, str]:
    """The environment of a cell's process: with several jobs, the cores are shared out between them
    (torch sizes its thread pool from OMP_NUM_THREADS), so 2 jobs on 2 cores do not fight over 4 threads."""
    env = dict(os.environ)
    if jobs > 1 or "MICS_THREADS" in os.environ:
        n = str(_threads(jobs))
        env.update(MICS_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    return env


_ERROR_LINE = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")


def _last_error(log: Path) -> str:
    """The line of a cell's log that says why it failed: the CLI's ``error: ...`` message or the last
    exception of a traceback (the log ends with the traceback of a crash)."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if ln]
    found = next((ln for ln in reversed(lines) if _ERROR_LINE.match(ln)), lines[-1] if lines else "empty log")
    return found[:300]


class _State:
    """``OUT/bench.json``: per-cell bookkeeping kept across benches (where a cell's pre-training came from,
    its last exit status and log)."""

    def __init__(self, out: Path, grid: Grid, command: str) -> None:
        self.path = out / "bench.json"
        old = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        self.data: dict[str, Any] = {
            "grid": grid.name,
            "grid_file": str(grid.source) if grid.source else None,
            "command": command,
            "cells": old.get("cells", {}),
        }

    def update(self, cell_id: str, **values: Any) -> None:
        # re-read first: benches over disjoint --only selections may share the folder (one per GPU)
        if self.path.exists():
            self.data["cells"] = json.loads(self.path.read_text(encoding="utf-8")).get("cells", {})
        self.data["cells"].setdefault(cell_id, {}).update(values)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _check_data(tasks: Sequence[Task], grid: Grid) -> None:
    missing = {}
    for t in tasks:
        if not Path(t.cell.data).is_dir() and not Path(t.cell.data).is_file():
            missing[t.cell.dataset] = t.cell.data
    if missing:
        from mics.data.errors import DataError

        hints = "; ".join(
            f"{name}: {path!r} (grid path {grid.dataset(name).path!r})" for name, path in missing.items()
        )
        raise DataError(
            f"data not found for {hints}. Set the environment variable named in the grid or pass "
            "--set-data NAME=PATH"
        )


def run_bench(
    grid: Grid,
    out: str | Path,
    *,
    jobs: int = 1,
    only: Sequence[str] = (),
    overrides: Sequence[str] = (),
    data_paths: Mapping[str, str] | None = None,
    reuse: Sequence[str | Path] = (),
    python: str | None = None,
    poll_s: float = 0.5,
    progress: bool = True,
    command: str = "",
) -> BenchResult:
    """Run every unfinished cell of ``grid`` (those matching ``only``) into ``out/runs``, ``jobs`` at a
    time (MICS cells reuse matching pre-trainings found in ``reuse``), then write ``out/results.csv`` and
    ``out/results.md`` from all finished cells of the grid."""
    from tqdm.auto import tqdm

    if jobs < 1:
        raise GridError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    all_cells = expand_cells(grid, data_paths=data_paths, overrides=overrides)
    cells = select_cells(all_cells, only)
    plan = plan_cells(cells, out, all_cells=all_cells, reuse=reusable_pretrainings(reuse))
    _check_data(plan.tasks, grid)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        (out / "grid.yaml").write_text(grid.source.read_text(encoding="utf-8"), encoding="utf-8")
    state = _State(out, grid, command)
    state.save()
    env = child_env(jobs)
    pending = list(plan.tasks)
    running: dict[str, tuple[subprocess.Popen, Task, float, Any]] = {}
    ran: list[str] = []
    failed: dict[str, str] = {}
    bar = tqdm(
        total=len(pending),
        desc=f"bench {grid.name}",
        unit="cell",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    if plan.done:
        bar.write(f"{len(plan.done)} cell(s) already finished; skipped")

    def finish(cid: str, rc: int) -> None:
        proc, task, start, log = running.pop(cid)
        log.close()
        metrics = task.run_dir / "metrics.json"
        wall = round(time.time() - start, 1)
        if rc == 0 and metrics.exists():
            ran.append(cid)
            top1 = json.loads(metrics.read_text(encoding="utf-8"))["test"]["top1"]
            state.update(cid, status="done", returncode=rc, wall_s=wall)
            bar.write(f"done   {cid}: test top-1 {100 * top1:.2f} % ({wall:.0f} s)")
        else:
            reason = f"exit code {rc}: {_last_error(out / 'logs' / f'{cid}.log')}"
            failed[cid] = reason
            state.update(cid, status="failed", returncode=rc, wall_s=wall)
            bar.write(f"FAILED {cid} ({reason}); log: {out / 'logs' / f'{cid}.log'}")
        bar.update(1)

    def start(task: Task) -> None:
        cmd = task.cell.command(task.run_dir, resume=task.resume, pretrained=task.pretrained, python=python)
        log = open(out / "logs" / f"{task.cell.id}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        task.run_dir.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        running[task.cell.id] = (proc, task, time.time(), log)
        state.update(
            task.cell.id,
            status="running",
            resumed=task.resume,
            pretrained_from=str(task.pretrained)
            if task.pretrained
            else state.data["cells"].get(task.cell.id, {}).get("pretrained_from"),
            log=str(out / "logs" / f"{task.cell.id}.log"),
        )

    def ready(task: Task) -> bool | None:
        """True: can start; False: waiting; None: can never start (its pre-training failed)."""
        if task.waits_for is None:
            return True
        owner_dir = run_dir_of(out, task.waits_for)
        if _has_encoders(owner_dir):
            task.pretrained, task.waits_for = owner_dir, None
            return True
        if task.waits_for in failed or (
            task.waits_for not in running and all(t.cell.id != task.waits_for for t in pending)
        ):
            return None
        return False

    try:
        while pending or running:
            for cid, (proc, _, _, _) in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    finish(cid, rc)
            for task in list(pending):
                if len(running) >= jobs:
                    break
                status = ready(task)
                if status is None:
                    pending.remove(task)
                    failed[task.cell.id] = f"its pre-training cell {task.waits_for} failed"
                    bar.write(f"SKIP   {task.cell.id}: pre-training cell {task.waits_for} failed")
                    bar.update(1)
                elif status:
                    pending.remove(task)
                    start(task)
            bar.set_postfix_str(f"running {len(running)}, failed {len(failed)}", refresh=False)
            if running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(running)
        raise
    finally:
        bar.close()
    csv_path, md_path = write_results(grid, out, all_cells)
    done = [c.id for c in all_cells if (run_dir_of(out, c) / "metrics.json").exists()]
    return BenchResult(done=done, ran=ran, failed=failed, results_csv=csv_path, results_md=md_path)


def _stop(running: Mapping[str, tuple[subprocess.Popen, Task, float, Any]], grace_s: float = 30.0) -> None:
    """Stop the cells' processes: a Ctrl-C in a terminal has reached them already (same process group),
    so give them a moment, then interrupt the others once (they stop at a checkpoint boundary) and kill
    what is left after ``grace_s``."""
    procs = [(proc, log) for proc, _, _, log in running.values()]
    deadline = time.time() + 2.0
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.01, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------- aggregation


def collect_rows(cells: Sequence[Cell], out: Path) -> list[dict[str, Any]]:
    """One ``results.csv`` row per finished cell (metrics as fractions, as in ``metrics.json``)."""
    out = Path(out)
    state_path = out / "bench.json"
    state = json.loads(state_path.read_text(encoding="utf-8")).get("cells", {}) if state_path.exists() else {}
    rows = []
    for c in cells:
        rd = run_dir_of(out, c)
        if not (rd / "metrics.json").exists():
            continue
        metrics = json.loads((rd / "metrics.json").read_text(encoding="utf-8"))
        meta = json.loads((rd / "run.json").read_text(encoding="utf-8")) if (rd / "run.json").exists() else {}
        pretrained = state.get(c.id, {}).get("pretrained_from") or ""
        rows.append(
            {
                "dataset": c.dataset,
                "method": c.name,
                "way": c.way or "",
                "labels": c.labels,
                "seed": c.seed,
                **{k: round(float(metrics["test"][k]), 6) for k in METRICS},
                "wall_s": metrics.get("wall_s", ""),
                "preset": meta.get("preset", c.preset),
                "git_commit": meta.get("git_commit") or "",
                "cell": c.id,
                "algorithm": c.method,
                "pretrained_from": Path(pretrained).name if pretrained else "",
            }
        )
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buf.getvalue())
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """``results.csv`` back as rows with numbers parsed."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = dict(r)
            row["labels"], row["seed"] = float(r["labels"]), int(r["seed"])
            for k in (*METRICS, "wall_s"):
                row[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int


def summarise(values: Sequence[float]) -> Summary:
    """Mean and sample (n - 1) standard deviation of one cell's metric over its seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def aggregate(
    rows: Sequence[Mapping[str, Any]], metric: str = "top1"
) -> dict[str, dict[tuple[str, str], dict[float, Summary]]]:
    """dataset -> (method, way) -> label ratio -> summary over seeds; each level in order of first
    appearance."""
    values: dict[str, dict[tuple[str, str], dict[float, list[float]]]] = {}
    for r in rows:
        per_row = values.setdefault(str(r["dataset"]), {}).setdefault(
            (str(r["method"]), str(r["way"] or "")), {}
        )
        per_row.setdefault(float(r["labels"]), []).append(float(r[metric]))
    return {
        ds: {row: {lab: summarise(v) for lab, v in cols.items()} for row, cols in per_ds.items()}
        for ds, per_ds in values.items()
    }


def _fmt(s: Summary, expected_n: int | None) -> str:
    text = f"{100 * s.mean:.2f}" if s.n == 1 else f"{100 * s.mean:.2f} ± {100 * s.std:.2f}"
    if expected_n is not None and s.n < expected_n:
        text += f" (n={s.n})"
    return text


def markdown_table(
    table: Mapping[tuple[str, str], Mapping[float, Summary]],
    *,
    labels: Sequence[float],
    row_label: Any = None,
    expected_n: int | None = None,
    paper: Mapping[str, Mapping[float, float]] | None = None,
    paper_tag: str = "",
) -> str:
    """Rows = (method, way), columns = label ratios, cells = mean ± std in %; the best mean of each column
    (at the shown precision, ties included) in bold. ``paper`` rows (top-1 %) follow the row they name and
    take no part in the bold."""
    row_label = row_label or (lambda name, way: name if not way else f"{name} ({way})")
    best = {}
    for lab in labels:
        means = [round(100 * cols[lab].mean, 2) for cols in table.values() if lab in cols]
        if len(means) > 1:
            best[lab] = max(means)
    lines = [
        "| method | " + " | ".join(f"{format_ratio(lab)} %" for lab in labels) + " |",
        "| --- | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for (name, way), cols in table.items():
        cells = []
        for lab in labels:
            if lab not in cols:
                cells.append("–")
                continue
            text = _fmt(cols[lab], expected_n)
            cells.append(
                f"**{text}**" if lab in best and round(100 * cols[lab].mean, 2) == best[lab] else text
            )
        lines.append(f"| {row_label(name, way)} | " + " | ".join(cells) + " |")
        key = name if not way else f"{name} ({way})"
        if paper and key in paper:
            ref = [
                next((f"*{v:.2f}*" for r, v in paper[key].items() if math.isclose(r, lab)), "–")
                for lab in labels
            ]
            lines.append(f"| *{row_label(name, way)}, paper ({paper_tag})* | " + " | ".join(ref) + " |")
    return "\n".join(lines)


_MAX_MISSING = 40


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``3.20 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def results_markdown(
    rows: Sequence[Mapping[str, Any]], grid: Grid | None = None, missing: Sequence[str] = ()
) -> str:
    """``results.md``: per data set, one table per metric (top-1 with the paper's numbers beside)."""
    title = grid.title if grid else "Bench results"
    lines = [f"# {title}", ""]
    if grid is not None:
        lines += [
            f"Grid `{grid.source or grid.name}`, preset `{grid.preset}`, seeds "
            f"{', '.join(map(str, grid.seeds))}."
        ]
    commits = sorted({str(r.get("git_commit")) for r in rows if r.get("git_commit")})
    lines += [
        "Test-set metrics in %, mean ± sample standard deviation over seeds; the best mean of each column "
        "in **bold**; (n=k): only k seeds finished. Paper rows (*italic*) are the paper's top-1 on its own "
        "data, shown only for data sets tagged as the paper's.",
        f"Runs: {len(rows)}; code: {', '.join(commits) or 'unknown'}.",
        "",
    ]
    expected = len(grid.seeds) if grid else None
    row_label = grid.row_label if grid else None
    for metric in METRICS:
        for ds, table in aggregate(rows, metric).items():
            spec = next((d for d in grid.datasets if d.name == ds), None) if grid else None
            present = {lab for cols in table.values() for lab in cols}
            labels = sorted(present, key=lambda r: (r >= 1.0, -r))  # 100 % (fully supervised) last
            tag = spec.paper if spec else None
            paper = grid.paper.get(tag) if grid and tag and metric == "top1" else None
            heading = f"## {ds}: {METRIC_TITLES[metric]} (%)"
            if spec is not None and metric == "top1":
                heading += f" — `{spec.path}`, pair `{spec.pair}`"
            lines += [
                heading,
                "",
                markdown_table(
                    table,
                    labels=labels,
                    row_label=row_label,
                    expected_n=expected,
                    paper=paper,
                    paper_tag=tag or "",
                ),
                "",
            ]
            if paper and grid and grid.paper_source:
                lines += [f"Paper: {grid.paper_source}.", ""]
    if grid is not None:
        notes = [f"- **{m.label}**: `{'`, `'.join(m.overrides)}`" for m in grid.methods if m.overrides]
        if grid.overrides:
            notes.insert(0, f"- every cell: `{'`, `'.join(grid.overrides)}`")
        if notes:
            lines += ["## Overrides", "", *notes, ""]
    walls = [float(r["wall_s"]) for r in rows if r.get("wall_s") not in (None, "")]
    walls = [w for w in walls if math.isfinite(w)]
    if walls:
        lines += [
            f"Total wall time of the finished runs: {format_duration(sum(walls))} (MICS runs that reuse "
            "a pre-training do not include it).",
            "",
        ]
    if missing:
        shown = [f"- `{m}`" for m in missing[:_MAX_MISSING]]
        if len(missing) > _MAX_MISSING:
            shown.append(f"- ... and {len(missing) - _MAX_MISSING} more")
        lines += [f"## Not finished ({len(missing)})", "", *shown, ""]
    return "\n".join(lines)


def write_results(grid: Grid, out: str | Path, cells: Sequence[Cell] | None = None) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` from the finished cells of ``grid`` in ``out``."""
    out = Path(out)
    cells = list(cells) if cells is not None else expand_cells(grid)
    rows = collect_rows(cells, out)
    missing = [c.id for c in cells if not (run_dir_of(out, c) / "metrics.json").exists()]
    csv_path = write_csv(rows, out / "results.csv")
    md_path = out / "results.md"
    _write_text(md_path, results_markdown(rows, grid, missing) + "\n")
    return csv_path, md_path


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["name=path", ...]`` (``--set-data``) as a mapping."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise GridError(f"{what} {item!r} must look like NAME=PATH")
        out[name.strip()] = value.strip()
    return out
