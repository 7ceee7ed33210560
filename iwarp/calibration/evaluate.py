"""Accuracy and speed of quantized graphs against the FP32 graphs, on real frames.

Each graph is measured alone, fed the FP32 graphs' inputs, so an error is charged to the graph
that made it:

- keypoints: mean abs error of the keypoints ([-1, 1] units and pixels) and strengths;
- source_encoder: relative error of the key/value rows, and the PSNR of the FP32 animator's
  output when it is fed those rows instead of the FP32 ones (what the error costs in pixels);
- animator: PSNR of its output against the FP32 output;

and the three together (end to end): PSNR and a perceptual distance against the FP32 output,
plus both against the real driving frame for scale. FP8 graphs run in ONNX Runtime with basic
optimisations only (its CPU kernels cannot fuse FP8 Q/DQ): they are emulated, for accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iwarp import graphs
from iwarp.calibration.data import FrameSet
from iwarp.engine_build.tensorrt_build import psnr
from iwarp.graphs import AVATAR_ROWS as ROWS
from iwarp.graphs import image_to_tensor


def session(path: str | Path, threads: int, emulate: bool = False) -> Any:
    """An ORT CPU session; `emulate` (FP8) keeps ORT from fusing what its kernels cannot run."""
    import onnxruntime as ort

    from iwarp.engine_build.export import ort_session

    if not emulate:
        return ort_session(path, threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- running graphs


def detect(sess: Any, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of (B, S, S, 3) uint8 images."""
    points, strength = [], []
    for start in range(0, len(images), batch):
        feeds = graphs.feeds(graphs.KEYPOINTS_GRAPH, image_to_tensor(images[start : start + batch]))
        p, s = sess.run(None, feeds)
        points.append(p)
        strength.append(s)
    return np.concatenate(points), np.concatenate(strength)


def encode(
    sess: Any, fs: FrameSet, points: np.ndarray, strength: np.ndarray
) -> dict[str, np.ndarray]:
    """Key/value/pixel rows (A, M*T, .) of every avatar, from the given source keypoints."""
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ROWS}
    for a in range(fs.sources.shape[0]):
        image = image_to_tensor(fs.sources[a])
        feeds = graphs.feeds(graphs.SOURCE_ENCODER_GRAPH, image, points[a], strength[a])
        for name, value in zip(ROWS, sess.run(None, feeds), strict=True):
            rows[name].append(value.reshape(1, -1, value.shape[-1]))
    return {k: np.concatenate(v) for k, v in rows.items()}


def animate(
    sess: Any,
    fs: FrameSet,
    points: np.ndarray,
    strength: np.ndarray,
    rows: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """(N, 3, S, S) outputs for every driving frame of `fs`."""
    out = [
        sess.run(None, fs.animator_feed(i, points[i], strength[i], rows))[0] for i in range(len(fs))
    ]
    return np.concatenate(out)


@dataclass
class Outputs:
    """What one variant's graphs give on the evaluation set."""

    points: np.ndarray  # keypoints graph on the driving frames
    strength: np.ndarray
    rows: dict[str, np.ndarray] | None = None  # source_encoder on FP32 keypoints
    image_rows: np.ndarray | None = None  # FP32 animator on these rows
    image_alone: np.ndarray | None = None  # animator on FP32 inputs
    image_e2e: np.ndarray | None = None  # all three graphs of the variant


def run_graph(
    graph: str, sess: Any, fs: FrameSet, reference: dict[str, Any] | None = None
) -> Outputs:
    """One graph alone on FP32 inputs (the source encoder's rows go through `reference`'s
    FP32 animator)."""
    if graph == "keypoints":
        p, s = detect(sess, fs.driving)
        return Outputs(p, s)
    if graph == "source_encoder":
        rows = encode(sess, fs, fs.source_points, fs.source_strength)
        out = Outputs(fs.points, fs.strength, rows=rows)
        if reference is not None:
            out.image_rows = animate(reference["animator"], fs, fs.points, fs.strength, rows)
        return out
    if graph == "animator":
        image = animate(sess, fs, fs.points, fs.strength)
        return Outputs(fs.points, fs.strength, image_alone=image)
    raise ValueError(f"unknown graph {graph!r}")


def run_variant(sessions: dict[str, Any], fs: FrameSet, reference: dict[str, Any]) -> Outputs:
    """Every graph alone, and the three end to end (keypoints -> avatar -> animator)."""
    kp = run_graph("keypoints", sessions["keypoints"], fs)
    src = run_graph("source_encoder", sessions["source_encoder"], fs, reference)
    alone = run_graph("animator", sessions["animator"], fs).image_alone
    a, m = fs.sources.shape[:2]
    sp, ss = detect(sessions["keypoints"], fs.sources.reshape(a * m, *fs.sources.shape[2:]))
    sp, ss = sp.reshape(a, m, *sp.shape[1:]), ss.reshape(a, m, *ss.shape[1:])
    rows = encode(sessions["source_encoder"], fs, sp, ss)
    e2e = animate(sessions["animator"], fs, kp.points, kp.strength, rows)
    return Outputs(kp.points, kp.strength, src.rows, src.image_rows, alone, e2e)


def reference_outputs(sessions: dict[str, Any], fs: FrameSet) -> Outputs:
    """The FP32 graphs: their inputs are the cache's, so only the animator needs running."""
    image = animate(sessions["animator"], fs, fs.points, fs.strength)
    return Outputs(fs.points, fs.strength, fs.rows(), image, image, image)


# --------------------------------------------------------------------------- metrics


def frame_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    mse = diff.reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def graph_metrics(graph: str, out: Outputs, ref: Outputs, image_size: int) -> dict[str, float]:
    """The per-graph numbers (see the module docstring)."""
    if graph == "keypoints":
        err = float(np.abs(out.points - ref.points).mean())
        return {
            "keypoint_mae": err,
            "keypoint_mae_px": err * image_size / 2.0,
            "keypoint_max_px": float(np.abs(out.points - ref.points).max() * image_size / 2.0),
            "strength_mae": float(np.abs(out.strength - ref.strength).mean()),
        }
    if graph == "source_encoder":
        assert out.rows is not None and ref.rows is not None
        m = {f"{k}_rel_error": _rel(out.rows[k], ref.rows[k]) for k in ROWS}
        if out.image_rows is not None:
            m["animator_psnr_db"] = psnr(out.image_rows, ref.image_alone)
        return m
    if graph == "animator":
        assert out.image_alone is not None and ref.image_alone is not None
        per = frame_psnr(out.image_alone, ref.image_alone)
        return {
            "psnr_db": psnr(out.image_alone, ref.image_alone),
            "worst_psnr_db": float(per.min()),
        }
    raise ValueError(graph)


def score(graph: str, metrics: dict[str, float]) -> float:
    """One number per graph, higher is better, for choosing exclusions."""
    if graph == "keypoints":
        return -metrics["keypoint_mae_px"]
    if graph == "source_encoder":
        return metrics.get("animator_psnr_db", -100.0 * metrics["keys_rel_error"])
    return metrics["psnr_db"]


def end_to_end_metrics(
    out: Outputs,
    ref: Outputs,
    fs: FrameSet,
    perceptual: PerceptualDistance | None,
) -> dict[str, float | None]:
    assert out.image_e2e is not None and ref.image_e2e is not None
    truth = image_to_tensor(fs.driving)
    per = frame_psnr(out.image_e2e, ref.image_e2e)
    return {
        "psnr_db": psnr(out.image_e2e, ref.image_e2e),
        "worst_psnr_db": float(per.min()),
        "perceptual": perceptual(out.image_e2e, ref.image_e2e) if perceptual else None,
        "psnr_vs_driving_db": psnr(out.image_e2e, truth),
        "fp32_psnr_vs_driving_db": psnr(ref.image_e2e, truth),
    }


class PerceptualDistance:
    """Mean L1 distance of EfficientNet-Lite0 features (`iwarp.train.losses.PerceptualLoss`)
    between two image sets; 0 for identical images. Not LPIPS (its weights are not available
    here), so compare it only with itself."""

    def __init__(self) -> None:
        import torch

        from iwarp.train.losses import PerceptualLoss

        self.torch = torch
        self.loss = PerceptualLoss().eval()

    def __call__(self, a: np.ndarray, b: np.ndarray, batch: int = 8) -> float:
        torch = self.torch
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(a), batch):
                x = torch.from_numpy(np.ascontiguousarray(a[start : start + batch], np.float32))
                y = torch.from_numpy(np.ascontiguousarray(b[start : start + batch], np.float32))
                total += float(self.loss(x, y)) * len(x)
                count += len(x)
        return total / max(count, 1)


def perceptual_or_none() -> tuple[PerceptualDistance | None, str]:
    try:
        return PerceptualDistance(), "EfficientNet-Lite0 feature L1 (iwarp.train.losses)"
    except Exception as exc:  # the backbone is an optional dependency (iwarp[train])
        return None, f"not measured ({exc})"


# --------------------------------------------------------------------------- latency


def paired_latency(
    runs: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median ms of each callable; the callables take turns, so drift hits all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def latency_feeds(fs: FrameSet) -> dict[str, dict[str, np.ndarray]]:
    """Batch-1 inputs of each graph from a real evaluation frame (a 1-source avatar)."""
    feed = fs.animator_feed(0, fs.points[0], fs.strength[0])  # frame 0: one source
    return {
        graphs.KEYPOINTS_GRAPH: graphs.feeds(
            graphs.KEYPOINTS_GRAPH, image_to_tensor(fs.driving[0])
        ),
        graphs.SOURCE_ENCODER_GRAPH: graphs.feeds(
            graphs.SOURCE_ENCODER_GRAPH,
            image_to_tensor(fs.sources[0, 0]),
            fs.source_points[0, :1],
            fs.source_strength[0, :1],
        ),
        graphs.ANIMATOR_GRAPH: feed,
    }


def measure_latency(
    variants: dict[str, dict[str, Any]],
    fs: FrameSet,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """{graph or 'per_frame': {variant: median ms}}; per frame = keypoints + animator."""
    feeds = latency_feeds(fs)
    result: dict[str, dict[str, float]] = {}
    for graph, feed in feeds.items():
        result[graph] = paired_latency(
            {name: _runner(s[graph], feed) for name, s in variants.items()}, repeats, warmup
        )

    def frame(s: dict[str, Any]) -> Callable[[], Any]:
        def run() -> None:
            s["keypoints"].run(None, feeds["keypoints"])
            s["animator"].run(None, feeds["animator"])

        return run

    result["per_frame"] = paired_latency(
        {name: frame(s) for name, s in variants.items()}, repeats, warmup
    )
    return result


def _runner(sess: Any, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    return lambda: sess.run(None, feed)
