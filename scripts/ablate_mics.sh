#!/usr/bin/env bash
# Val ablation of the wiring fixes of issue #10 on one data set, ratio and seed (cpu preset).
#   scripts/ablate_mics.sh DATA PAIR LABELS SEED OUT [NAME ...]
# With NAMEs, only those variants run (`before` is always run first: the ft-* variants reuse it).
# Every variant starts from the first version's wiring (`before`; data.class_balance=none and
# finetune.head_lr_mult=1 are pinned, since this ablation made sampler and 10 the defaults) and switches
# one fix on from there.
# Runs, one after the other (each skipped when its metrics.json exists):
#   before        the first version: batch-only positives, averaged reconstruction, separate fused-view head
#                 without a loss, uncalibrated shifts, no class balancing; its pre-training is reused below
#   ft-*          one fine-tuning switch changed from `before`, reusing its pre-training (ft-headlr10: the
#                 layers fine-tuning adds learn at 10x the encoders' lr)
#   pre-index     index-queue positives in pre-training (pre-trained anew)
#   pre-sum       Eq. 6's summed reconstruction (pre-trained anew)
#   new           every wiring fix on (index queue, sum, classifier evidence on every view, calibrated shifts)
# Summarise with: python scripts/summarise_runs.py OUT   (val only; read the test split once, at the end)
set -euo pipefail
DATA=$1; PAIR=$2; LABELS=$3; SEED=$4; OUT=$5
shift 5
ONLY=" before $* "
MICS=${MICS:-.venv/bin/mics}
mkdir -p "$OUT"
one() {  # name, extra args...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return 0
  [ "$ONLY" != " before  " ] && [[ "$ONLY" != *" $name "* ]] && return 0
  local resume=()
  [ -f "$OUT/$name/run.json" ] && resume=(--resume)
  echo "[$(date -u +%H:%M:%S)] start $name" >> "$OUT/log.txt"
  "$MICS" run --data "$DATA" --pair "$PAIR" --labels "$LABELS" --seed "$SEED" --out "$OUT/$name" "${resume[@]}" \
    --set data.class_balance=none --set finetune.head_lr_mult=1 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "[$(date -u +%H:%M:%S)] done $name" >> "$OUT/log.txt"
}
one before
P=(--pretrained "$OUT/before")
one ft-classifier "${P[@]}" --set finetune.fused_evidence=classifier
one ft-clspred "${P[@]}" --set finetune.fused_evidence=classifier --set finetune.predict_from=classifier
one ft-cal "${P[@]}" --set svd.calibrate=fused
one ft-sampler "${P[@]}" --set data.class_balance=sampler
one ft-reweight "${P[@]}" --set data.class_balance=reweight
one ft-sharedaug "${P[@]}" --set data.paired_aug=shared
one ft-headlr10 "${P[@]}" --set finetune.head_lr_mult=10
one ft-headlr10-classifier "${P[@]}" --set finetune.head_lr_mult=10 --set finetune.fused_evidence=classifier
# pairs of the fine-tuning switches that helped one metric each on seed 0
one ft-sampler-clspred "${P[@]}" --set data.class_balance=sampler --set finetune.fused_evidence=classifier \
  --set finetune.predict_from=classifier
one ft-sampler-headlr10 "${P[@]}" --set data.class_balance=sampler --set finetune.head_lr_mult=10
one ft-reweight-headlr10 "${P[@]}" --set data.class_balance=reweight --set finetune.head_lr_mult=10
one pre-index --set pretrain.queue_positives=index
one pre-sum --set pretrain.reconstruction_reduce=sum
one new --set pretrain.queue_positives=index --set pretrain.reconstruction_reduce=sum \
  --set finetune.fused_evidence=classifier --set svd.calibrate=fused
