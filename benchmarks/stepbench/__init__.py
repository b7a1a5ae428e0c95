"""The pieces of ``benchmarks/throughput.py``: ``measure`` (timers, memory, FLOP counting, the machine's
matmul peak), ``cases`` (the training steps and their encoder bounds) and ``report`` (rows and tables)."""
