"""Per-stage latency of the runtime on real frames (`iwarp bench`).

Drives an Animator with a real clip exactly as a live stream would (face tracking, crop,
keypoints, animator), after a warm-up, and reports p50/p95/p99 per stage and per frame.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from iwarp.errors import InputError
from iwarp.media import read_video
from iwarp.paths import DEFAULT_AVATAR, shared_data_dir
from iwarp.runtime.animator import Animator
from iwarp.system import machine_label

STAGES = ("face_tracking", "keypoints", "animator")
# A val-split clip (people never seen in training), 512x512, 30 fps, with head motion.
DEFAULT_BENCH_CLIP = "liveportrait/driving/d3.mp4"


def default_clip() -> Path:
    data = shared_data_dir()
    if data is None or not (data / "clips" / DEFAULT_BENCH_CLIP).is_file():
        raise InputError(
            "no benchmark clip given and ../shared/data/clips is not here",
            "pass --clip FILE (any video with a face)",
        )
    return data / "clips" / DEFAULT_BENCH_CLIP


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}


def avatar_photos(sources: int, clip_frames: list[np.ndarray]) -> list[np.ndarray | Path]:
    """The packaged portrait plus (for N > 1) frames spread over the clip as extra photos."""
    if sources == 1:
        return [DEFAULT_AVATAR]
    picks = np.linspace(0, len(clip_frames) - 1, sources).astype(int)
    return [clip_frames[i] for i in picks]


def run_benchmark(
    backend: str = "onnxruntime",
    sources: int = 1,
    frames: int = 200,
    clip: str | Path | None = None,
    checkpoint: str | Path | None = None,
    threads: int = 0,
    warmup: int = 20,
    show_progress: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    clip_path = Path(clip) if clip else default_clip()
    driving = read_video(clip_path, max_frames=frames + warmup)
    animator = Animator.from_pretrained(
        backend, checkpoint, threads=threads, show_progress=show_progress, precision=precision
    )
    photos = avatar_photos(sources, driving)
    t0 = time.perf_counter()
    avatar = animator.add_avatar(photos)
    avatar_ms = (time.perf_counter() - t0) * 1e3

    stream = animator.stream()
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    frame_ms: list[float] = []
    feed = itertools.islice(itertools.cycle(driving), frames + warmup)
    wall_start = None
    for i, frame in enumerate(
        tqdm(feed, total=frames + warmup, desc=f"bench {backend}", disable=not show_progress)
    ):
        if i == warmup:
            wall_start = time.perf_counter()
        t = time.perf_counter()
        stream.animate(avatar, frame)
        elapsed = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            frame_ms.append(elapsed)
            for s in STAGES:
                per_stage[s].append(getattr(stream.times, s))
    wall = time.perf_counter() - (wall_start or time.perf_counter())
    return {
        "backend": backend,
        "precision": precision or "default",
        "backend_detail": animator.backend.describe(),
        "size": animator.backend.image_size,
        "sources": sources,
        "frames": frames,
        "clip": str(clip_path),
        "stages": {
            s: {f"{k}_ms": v for k, v in percentiles(vals).items()} for s, vals in per_stage.items()
        },
        "frame_ms": percentiles(frame_ms),
        "fps": frames / wall if wall > 0 else 0.0,
        "avatar_ms": avatar_ms,
        "machine": machine_label(),
        "_frame_samples": frame_ms,
    }


def plot_histogram(results: list[dict[str, Any]], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.hist(
            r["_frame_samples"],
            bins=40,
            alpha=0.6,
            label=f"{r['backend']}, {r['sources']} src: p50 {r['frame_ms']['p50']:.1f} ms",
        )
    ax.set_xlabel("per-frame latency (ms), face tracking included")
    ax.set_ylabel("frames")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
