"""The timing loop the step benchmarks share: warm-up steps (the first compiles), then the median of the
timed ones, each waited for on the device."""

from __future__ import annotations

import statistics
import time


def median_step_s(trainer, state, batch, steps: int, warmup: int = 1):
    """(median seconds per train step after `warmup` untimed steps, the last state, its metrics)."""
    import jax

    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), state, metrics
