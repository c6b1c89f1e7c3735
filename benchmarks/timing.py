"""How the benchmarks time one call: the median of repeated calls after warm-up calls, in milliseconds."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int = 20, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)
