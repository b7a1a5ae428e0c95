"""Grid files: parse and check a grid YAML into a :class:`Grid` (data sets, method rows, ratios, seeds,
overrides, the paper's numbers). The format is described in :mod:`mics.bench`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mics.config import PRESETS, ConfigError

MICS = "mics"
# the same names as mics.pipeline.BASELINE_METHODS / WAYS, repeated so that the bench process need not
# import torch (tests check that the two stay equal)
BASELINES = ("supervised", "fixmatch", "flexmatch", "dash", "freematch", "softmatch", "habit", "siabc")
WAYS = ("standard", "multimodal")
METRICS = ("top1", "balanced_accuracy", "macro_f1", "ece", "uncertainty_auroc")
METRIC_TITLES = {
    "top1": "Top-1 accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "ece": "Expected calibration error (lower is better)",
    "uncertainty_auroc": "Uncertainty AUROC (does u flag the misclassified images? 50 = chance)",
}
LOWER_IS_BETTER = frozenset({"ece"})
CSV_COLUMNS = (
    "dataset",
    "method",
    "way",
    "labels",
    "seed",
    "top1",
    "balanced_accuracy",
    "macro_f1",
    "ece",
    "uncertainty_auroc",
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


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["name=path", ...]`` (``--set-data``) as a mapping."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise GridError(f"{what} {item!r} must look like NAME=PATH")
        out[name.strip()] = value.strip()
    return out
