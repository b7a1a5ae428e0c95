"""The training-code version: part of every bench result's protocol key (``mics.bench.protocol``).

Bump ``TRAINING_CODE_VERSION`` in any change that alters what a run learns or how it is scored for the same
config, data and seed (a loss, a sampler, an augmentation, the model-selection rule, a metric), and only
then: every results row recorded under the old value becomes stale and is re-run by
``mics bench --results``. Refactors, speed-ups that keep the numbers, logging and docs leave it alone.
"""

# 1: the first version (results/milk10k rows of 2026-11-27/28, recorded without a protocol key)
# 2: issue #10: Dash's rho from the end of warm-up, float64 hard targets in the contrastive loss, the shared
#    class_weights buffer; the four wiring fixes exist as options (off by default until val says otherwise)
TRAINING_CODE_VERSION = 2
