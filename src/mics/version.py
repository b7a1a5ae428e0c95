"""The training-code version: part of every bench result's protocol key (``mics.bench.protocol``).

Bump ``TRAINING_CODE_VERSION`` in any change that alters what a run learns or how it is scored for the same
config, data and seed (a loss, a sampler, an augmentation, the model-selection rule, a metric), and only
then: every results row recorded under the old value becomes stale and is re-run by
``mics bench --results``. Refactors, speed-ups that keep the numbers, logging and docs leave it alone.
"""

TRAINING_CODE_VERSION = 1
