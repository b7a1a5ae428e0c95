#!/usr/bin/env bash
# Run the cells of a grid that a results file does not hold yet on one GPU machine, many at once, inside a
# time budget, and write their rows back into the results file as each cell finishes.
#
#   scripts/gpu_grid.sh [--dry-run] [--jobs N] [--budget-min M] [--copy-to DIR] GRID RESULTS [-- BENCH ARGS]
#   scripts/gpu_grid.sh --dry-run configs/table2-cpu.yaml results/milk10k/table2.csv -- --only 'milk10k__*'
#
# GRID     a grid YAML (configs/table2-cpu.yaml, ...)
# RESULTS  its results file with protocol keys (results/<dataset>/table2.csv): cells it holds at their
#          current protocol are skipped, stale ones re-run (mics bench --results)
# --jobs N        cells at once on the one GPU (default 8; the CPU cores are shared out between them)
# --budget-min M  stop after M minutes (default 12): the running cells are interrupted at their last
#                 checkpoint, every finished cell's row is already in RESULTS
# --copy-to DIR   copy RESULTS, the bench's results.md and logs there at the end (the device's $OUT)
# --dry-run       list what would run (cells, order, commands, device) and change nothing: rehearse on CPU
# BENCH ARGS      passed to mics bench (--only, --set, --set-data, ...)
#
# Cells run in value order (10 % and 5 % first, a seed at a time) on device cuda, into runs/gpu/<grid>.
set -euo pipefail

dry_run=0 jobs=8 budget=12 copy_to=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    --budget-min) budget="$2"; shift 2 ;;
    --copy-to) copy_to="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see $0 --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "error: usage: $0 [--dry-run] [--jobs N] [--budget-min M] [--copy-to DIR] GRID RESULTS [-- BENCH ARGS]" >&2
  exit 2
fi
grid="$1" results="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift
[[ -f "$grid" ]] || { echo "error: grid $grid not found (the grids are in configs/)" >&2; exit 2; }

cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import mics" 2>/dev/null; then
  # a fresh machine with torch already installed: the package itself is pure Python
  "$py" -m pip install --quiet --no-deps -e . || { echo "error: cannot import or install mics with $py" >&2; exit 2; }
fi

name="$(basename "$grid" .yaml)"
out="runs/gpu/$name"
device=cuda
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ $dry_run -eq 0 ]]; then
    echo "error: no CUDA device visible; rehearse with --dry-run" >&2
    exit 2
  fi
  device="cuda (not visible here: dry run)"
fi
bench=("$py" -m mics bench --grid "$grid" --out "$out" --results "$results" --order value --jobs "$jobs"
       --set device=cuda "$@")

echo "grid $grid -> $results; $jobs cell(s) at once on $device, budget $budget min, runs in $out"
if [[ $dry_run -eq 1 ]]; then
  "${bench[@]}" --dry-run
  exit 0
fi

copy_back() {
  if [[ -n "$copy_to" ]]; then
    mkdir -p "$copy_to"
    cp "$results" "$copy_to/" 2>/dev/null || true
    cp "$out/results.md" "$copy_to/" 2>/dev/null || true
    tar -czf "$copy_to/logs.tgz" -C "$out" logs 2>/dev/null || true
  fi
}
trap copy_back EXIT
start=$(date +%s)
# SIGINT at the budget: the bench stops its cells at their last checkpoint and exits 130
status=0
timeout --signal=INT --kill-after=60 "${budget}m" "${bench[@]}" || status=$?
echo "finished after $(( $(date +%s) - start )) s with exit code $status; rows in $results"
if [[ $status -eq 124 || $status -eq 130 ]]; then
  echo "budget reached: run the same command again to continue (finished cells are in $results)"
  exit 0
fi
exit "$status"
