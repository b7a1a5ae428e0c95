"""Grid runner for the paper's tables: expand a grid YAML into cells, run each cell in its own process,
resume what an interrupted bench left, and aggregate the run folders into ``results.csv`` / ``results.md``.

    mics bench --grid configs/table2-smoke.yaml --out runs/table2-smoke --jobs 2
    mics bench --grid configs/table2-paper.yaml --out runs/table2-paper --executor slurm --partition gpu

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


The package, one module per concern: :mod:`~mics.bench.grid` (grid files), :mod:`~mics.bench.cells`
(cell expansion, ids, commands, pre-training keys), :mod:`~mics.bench.plan` (done / resume / shared
pre-training), :mod:`~mics.bench.run` (the bench and the executor interface), :mod:`~mics.bench.local` and
:mod:`~mics.bench.slurm` (executors), :mod:`~mics.bench.launch` (multi-node rendezvous under Slurm),
:mod:`~mics.bench.results` (results.csv), :mod:`~mics.bench.protocol` (protocol keys, ``--results``,
``--order value``), :mod:`~mics.bench.tables` (results.md), :mod:`~mics.bench.figures` (figures of a bench
folder), :mod:`~mics.bench.paths` (the files of a bench folder). Nothing here imports torch.
"""

from mics.bench.cells import (
    Cell,
    cell_id,
    expand_cells,
    format_ratio,
    pretrain_key,
    resolve_data_path,
    select_cells,
)
from mics.bench.grid import (
    BASELINES,
    CSV_COLUMNS,
    METRIC_TITLES,
    METRICS,
    MICS,
    WAYS,
    CellOverride,
    DatasetSpec,
    Grid,
    GridError,
    MethodSpec,
    load_grid,
    parse_assignments,
    parse_grid,
)
from mics.bench.local import LocalExecutor, child_env
from mics.bench.paths import run_dir_of
from mics.bench.plan import (
    Plan,
    Task,
    describe_plan,
    plan_cells,
    recorded_pretrain_key,
    reusable_pretrainings,
)
from mics.bench.results import collect_rows, read_csv, write_csv, write_results
from mics.bench.run import BenchResult, Executor, last_error, run_bench
from mics.bench.tables import Summary, aggregate, format_duration, markdown_table, results_markdown, summarise

__all__ = [
    "BASELINES",
    "CSV_COLUMNS",
    "METRICS",
    "METRIC_TITLES",
    "MICS",
    "WAYS",
    "BenchResult",
    "Cell",
    "CellOverride",
    "DatasetSpec",
    "Executor",
    "Grid",
    "GridError",
    "LocalExecutor",
    "MethodSpec",
    "Plan",
    "Summary",
    "Task",
    "aggregate",
    "cell_id",
    "child_env",
    "collect_rows",
    "describe_plan",
    "expand_cells",
    "format_duration",
    "format_ratio",
    "last_error",
    "load_grid",
    "markdown_table",
    "parse_assignments",
    "parse_grid",
    "plan_cells",
    "pretrain_key",
    "read_csv",
    "recorded_pretrain_key",
    "results_markdown",
    "resolve_data_path",
    "reusable_pretrainings",
    "run_bench",
    "run_dir_of",
    "select_cells",
    "summarise",
    "write_csv",
    "write_results",
]
