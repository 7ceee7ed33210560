"""Numbers shared by the build, calibration and benchmark checks (numpy): image differences,
latency percentiles, the median time of a call.

`iwarp.evaluation.metrics` has the paper's metrics on torch tensors (PSNR per image, SSIM,
perceptual, landmarks); these are the plain array forms used where no torch is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """PSNR (dB) of two arrays over all their elements; inf when they are equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def frame_psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """PSNR (dB) of each item along the first axis (e.g. each frame of (N, 3, S, S))."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    mse = diff.reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak * peak / mse)


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile of latencies given in seconds, in ms to 0.1 (None when empty)."""
    return round(float(np.percentile(seconds, q)) * 1e3, 1) if len(seconds) else None


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
