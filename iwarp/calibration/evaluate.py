"""Accuracy and speed of quantized graphs against the FP32 graphs, on real frames.

Every graph runs in the runtime's own ONNX Runtime backend (`OrtBackend`, on the CPU), the
FP32 one or a variant of it with some graphs replaced (`OrtBackend.with_graphs`), fed the way
the runtime feeds it. Each graph is measured alone, fed the FP32 graphs' inputs, so an error is
charged to the graph that made it:

- keypoints: mean abs error of the keypoints ([-1, 1] units and pixels), strengths and (for a
  network with one) the expression;
- source_encoder: relative error of the key/value rows, and the PSNR of the FP32 animator's
  output when it is fed those rows instead of the FP32 ones (what the error costs in pixels);
- animator: PSNR of its output against the FP32 output;

and the three together (end to end): PSNR and a perceptual distance against the FP32 output,
plus both against the real driving frame for scale. FP8 graphs run in ONNX Runtime with basic
optimisations only (its CPU kernels cannot fuse FP8 Q/DQ): they are emulated, for accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from iwarp.calibration.data import FrameSet
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    AVATAR_ROWS,
    KEYPOINTS_GRAPH,
    SOURCE_ENCODER_GRAPH,
    image_to_tensor,
)
from iwarp.metrics import frame_psnr, interleaved_median_ms, psnr
from iwarp.motion import Pose
from iwarp.runtime.backends.base import AvatarFeatures
from iwarp.runtime.backends.ort_backend import OrtBackend

ROWS = AVATAR_ROWS


def fp32_backend(onnx_dir: str | Path, threads: int) -> OrtBackend:
    """The FP32 graphs of an export, in the runtime's ONNX Runtime backend on the CPU."""
    return OrtBackend(onnx_dir, device="cpu", threads=threads)


def variant(
    fp32: OrtBackend, folder: str | Path, graphs: tuple[str, ...], emulate: bool = False
) -> OrtBackend:
    """`fp32` with `graphs` taken from `folder` (their quantized or FP16 files)."""
    return fp32.with_graphs({g: Path(folder) / f"{g}.onnx" for g in graphs}, emulate)


# --------------------------------------------------------------------------- running graphs


def detect(engine: OrtBackend, images: np.ndarray, batch: int = 8) -> Pose:
    """The poses of (B, S, S, 3) uint8 images."""
    parts = [
        engine.detect(image_to_tensor(images[start : start + batch]))
        for start in range(0, len(images), batch)
    ]
    return Pose.join(parts, np.concatenate)


def encode(engine: OrtBackend, fs: FrameSet, poses: Pose) -> dict[str, np.ndarray]:
    """Key/value/pixel rows (A, M*T, .) of every avatar, from the given source poses (A, M)."""
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ROWS}
    for a in range(fs.sources.shape[0]):
        out = engine.encode_source(image_to_tensor(fs.sources[a]), poses.map(itemgetter(a)))
        for name in ROWS:
            rows[name].append(out[name].reshape(1, -1, out[name].shape[-1]))  # M -> one avatar
    return {k: np.concatenate(v) for k, v in rows.items()}


def annotate(
    fs: FrameSet,
    fp32: OrtBackend,
    batch: int = 8,
    show_progress: bool = True,
    label: str = "",
) -> FrameSet:
    """Fills in the FP32 poses of every frame and the key/value rows of every avatar."""
    from tqdm import tqdm

    a, m = fs.sources.shape[:2]
    images = np.concatenate([fs.driving, fs.sources.reshape(a * m, *fs.sources.shape[2:])])
    steps = tqdm(
        range(0, len(images), batch), desc=f"keypoints {label}".strip(), disable=not show_progress
    )
    poses = Pose.join(
        [detect(fp32, images[start : start + batch], batch) for start in steps], np.concatenate
    )
    n = len(fs.driving)
    sources = poses.select(slice(n, None)).map(lambda x: x.reshape(a, m, *x.shape[1:]))
    fs.set_poses(poses.select(slice(None, n)), sources)
    rows = encode(fp32, fs, sources)
    fs.keys, fs.values, fs.pixels = (rows[k] for k in ROWS)
    return fs


def avatar_features(
    engine: OrtBackend, fs: FrameSet, i: int, rows: dict[str, np.ndarray] | None = None
) -> AvatarFeatures:
    """The avatar driving frame i animates, as the backend keeps it (its first sources)."""
    a, n = int(fs.avatar[i]), fs.num_sources(i)
    sources = fs.source_poses.map(lambda x: x[a, :n])
    return AvatarFeatures(
        engine.join_sources([fs.avatar_rows(i, rows)]),
        sources.points,
        sources.strength,
        n,
        sources.expression,
    )


def animate(
    engine: OrtBackend, fs: FrameSet, poses: Pose, rows: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """(N, 3, S, S) outputs for every driving frame of `fs`, at `poses` (N faces)."""
    out = [
        engine.animate(avatar_features(engine, fs, i, rows), poses.select(i))
        for i in range(len(fs))
    ]
    return np.concatenate(out)


@dataclass
class Outputs:
    """What one variant's graphs give on the evaluation set."""

    poses: Pose  # keypoints graph on the driving frames
    rows: dict[str, np.ndarray] | None = None  # source_encoder on FP32 keypoints
    image_rows: np.ndarray | None = None  # FP32 animator on these rows
    image_alone: np.ndarray | None = None  # animator on FP32 inputs
    image_e2e: np.ndarray | None = None  # all three graphs of the variant


def run_graph(
    graph: str, engine: OrtBackend, fs: FrameSet, fp32: OrtBackend | None = None
) -> Outputs:
    """`engine`'s `graph` alone on FP32 inputs (the source encoder's rows go through the FP32
    animator of `fp32`)."""
    if graph == KEYPOINTS_GRAPH:
        return Outputs(detect(engine, fs.driving))
    if graph == SOURCE_ENCODER_GRAPH:
        rows = encode(engine, fs, fs.source_poses)
        out = Outputs(fs.poses, rows=rows)
        if fp32 is not None:
            out.image_rows = animate(fp32, fs, fs.poses, rows)
        return out
    if graph == ANIMATOR_GRAPH:
        return Outputs(fs.poses, image_alone=animate(engine, fs, fs.poses))
    raise ValueError(f"unknown graph {graph!r}")


def run_variant(engine: OrtBackend, fs: FrameSet, fp32: OrtBackend) -> Outputs:
    """Every graph alone, and the three end to end (keypoints -> avatar -> animator)."""
    kp = run_graph(KEYPOINTS_GRAPH, engine, fs)
    src = run_graph(SOURCE_ENCODER_GRAPH, engine, fs, fp32)
    alone = run_graph(ANIMATOR_GRAPH, engine, fs).image_alone
    a, m = fs.sources.shape[:2]
    sources = detect(engine, fs.sources.reshape(a * m, *fs.sources.shape[2:]))
    rows = encode(engine, fs, sources.map(lambda x: x.reshape(a, m, *x.shape[1:])))
    e2e = animate(engine, fs, kp.poses, rows)
    return Outputs(kp.poses, src.rows, src.image_rows, alone, e2e)


def reference_outputs(fp32: OrtBackend, fs: FrameSet) -> Outputs:
    """The FP32 graphs: their inputs are the cache's, so only the animator needs running."""
    image = animate(fp32, fs, fs.poses)
    return Outputs(fs.poses, fs.rows(), image, image, image)


# --------------------------------------------------------------------------- metrics


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def graph_metrics(graph: str, out: Outputs, ref: Outputs, image_size: int) -> dict[str, float]:
    """The per-graph numbers (see the module docstring)."""
    if graph == KEYPOINTS_GRAPH:
        got, want = out.poses, ref.poses
        err = float(np.abs(got.points - want.points).mean())
        m = {
            "keypoint_mae": err,
            "keypoint_mae_px": err * image_size / 2.0,
            "keypoint_max_px": float(np.abs(got.points - want.points).max() * image_size / 2.0),
            "strength_mae": float(np.abs(got.strength - want.strength).mean()),
        }
        if got.expression is not None and want.expression is not None:
            m["expression_mae"] = float(np.abs(got.expression - want.expression).mean())
        return m
    if graph == SOURCE_ENCODER_GRAPH:
        assert out.rows is not None and ref.rows is not None
        m = {f"{k}_rel_error": _rel(out.rows[k], ref.rows[k]) for k in ROWS}
        if out.image_rows is not None:
            m["animator_psnr_db"] = psnr(out.image_rows, ref.image_alone)
        return m
    if graph == ANIMATOR_GRAPH:
        assert out.image_alone is not None and ref.image_alone is not None
        per = frame_psnr(out.image_alone, ref.image_alone)
        return {
            "psnr_db": psnr(out.image_alone, ref.image_alone),
            "worst_psnr_db": float(per.min()),
        }
    raise ValueError(graph)


def score(graph: str, metrics: dict[str, float]) -> float:
    """One number per graph, higher is better, for choosing exclusions."""
    if graph == KEYPOINTS_GRAPH:
        return -metrics["keypoint_mae_px"]
    if graph == SOURCE_ENCODER_GRAPH:
        return metrics.get("animator_psnr_db", -100.0 * metrics["keys_rel_error"])
    return metrics["psnr_db"]


Perceptual = Callable[[np.ndarray, np.ndarray], float]


def end_to_end_metrics(
    out: Outputs, ref: Outputs, fs: FrameSet, perceptual: Perceptual | None
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


def perceptual_or_none() -> tuple[Perceptual | None, str]:
    """`iwarp eval`'s perceptual distance (mean over frames), when its backbone is here."""
    try:
        import torch

        from iwarp.evaluation.metrics import PerceptualDistance

        distance = PerceptualDistance()
    except Exception as exc:  # the backbone is an optional dependency (iwarp[train])
        return None, f"not measured ({exc})"

    def mean_distance(a: np.ndarray, b: np.ndarray, batch: int = 8) -> float:
        total = 0.0
        for start in range(0, len(a), batch):
            x, y = (
                torch.from_numpy(np.ascontiguousarray(v[start : start + batch], np.float32))
                for v in (a, b)
            )
            total += float(distance(x, y).sum())
        return total / max(len(a), 1)

    return mean_distance, f"{distance.name} (iwarp.evaluation.metrics)"


# --------------------------------------------------------------------------- latency


def measure_latency(
    variants: dict[str, OrtBackend],
    fs: FrameSet,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """{graph or 'per_frame': {variant: median ms}} at batch 1 on a real evaluation frame (a
    1-source avatar), through the backend calls the runtime makes; per frame = keypoints +
    animator."""
    image = image_to_tensor(fs.driving[0])
    source = image_to_tensor(fs.sources[0, 0])
    source_pose = fs.source_poses.map(lambda x: x[0, :1])
    pose = fs.poses.select(0)  # frame 0: one source

    def calls(engine: OrtBackend) -> dict[str, Callable[[], Any]]:
        avatar = avatar_features(engine, fs, 0)
        return {
            KEYPOINTS_GRAPH: lambda: engine.detect(image),
            SOURCE_ENCODER_GRAPH: lambda: engine.encode_source(source, source_pose),
            ANIMATOR_GRAPH: lambda: engine.animate(avatar, pose),
            "per_frame": lambda: (engine.detect(image), engine.animate(avatar, pose)),
        }

    runs = {name: calls(engine) for name, engine in variants.items()}
    stages = (KEYPOINTS_GRAPH, SOURCE_ENCODER_GRAPH, ANIMATOR_GRAPH, "per_frame")
    return {
        stage: interleaved_median_ms({name: r[stage] for name, r in runs.items()}, repeats, warmup)
        for stage in stages
    }
