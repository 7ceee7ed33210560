"""The numbers every part reports, computed here only (tests/test_architecture.py checks it):
PSNR (of arrays, per frame, from a summed squared error), percentiles and latency summaries,
the median time of a call.

Plain numpy, so nothing here loads torch; torch callers pass `tensor.numpy()` (their images are
on the CPU by then). `iwarp.evaluation.metrics` builds the paper's other metrics on these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def psnr_of_mse(
    mse: float | np.ndarray, peak: float = 1.0, max_db: float = np.inf
) -> float | np.ndarray:
    """PSNR (dB) of a mean squared error (or an array of them); `max_db` where it is 0 (inf
    unless given: a mean over frames passes a cap, so that one identical frame stays finite)."""
    with np.errstate(divide="ignore"):
        db = np.minimum(10.0 * np.log10(peak * peak / np.asarray(mse, np.float64)), max_db)
    return float(db) if np.ndim(db) == 0 else db


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """PSNR (dB) of two arrays over all their elements; inf when they are equal."""
    return psnr_of_mse(
        float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)), peak
    )


def frame_psnr(
    a: np.ndarray, b: np.ndarray, peak: float = 1.0, max_db: float = np.inf
) -> np.ndarray:
    """PSNR (dB) of each item along the first axis (e.g. each frame of (N, 3, S, S))."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    return psnr_of_mse(diff.reshape(len(diff), -1).mean(axis=1), peak, max_db)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of `values` (None when there are none)."""
    return float(np.percentile(values, q)) if len(values) else None


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...} of `values`, in their unit ({} when empty)."""
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs} if len(values) else {}


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile of latencies given in seconds, in ms to 0.1 (None when empty)."""
    value = percentile(seconds, q)
    return None if value is None else round(value * 1e3, 1)


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/max of latencies given in seconds, in ms (None when there are none):
    the WebRTC benchmark, `iwarp cam`'s stats and the soak test report the same numbers."""
    return {
        "p50": percentile_ms(seconds, 50),
        "p95": percentile_ms(seconds, 95),
        "p99": percentile_ms(seconds, 99),
        "mean": round(float(np.mean(seconds)) * 1e3, 1) if len(seconds) else None,
        "max": round(max(seconds) * 1e3, 1) if len(seconds) else None,
    }


def median_call_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls, after one warm-up call (the
    benchmarks' per-piece timings)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def interleaved_median_ms(
    calls: dict[Any, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[Any, float]:
    """Median wall time in ms of each call, the calls taking turns round by round: load from
    other processes (and clock changes) falls on all of them alike, so their times compare.
    The first `warmup` rounds are not counted."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for round_ in range(warmup + repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: float(np.median(t)) * 1e3 for key, t in times.items()}
