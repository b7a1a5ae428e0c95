"""Cells: the runs a grid expands into, their ids, data paths, commands and pre-training keys."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mics.bench.grid import MICS, Grid, GridError
from mics.config import ConfigError, RunConfig, apply_overrides, to_dict
from mics.config import preset as preset_config


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


# data options that only shape the labelled batches: label-free pre-training never reads them
LABELLED_ONLY = ("class_balance",)


def pretrain_key(cell: Cell, cfg: RunConfig) -> str:
    """Everything pre-training depends on: data, pairing, seed (split and initialisation), and the data
    (less :data:`LABELLED_ONLY`), model and pre-training sections of the config. Label ratio and
    fine-tuning options are not in it."""
    return _pretrain_key(cell.data, cell.pair, cell.seed, cell.skip_bad, cfg)


def _pretrain_key(data: str, pair: str, seed: int, skip_bad: bool, cfg: RunConfig) -> str:
    sections = {k: to_dict(getattr(cfg, k)) for k in ("data", "model", "pretrain")}
    for name in LABELLED_ONLY:
        sections["data"].pop(name, None)
    payload = {
        "path": data,
        "pair": pair,
        "seed": seed,
        "skip_bad": skip_bad,
        "precision": cfg.precision,
        **sections,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


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
