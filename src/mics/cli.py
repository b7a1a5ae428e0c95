"""Command line: a thin layer over :mod:`mics.pipeline`.

User errors (bad data, bad options, unusable run folders, and what the operating system refuses: a
read-only folder, a full disk... see :mod:`mics.errors`) print one clear message and exit with code 2;
tracebacks are kept for real bugs; with ``--debug`` a user error shows its traceback above the message.
Heavy modules (torch, the pipeline) are imported inside the commands, so that ``--help`` answers at once.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from mics.config import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's formatter alone doubles the time `mics --help` takes
    help="MICS: multimodal semi-supervised medical image classification (and its baselines). "
    "Put --debug before the command (mics --debug run ...) to see the full traceback of an error.",
)

_DEBUG = {"on": False}


class Preset(str, Enum):
    smoke = "smoke"
    cpu = "cpu"
    paper = "paper"


class OutFormat(str, Enum):
    json = "json"
    csv = "csv"


DataOpt = Annotated[
    Path, typer.Option("--data", help="Image folder (class folders, paired layouts) or manifest CSV.")
]
PairOpt = Annotated[str, typer.Option("--pair", help="auto | virtual-nbi | suffix:A,B | folders | manifest")]
PresetOpt = Annotated[Preset, typer.Option("--preset", help="smoke (seconds) | cpu (minutes) | paper (GPUs)")]
LabelsOpt = Annotated[
    float, typer.Option("--labels", help="Fraction of the training split that is labelled.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the split, the labelled subset and training.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder to create (or continue with --resume).")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Config override section.key=value (repeat).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config (e.g. a run's config.yaml).")]
SkipOpt = Annotated[bool, typer.Option("--skip-bad", help="Drop unreadable images instead of stopping.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")]
RunOpt = Annotated[Path, typer.Option("--run", help="An existing run folder.")]


def _config(
    preset: Preset, config: Path | None, overrides: list[str] | None, device: str | None
) -> RunConfig:
    from mics.config import apply_overrides, load_yaml
    from mics.config import preset as preset_config

    cfg = load_yaml(config) if config is not None else preset_config(preset.value)
    extra = list(overrides or [])
    if device:
        extra.append(f"device={device}")
    return apply_overrides(cfg, extra) if extra else cfg


def _command() -> str:
    return "mics " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _main_rank() -> bool:
    """Rank 0 of a torchrun job (or the only process): the one that prints and writes reports."""
    from mics.engine.distributed import is_main

    return is_main()


def _print_json(obj: Any) -> None:
    if _main_rank():
        typer.echo(json.dumps(obj, indent=2))


def _print_table(runs: dict[str, dict[str, Any]]) -> None:
    if not _main_rank():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test metrics (%)")
    for col in ("method", "top-1", "balanced acc.", "macro-F1", "wall s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, m in runs.items():
        t = m["test"]
        table.add_row(
            name,
            f"{100 * t['top1']:.2f}",
            f"{100 * t['balanced_accuracy']:.2f}",
            f"{100 * t['macro_f1']:.2f}",
            str(m.get("wall_s", "")),
        )
    Console(stderr=False).print(table)


@app.command()
def run(
    data: DataOpt,
    out: OutOpt,
    pair: PairOpt = "auto",
    preset: PresetOpt = Preset.cpu,
    labels: LabelsOpt = 0.1,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
    config: ConfigOpt = None,
    skip_bad: SkipOpt = False,
    device: DeviceOpt = None,
    pretrained: Annotated[
        Path | None,
        typer.Option(
            "--pretrained", help="Reuse another run's pre-training (its run folder or pretrain/ folder)."
        ),
    ] = None,
) -> None:
    """Whole MICS pipeline: split, pre-train, SVD, fine-tune with TMC, evaluate; writes RUN/metrics.json."""
    from mics import pipeline
    from mics.eval.report import write_report

    cfg = _config(preset, config, set_, device)
    if pretrained is not None and (pretrained / "pretrain").is_dir():
        pretrained = pretrained / "pretrain"
    results = pipeline.run(
        data,
        out,
        pair=pair,
        cfg=cfg,
        labels=labels,
        seed=seed,
        skip_bad=skip_bad,
        resume=resume,
        pretrained=pretrained,
    )
    meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
    meta["machine"] = pipeline.machine_description()
    if _main_rank():
        write_report(out, {"mics": results}, meta, _command())
        _write_card(out)
    _print_table({"mics": results})


@app.command()
def pretrain(run_dir: RunOpt, resume: ResumeOpt = False) -> None:
    """Stage 1 only: synergistic pre-training of a run folder."""
    from mics import pipeline

    pipeline.pretrain(pipeline.open_run(run_dir), resume=resume)


@app.command()
def svd(run_dir: RunOpt) -> None:
    """Stage 2 only: rebuild the shift vector dictionary from the run's pre-trained encoders."""
    from mics import pipeline

    pipeline.build_svd(pipeline.open_run(run_dir))


@app.command()
def finetune(
    run_dir: RunOpt,
    resume: ResumeOpt = False,
    labels: Annotated[
        float | None,
        typer.Option("--labels", help="Fine-tune at another label ratio (same split, same pre-training)."),
    ] = None,
) -> None:
    """Stage 3 only: fusion fine-tuning (and evaluation) of a run folder."""
    from mics import pipeline

    ctx = pipeline.open_run(run_dir)
    if labels is not None and labels != ctx.labels_ratio:
        meta_path = run_dir / "run.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["labels"] = labels
        from mics.engine import distributed as dist
        from mics.engine.checkpoint import atomic_write_json

        if dist.is_main():
            atomic_write_json(meta_path, meta)
        dist.barrier()
        ctx = pipeline.open_run(run_dir)
        resume = False
    pipeline.finetune(ctx, resume=resume)
    _print_table({"mics": pipeline.evaluate(ctx)})


@app.command()
def evaluate(run_dir: RunOpt) -> None:
    """Evaluate a run's selected model on val and test; writes RUN/metrics.json."""
    from mics import pipeline

    results = pipeline.evaluate(pipeline.open_run(run_dir))
    if _main_rank():
        _write_card(run_dir)
    _print_table({"mics": results})


@app.command()
def baseline(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="supervised | fixmatch | flexmatch | dash | freematch | softmatch | habit | siabc",
        ),
    ],
    data: DataOpt,
    out: OutOpt,
    way: Annotated[str, typer.Option("--way", help="standard | multimodal")] = "standard",
    pair: PairOpt = "auto",
    preset: PresetOpt = Preset.cpu,
    labels: LabelsOpt = 0.1,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
    config: ConfigOpt = None,
    skip_bad: SkipOpt = False,
    device: DeviceOpt = None,
) -> None:
    """A semi-supervised baseline on MICS's split, backbone and budget; writes RUN/metrics.json."""
    from mics import pipeline

    cfg = _config(preset, config, set_, device)
    results = pipeline.baseline(
        data,
        out,
        method=method,
        way=way,
        pair=pair,
        cfg=cfg,
        labels=labels,
        seed=seed,
        skip_bad=skip_bad,
        resume=resume,
    )
    _print_table({f"{method} ({way})": results})


@app.command()
def predict(
    run_dir: RunOpt,
    images: Annotated[list[Path], typer.Argument(help="Modality-A (WLI) images.")],
    partner: Annotated[
        list[Path] | None,
        typer.Option(
            "--partner",
            help="Partner (NBI / second modality) images, in the same order; generated if absent.",
        ),
    ] = None,
    fmt: Annotated[OutFormat, typer.Option("--format", help="json | csv")] = OutFormat.json,
    device: DeviceOpt = None,
    engine: Annotated[
        str, typer.Option("--engine", help="torch | onnx (the graph written by 'mics export').")
    ] = "torch",
    onnx: Annotated[
        Path | None,
        typer.Option("--onnx", help="The exported model for --engine onnx (default RUN/model.onnx)."),
    ] = None,
) -> None:
    """Class, class probabilities and TMC uncertainty for each image (bad images get an error entry)."""
    from mics.predict import predict_files, to_csv

    rows = predict_files(run_dir, images, partner, device=device, engine=engine, onnx_path=onnx)
    if fmt is OutFormat.csv:
        typer.echo(to_csv(rows), nl=False)
    else:
        _print_json(rows)


def _repo_sample() -> Path:
    here = Path("data/sample/milk10k-5class")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "data" / "sample" / "milk10k-5class"


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's runs and report.")] = Path(
        "runs/demo"
    ),
    data: Annotated[Path | None, typer.Option("--data", help="Defaults to the bundled real sample.")] = None,
    labels: LabelsOpt = 0.1,
    seed: SeedOpt = 0,
    preset: PresetOpt = Preset.cpu,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """MICS vs supervised-only on the real sample bundled in the repository; prints a table and
    writes a report."""
    from mics import pipeline
    from mics.eval.report import write_report

    data = data or _repo_sample()
    if not data.is_dir():
        raise pipeline.RunError(
            f"the bundled sample {data} is missing; run from the repository root or pass --data"
        )
    cfg = _config(preset, None, set_, None)
    start = time.time()
    runs = {"mics": pipeline.run(data, out / "mics", cfg=cfg, labels=labels, seed=seed, resume=resume)}
    runs["supervised"] = pipeline.baseline(
        data, out / "supervised", method="supervised", cfg=cfg, labels=labels, seed=seed, resume=resume
    )
    meta = json.loads((out / "mics" / "run.json").read_text(encoding="utf-8"))
    meta["machine"] = pipeline.machine_description()
    report = write_report(out, runs, meta, _command()) if _main_rank() else None
    _print_table(runs)
    if report is None:
        return
    gain = report["results"]["mics"]["top1"] - report["results"]["supervised"]["top1"]
    typer.echo(
        f"MICS vs supervised-only: {100 * gain:+.2f} top-1 points; total {time.time() - start:.0f} s; "
        f"report: {out / 'report.md'}"
    )


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", help="Bench folder: runs/, logs/, results.csv, results.md.")],
    grid: Annotated[
        Path | None, typer.Option("--grid", help="Grid YAML (configs/table2-smoke.yaml, ...).")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Cells run at once; the CPU cores are shared out.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and commands only.")] = False,
    set_: SetOpt = None,
    set_data: Annotated[
        list[str] | None, typer.Option("--set-data", help="Data folder of a data set: NAME=PATH (repeat).")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only cells whose id matches this glob (repeat).")
    ] = None,
    reuse: Annotated[
        list[Path] | None,
        typer.Option(
            "--reuse",
            help="A bench or run folder whose finished MICS pre-trainings (same data, seed and pre-training "
            "config) MICS cells may reuse (repeat).",
        ),
    ] = None,
    executor: Annotated[
        str, typer.Option("--executor", help="local (processes here) or slurm (jobs through submitit).")
    ] = "local",
    partition: Annotated[str | None, typer.Option("--partition", help="Slurm partition.")] = None,
    time_limit: Annotated[
        str, typer.Option("--time", help="Slurm time limit per job: minutes, H:MM:SS or D-HH:MM:SS.")
    ] = "24:00:00",
    nodes: Annotated[int, typer.Option("--nodes", help="Slurm nodes per cell (multi-node training).")] = 1,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs per node of a cell, a process each (Slurm).")] = 1,
    cpus: Annotated[int, typer.Option("--cpus", help="CPU cores per process of a cell (Slurm).")] = 8,
    mem_gb: Annotated[int | None, typer.Option("--mem-gb", help="Memory per node of a cell (Slurm).")] = None,
    array_limit: Annotated[
        int, typer.Option("--array-limit", help="Jobs of one Slurm array running at once.")
    ] = 32,
    slurm_opt: Annotated[
        list[str] | None,
        typer.Option("--slurm-opt", help="Another sbatch option, KEY=VALUE, e.g. account=proj (repeat)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Slurm: wait until every job has ended.")] = False,
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            help="A results CSV with protocol keys (results/<dataset>/table2.csv): skip the cells it holds, "
            "add a row as each cell finishes, re-run stale rows.",
        ),
    ] = None,
    order: Annotated[
        str,
        typer.Option("--order", help="grid (the grid's order) or value (10 %/5 % first, a seed at a time)."),
    ] = "grid",
    status: Annotated[bool, typer.Option("--status", help="Show the state of every cell of OUT.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the Slurm jobs of OUT.")] = False,
) -> None:
    """Run a grid of cells (data set x method x way x label ratio x seed), resuming what is left; writes
    OUT/results.csv and OUT/results.md (the paper's Tables II-IV). With --executor slurm the cells are
    submitted as Slurm jobs (docs/cluster.md)."""
    from mics import bench as bench_mod

    if status or cancel:
        from mics.bench.slurm import bench_status, cancel_bench

        if cancel:
            ids = cancel_bench(out)
            typer.echo(f"cancelled {len(ids)} job(s): {' '.join(ids)}" if ids else "no Slurm job to cancel")
        if status:
            typer.echo(bench_status(out))
        return
    if grid is None:
        raise bench_mod.GridError("--grid is required (the grids of the paper's tables are in configs/)")
    spec = bench_mod.load_grid(grid)
    runner: bench_mod.Executor | None = None
    if executor == "slurm":
        from mics.bench.slurm import SlurmExecutor, SlurmOptions, parse_time

        options = SlurmOptions(
            partition=partition,
            time_min=parse_time(time_limit),
            nodes=nodes,
            gpus=gpus,
            cpus=cpus,
            mem_gb=mem_gb,
            array_limit=array_limit,
            extra=bench_mod.parse_assignments(slurm_opt or [], "--slurm-opt"),
        )
        runner = SlurmExecutor(options, wait=wait)
    elif executor != "local":
        raise bench_mod.GridError(f"--executor {executor!r}: choose local or slurm")
    data_paths = bench_mod.parse_assignments(set_data or [], "--set-data")
    if dry_run:
        from mics.bench.run import BenchState, plan_bench

        _, plan, _ = plan_bench(
            spec,
            out,
            BenchState(out, spec),
            only=only or [],
            overrides=set_ or [],
            data_paths=data_paths,
            reuse=reuse or [],
            results=results,
            order=order,
            dry_run=True,
        )
        typer.echo(bench_mod.describe_plan(plan, out))
        return
    try:
        result = bench_mod.run_bench(
            spec,
            out,
            jobs=jobs,
            only=only or [],
            overrides=set_ or [],
            data_paths=data_paths,
            reuse=reuse or [],
            command=_command(),
            executor=runner,
            results=results,
            order=order,
        )
    except KeyboardInterrupt:
        # sys.exit, not typer.Exit: main() runs the app with standalone_mode=False, which drops Exit codes
        typer.secho("interrupted; run the same command again to resume", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    typer.echo(
        f"{len(result.ran)} cell(s) run, {len(result.done)} finished in all, {len(result.failed)} failed; "
        f"results: {result.results_md}"
    )
    if result.submitted:
        typer.echo(f"{len(result.submitted)} cell(s) submitted; see: mics bench --status --out {out}")
    for cid, reason in result.failed.items():
        typer.secho(f"failed: {cid}: {reason}", fg=typer.colors.RED, err=True)
    if result.failed:
        sys.exit(1)


@app.command()
def figures(
    bench_dir: Annotated[
        Path | None, typer.Option("--bench", help="A folder written by 'mics bench': every figure.")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            help="A results file of 'mics bench --results' instead: the label-efficiency curve only "
            "(the other figures need the run folders).",
        ),
    ] = None,
    grid: Annotated[
        Path | None, typer.Option("--grid", help="With --results: the grid's method names and paper points.")
    ] = None,
    runs: Annotated[
        Path | None,
        typer.Option(
            "--runs",
            help="With --results: a folder of kept run folders (RUNS/<cell>, e.g. a bench's runs/); adds "
            "Fig. 8, confusion matrices and learning curves of the rows whose run is kept there.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Default: BENCH/figures, or figures/ beside RESULTS.")
    ] = None,
) -> None:
    """UMAP of test features (Fig. 8), confusion matrices, learning curves and label efficiency, as PNGs."""
    from mics.bench.figures import make_figures, results_figures
    from mics.bench.grid import GridError

    if (bench_dir is None) == (results is None):
        raise GridError("give --bench or --results (one of them)")
    if grid is not None and results is None:
        raise GridError("--grid goes with --results (a bench folder has its own grid.yaml)")
    if runs is not None and results is None:
        raise GridError("--runs goes with --results (a bench folder has its own runs/)")
    if results is not None:
        written = results_figures(
            results, out if out is not None else results.parent / "figures", grid, runs=runs
        )
    else:
        written = make_figures(bench_dir, out)  # type: ignore[arg-type]
    for path in written:
        typer.echo(str(path))


def _write_card(run_dir: Path) -> None:
    from mics.card import write_model_card

    typer.echo(f"model card: {write_model_card(run_dir)}", err=True)


@app.command()
def card(run_dir: RunOpt) -> None:
    """Write RUN/model_card.md: data, split, metrics, calibration, uncertainty flag, intended use, limits."""
    from mics.card import write_model_card

    typer.echo(str(write_model_card(run_dir)))


@app.command()
def export(
    run_dir: RunOpt,
    out: Annotated[
        Path | None, typer.Option("--out", help="The .onnx file to write (default RUN/model.onnx).")
    ] = None,
) -> None:
    """Export the run's whole inference graph to ONNX (checked against PyTorch), with a standalone
    predict_onnx.py next to it that needs only onnxruntime, numpy and Pillow."""
    from mics.pipeline import RunError

    try:
        from mics.export import export_onnx
    except ImportError as err:
        raise RunError(
            f"export needs the export extra ({err.name} is missing): pip install 'mics[export]'"
        ) from None
    result = export_onnx(run_dir, out)
    typer.echo(
        f"wrote {result.path} (inputs: {', '.join(result.info['inputs'])}; max |p_onnx - p_torch| = "
        f"{result.max_abs_diff:.1e}) and {result.runner}"
    )


@app.command()
def serve(
    run_dir: RunOpt,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps it on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0 = any free port).")] = 8000,
    engine: Annotated[str, typer.Option("--engine", help="torch | onnx (RUN/model.onnx).")] = "torch",
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest upload accepted, in MB.")] = 20.0,
) -> None:
    """A local web page: drop an image (or a pair), see the class, probabilities, uncertainty, the generated
    partner and the run's report."""
    from mics.serve import serve as serve_run

    serve_run(run_dir, host=host, port=port, engine=engine, max_bytes=int(max_mb * 1_000_000))


_RESUMABLE = frozenset({"run", "baseline", "pretrain", "finetune", "demo"})


def _retry_advice() -> str:
    """How to carry on after an error that stopped work halfway (a full disk, too many open files)."""
    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), "")
    if command in _RESUMABLE and "--resume" not in args:
        return "rerun the same command with --resume"
    return "run the same command again"


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages."""
    from mics.errors import user_message

    # --debug is read here rather than declared on the app: an option of the group makes typer build its
    # pydantic validators (half a second) before a command's --help can answer
    args = sys.argv[1:]
    _DEBUG["on"] = args[:1] == ["--debug"]
    try:
        code = app(args=args[1:] if _DEBUG["on"] else args, standalone_mode=False)
    except KeyboardInterrupt:
        typer.secho("interrupted; continue with --resume", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        message = user_message(exc, retry=_retry_advice())
        if message is not None:
            if _DEBUG["on"]:
                traceback.print_exc()
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        # Usage errors carry their own message and exit code. Newer typer vendors click, so they are
        # not instances of click.ClickException: recognise them by their interface.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        raise
    if code == 130:
        typer.secho("interrupted; continue with --resume", fg=typer.colors.YELLOW, err=True)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
