"""Throughput measurement for the benchmarks in bench/."""

from __future__ import annotations

import time
from collections.abc import Callable


def rate(fn: Callable[[], object], batch: int, repeats: int) -> float:
    """Items per second of ``fn`` processing ``batch`` items, after one warm-up call
    (graph building, oneDNN primitive caches)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.perf_counter() - start)
