#!/usr/bin/env bash
# Val ablation of the wiring fixes of issue #10 on one data set, ratio and seed (cpu preset).
#   scripts/ablate_mics.sh DATA PAIR LABELS SEED OUT
# Runs, one after the other (each skipped when its metrics.json exists):
#   new     every fix at its default (index queue, Eq. 6 sum, classifier evidence on every view, calibrated
#           shifts); its pre-training is reused by the fine-tuning variants below
#   before  the first version's wiring: batch-only positives, averaged reconstruction, separate fused head
#           without a loss, uncalibrated shifts (pre-trained anew)
#   ft-*    one fine-tuning switch changed from `new`, reusing its pre-training
# Summarise with: python scripts/summarise_runs.py OUT
set -euo pipefail
DATA=$1; PAIR=$2; LABELS=$3; SEED=$4; OUT=$5
MICS=${MICS:-.venv/bin/mics}
mkdir -p "$OUT"
one() {  # name, extra args...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return 0
  local resume=()
  [ -f "$OUT/$name/run.json" ] && resume=(--resume)
  echo "[$(date -u +%H:%M:%S)] start $name" >> "$OUT/log.txt"
  "$MICS" run --data "$DATA" --pair "$PAIR" --labels "$LABELS" --seed "$SEED" --out "$OUT/$name" "${resume[@]}" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "[$(date -u +%H:%M:%S)] done $name" >> "$OUT/log.txt"
}
one new
one before --set pretrain.queue_positives=batch --set pretrain.reconstruction_reduce=mean \
  --set finetune.fused_evidence=head --set svd.calibrate=none
P=(--pretrained "$OUT/new")
one ft-head "${P[@]}" --set finetune.fused_evidence=head
one ft-nocal "${P[@]}" --set svd.calibrate=none
one ft-sampler "${P[@]}" --set data.class_balance=sampler
one ft-reweight "${P[@]}" --set data.class_balance=reweight
one ft-clspred "${P[@]}" --set finetune.predict_from=classifier
one ft-sharedaug "${P[@]}" --set data.paired_aug=shared
one ft-oldpre --pretrained "$OUT/before"
