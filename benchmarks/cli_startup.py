"""How long the command line takes to answer ``--help``: start-up cost of ``mics`` itself.

    python benchmarks/cli_startup.py                 # 7 repeats of each command, ~30 s on 2 idle cores
    python benchmarks/cli_startup.py --repeats 15 --out benchmarks/results/cli-startup.md

Each command runs as a fresh process (``python -m mics ...``, what the ``mics`` script does), several
times, after one warm-up run that is not counted (it fills the file system cache). The table gives the
median and the range of the wall time from start to exit, and the median CPU time of the process (user +
system): start-up is single-threaded, so on a machine busy with other jobs the CPU time is close to what
the wall time would be on an idle one. A reference line times ``import torch`` alone: what every
``--help`` would pay if the CLI imported torch at the top.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("run", "--help"),
    ("baseline", "--help"),
    ("predict", "--help"),
    ("bench", "--help"),
    ("figures", "--help"),
)
REFERENCE = ("-c", "import torch")


def time_once(args: tuple[str, ...]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of ``python ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(args: tuple[str, ...], repeats: int) -> list[tuple[float, float]]:
    time_once(args)
    return [time_once(args) for _ in range(repeats)]


def table(rows: list[tuple[str, list[tuple[float, float]]]]) -> str:
    lines = [
        "| command | wall median s | wall min s | wall max s | CPU median s | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rows:
        wall = [w for w, _ in runs]
        cpu = statistics.median(c for _, c in runs)
        lines.append(
            f"| `{name}` | {statistics.median(wall):.3f} | {min(wall):.3f} | {max(wall):.3f} | {cpu:.3f} "
            f"| {len(runs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per command (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = [("mics " + " ".join(cmd), measure(("-m", "mics", *cmd), args.repeats)) for cmd in COMMANDS]
    rows.append(("python -c 'import torch' (reference)", measure(REFERENCE, args.repeats)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load:.2f} at the end."
    )
    text = f"{header}\n\n{table(rows)}\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
