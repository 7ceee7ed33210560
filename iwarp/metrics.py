"""Image-difference numbers shared by the build, calibration and benchmark checks (numpy).

`iwarp.evaluation.metrics` has the paper's metrics on torch tensors (PSNR per image, SSIM,
perceptual, landmarks); these are the plain array forms used where no torch is loaded.
"""

from __future__ import annotations

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
