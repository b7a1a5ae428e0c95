#!/usr/bin/env bash
# Paper-scale check on one GPU (ViT-B/16 encoders at 256 px, preset `paper`): step throughput, efficiency
# against the encoder-only bound and peak memory of every training step, bf16 vs fp32, and torch.compile.
# Sized to finish within 8 minutes on one H100 / H200: each part has its own time limit, and a part that
# fails or runs out of time is recorded in the summary while the others still run.
#
#   bash benchmarks/gpu_check.sh                    # writes to $OUT if set, else benchmarks/results/gpu-check
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # the same parts with the smoke preset on CPU (seconds)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
# the package may not be installed on a bare machine: import it from the source tree
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${GPU_CHECK_DRY:-0}" == "1" ]]; then
    PRESET=smoke DEVICE=cpu STEPS=(--warmup 1 --steps 2)
else
    PRESET=paper DEVICE=cuda STEPS=(--warmup 3 --steps 12)
fi
SUMMARY="$OUT/summary.md"
START=$(date +%s)

{
    echo "# gpu_check: preset $PRESET on $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    echo '```'
    echo
} > "$SUMMARY"

# part NAME LIMIT_SECONDS THROUGHPUT_ARGS...: one benchmarks/throughput.py run, its table appended to the summary
part() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" \
        "$PY" benchmarks/throughput.py --preset "$PRESET" --device "$DEVICE" "${STEPS[@]}" \
        --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$OUT/$name.log"
    {
        echo "## $name: \`throughput.py $*\` (exit $rc, $(( $(date +%s) - t0 )) s)"
        echo
        if [[ -f "$OUT/$name.md" ]]; then
            sed -n '/^| step/,/^$/p' "$OUT/$name.md"
        else
            echo "no table: see $name.log"
            echo
            echo '```'
            tail -n 15 "$OUT/$name.log"
            echo '```'
        fi
        echo
    } >> "$SUMMARY"
}

# bf16 (the preset's precision): every step, the baselines included
part bf16 200 --precision bf16
# fp32: the two MICS training steps
part fp32 130 --precision fp32 --only pretrain,finetune
# torch.compile of the transformer blocks (RunConfig.compile), bf16; the compile time is in the warm-up
part bf16-compile 150 --precision bf16 --compile --only pretrain,finetune

echo "total $(( $(date +%s) - START )) s" >> "$SUMMARY"
echo
cat "$SUMMARY"
