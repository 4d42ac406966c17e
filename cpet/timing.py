"""Latency measurement shared by the benchmarks and by compression methods that pick a kernel by timing."""

from __future__ import annotations

import statistics
import time


def median_latency(fn, repeats: int = 10, warmup: int = 2, budget_s: float = 60.0) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (stops early past ``budget_s``)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per callable, timed round-robin (one call of each per round), so a machine whose
    speed drifts during the run slows every variant alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
