"""How long the command line takes to answer ``--help``: start-up cost of ``mics`` itself.

    python benchmarks/cli_startup.py                 # 7 repeats of each command, ~30 s on 2 cores
    python benchmarks/cli_startup.py --repeats 15 --out benchmarks/results/cli-startup.md

Each command runs as a fresh process (``python -m mics ...``, what the ``mics`` script does), several
times; the table gives the median and the spread of the wall time, from start to exit. A reference line
times ``import torch`` alone: what every ``--help`` would pay if the CLI imported torch at the top.
One warm-up run per command is not counted (it fills the file system cache).
"""

from __future__ import annotations

import argparse
import os
import platform
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


def time_once(args: tuple[str, ...]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def measure(args: tuple[str, ...], repeats: int) -> list[float]:
    time_once(args)
    return [time_once(args) for _ in range(repeats)]


def table(rows: list[tuple[str, list[float]]]) -> str:
    lines = ["| command | median s | min s | max s | runs |", "|---|---:|---:|---:|---:|"]
    for name, times in rows:
        median = statistics.median(times)
        lines.append(f"| `{name}` | {median:.3f} | {min(times):.3f} | {max(times):.3f} | {len(times)} |")
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
