"""Per-stage latency of the runtime on real frames (`iwarp bench`).

Drives an Animator with a real clip exactly as a live stream would (face tracking, crop,
keypoints, animator), after a warm-up, and reports p50/p95/p99 per stage and per frame, and
where the time goes: the engine's own time for each graph inside the pipeline (the backend
times every call), the pipeline overhead (frame time minus those graphs' time: tracking, crop,
conversions, relative motion, smoothing), and the same graphs run alone on fixed inputs (raw).
Accuracy: each engine's output frames against the FP32 torch pipeline's on the same frames.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from iwarp.errors import IwarpError
from iwarp.graphs import ANIMATOR_GRAPH, KEYPOINTS_GRAPH
from iwarp.media import default_driving_clip, read_video
from iwarp.metrics import percentile, percentiles, psnr
from iwarp.options import comma_list, option
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime.animator import Animator
from iwarp.runtime.options import EngineOptions
from iwarp.system import isa_features, machine_label, physical_cores

STAGES = (
    "face_tracking",
    KEYPOINTS_GRAPH,
    ANIMATOR_GRAPH,
)  # the pipeline step, then the two per-frame graphs


def avatar_photos(sources: int, clip_frames: list[np.ndarray]) -> list[np.ndarray | Path]:
    """The packaged portrait plus (for N > 1) frames spread over the clip as extra photos."""
    if sources == 1:
        return [DEFAULT_AVATAR]
    picks = np.linspace(0, len(clip_frames) - 1, sources).astype(int)
    return [clip_frames[i] for i in picks]


def parse_engine(spec: str) -> tuple[str, str | None]:
    """ "openvino:bf16" -> ("openvino", "bf16"); "torch" -> ("torch", None)."""
    name, _, precision = spec.partition(":")
    return name.strip(), (precision.strip() or None)


def all_engines(checkpoint: str | Path | None = None) -> list[str]:
    """Every engine and precision installed and sensible on this machine (`--backend all`)."""
    from iwarp.runtime.backends import openvino_backend
    from iwarp.runtime.backends.onnx_build import default_build_dir
    from iwarp.system import has_bf16_compute

    folder = default_build_dir(checkpoint)
    calibrated = (folder / "int8" / "metadata.json").is_file()
    out = ["torch", "onnxruntime:fp32"]
    if calibrated:
        out.append("onnxruntime:int8")
    if openvino_backend.available():
        out.append("openvino:fp32")
        if has_bf16_compute():
            out.append("openvino:bf16")
        if calibrated:
            out.append("openvino:int8")
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            out.append("tensorrt:fp16")
    except ImportError:
        pass
    return out


def engine_precision(engine: Any) -> str:
    """The precision an engine runs at (the backends record it differently)."""
    if getattr(engine, "precision", None):
        return str(engine.precision)
    return str(getattr(engine, "metadata", {}).get("precision", "fp32"))


def raw_graph_times(animator: Animator, avatar_id: str, frame: np.ndarray, runs: int) -> dict:
    """p50 of the keypoints and animator graphs alone, on the crop of `frame` (no pipeline)."""
    from iwarp.face import crop_and_resize
    from iwarp.graphs import image_to_tensor

    backend = animator.backend
    box = animator.stream().tracker.update(frame) if runs > 0 else None
    if box is None:
        return {}
    image = image_to_tensor(crop_and_resize(frame, box, backend.image_size))
    features = animator.get(avatar_id).features
    detect_ms, animate_ms = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        pose = backend.detect(image)
        t1 = time.perf_counter()
        backend.animate(features, pose)
        t2 = time.perf_counter()
        detect_ms.append((t1 - t0) * 1e3)
        animate_ms.append((t2 - t1) * 1e3)
    skip = min(3, runs // 4)  # warm caches after the pipeline's different memory traffic
    return {
        "keypoints_p50_ms": float(np.median(detect_ms[skip:])),
        "animator_p50_ms": float(np.median(animate_ms[skip:])),
    }


class EngineRun:
    """One engine animating one avatar from a clip, recording each frame (`step`)."""

    def __init__(
        self,
        backend: str,
        sources: int,
        driving: list[np.ndarray],
        checkpoint: str | Path | None = None,
        threads: int = 0,
        show_progress: bool = True,
        precision: str | None = None,
    ) -> None:
        self.backend, self.sources, self.asked_precision = backend, sources, precision
        self.animator = Animator.from_pretrained(
            backend, checkpoint, threads=threads, show_progress=show_progress, precision=precision
        )
        self.engine = self.animator.backend
        t0 = time.perf_counter()
        self.avatar = self.animator.add_avatar(avatar_photos(sources, driving))
        self.avatar_ms = (time.perf_counter() - t0) * 1e3
        self.stream = self.animator.stream()
        self.per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        self.frame_ms: list[float] = []
        self.graph_ms: dict[str, list[float]] = {
            KEYPOINTS_GRAPH: [],
            ANIMATOR_GRAPH: [],
            "overhead": [],
        }
        self.outputs: list[np.ndarray] = []

    def step(self, frame: np.ndarray, record: bool, keep_outputs: int = 0) -> None:
        engine = self.engine
        engine.stage_ms.clear()
        t = time.perf_counter()
        out = self.stream.animate(self.avatar, frame)
        elapsed = (time.perf_counter() - t) * 1e3
        if not record:
            return
        self.frame_ms.append(elapsed)
        for s in STAGES:
            self.per_stage[s].append(getattr(self.stream.times, s))
        kp = engine.stage_ms.get("detect", 0.0)
        an = engine.stage_ms.get("animate", 0.0)
        self.graph_ms[KEYPOINTS_GRAPH].append(kp)
        self.graph_ms[ANIMATOR_GRAPH].append(an)
        self.graph_ms["overhead"].append(elapsed - kp - an)
        if len(self.outputs) < keep_outputs:
            self.outputs.append(out)

    def result(self, clip: Path, raw: dict[str, float]) -> dict[str, Any]:
        engine, frames = self.engine, len(self.frame_ms)
        busy_s = sum(self.frame_ms) / 1e3
        return {
            "backend": engine.name if self.backend == "auto" else self.backend,
            "auto": self.backend == "auto",
            "precision": self.asked_precision or engine_precision(engine),
            "backend_detail": engine.describe(),
            "size": engine.image_size,
            "sources": self.sources,
            "frames": frames,
            "clip": str(clip),
            "stages": {
                s: {f"{k}_ms": v for k, v in percentiles(vals).items()}
                for s, vals in self.per_stage.items()
            },
            "frame_ms": percentiles(self.frame_ms),
            # Frames per second of this engine's own frame time (runs may be interleaved).
            "fps": frames / busy_s if busy_s > 0 else 0.0,
            "avatar_ms": self.avatar_ms,
            # The engine's own time per graph inside the pipeline, and everything else.
            "graphs_in_pipeline": {
                f"{k}_p50_ms": percentile(v, 50) for k, v in self.graph_ms.items() if v
            },
            "overhead_ms": percentiles(self.graph_ms["overhead"]) if frames else {},
            "raw_graphs": raw,
            "machine": machine_label(),
            "isa": isa_features(),
            "_frame_samples": self.frame_ms,
            "_outputs": self.outputs,
        }


def run_interleaved(
    engines: list[tuple[str, str | None]],
    sources: int = 1,
    frames: int = 200,
    clip: str | Path | None = None,
    checkpoint: str | Path | None = None,
    threads: int = 0,
    warmup: int = 20,
    show_progress: bool = True,
    keep_outputs: int = 0,
    raw_runs: int = 40,
) -> list[dict[str, Any]]:
    """Several engines on the same frames, frame by frame in turn: load from other processes
    (and thermal or frequency changes) falls on all of them alike, so their times compare."""
    clip_path = Path(clip) if clip else default_driving_clip()
    driving = read_video(clip_path, max_frames=frames + warmup)
    runs = [
        EngineRun(name, sources, driving, checkpoint, threads, show_progress, precision)
        for name, precision in engines
    ]
    feed = itertools.islice(itertools.cycle(driving), frames + warmup)
    names = ", ".join(r.backend for r in runs)
    for i, frame in enumerate(
        tqdm(feed, total=frames + warmup, desc=f"bench {names}", disable=not show_progress)
    ):
        for run in runs:
            run.step(frame, record=i >= warmup, keep_outputs=keep_outputs)
    results = []
    for run in runs:
        raw = raw_graph_times(run.animator, run.avatar, driving[warmup % len(driving)], raw_runs)
        results.append(run.result(clip_path, raw))
    return results


def _label(r: dict[str, Any]) -> str:
    return f"{'auto: ' if r.get('auto') else ''}{r['backend']} {r['precision']}"


def speedup_vs_torch(results: list[dict[str, Any]]) -> None:
    """Adds "vs_torch" (torch frame p50 / this frame p50, same sources) where torch ran."""
    torch_p50 = {r["sources"]: r["frame_ms"]["p50"] for r in results if r["backend"] == "torch"}
    for r in results:
        base = torch_p50.get(r["sources"])
        r["vs_torch"] = base / r["frame_ms"]["p50"] if base else None


def comparison_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per engine and number of sources."""
    head = (
        "| engine | sources | frame p50 | p95 | fps | keypoints graph p50 (pipeline / alone) "
        "| animator graph p50 (pipeline / alone) | pipeline overhead p50 | x torch "
        "| PSNR vs FP32 torch |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in results:
        g, raw = r.get("graphs_in_pipeline", {}), r.get("raw_graphs", {})
        vs = r.get("vs_torch")
        db = r.get("psnr_vs_torch_db")
        db_text = "reference" if r["backend"] == "torch" else (f"{db:.1f} dB" if db else "-")
        rows.append(
            f"| {_label(r)} | {r['sources']} | {r['frame_ms']['p50']:.1f} ms "
            f"| {r['frame_ms']['p95']:.1f} | {r['fps']:.1f} "
            f"| {g.get('keypoints_p50_ms', 0):.1f} / {raw.get('keypoints_p50_ms', 0):.1f} "
            f"| {g.get('animator_p50_ms', 0):.1f} / {raw.get('animator_p50_ms', 0):.1f} "
            f"| {r.get('overhead_ms', {}).get('p50', 0):.1f} "
            f"| {f'{vs:.2f}x' if vs else '-'} | {db_text} |"
        )
    return "\n".join(rows)


def plot_comparison(results: list[dict[str, Any]], out_png: str | Path) -> None:
    """Side by side: where each engine's median frame goes (stacked bars), and the latency
    histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, hist) = plt.subplots(1, 2, figsize=(13, 0.5 * len(results) + 3.5))
    labels = [f"{_label(r)}, {r['sources']} src" for r in results]
    y = np.arange(len(results))
    left = np.zeros(len(results))
    parts = (
        ("keypoints graph", lambda r: r["graphs_in_pipeline"].get("keypoints_p50_ms", 0.0)),
        ("animator graph", lambda r: r["graphs_in_pipeline"].get("animator_p50_ms", 0.0)),
        ("pipeline overhead", lambda r: r["overhead_ms"].get("p50", 0.0)),
    )
    for name, value in parts:
        widths = np.array([value(r) for r in results])
        bars.barh(y, widths, left=left, label=name)
        left += widths
    for i, r in enumerate(results):
        db = r.get("psnr_vs_torch_db")
        note = f"{r['frame_ms']['p50']:.1f} ms" + (f", {db:.0f} dB" if db else "")
        bars.text(left[i] + 0.5, i, note, va="center", fontsize=8)
    bars.set_yticks(y, labels)
    bars.invert_yaxis()
    bars.set_xlabel("median per-frame time (ms): the graphs' own time + the rest")
    bars.set_xlim(0, max(left) * 1.35 if len(left) else 1)
    bars.legend(loc="lower right", fontsize=8)
    bars.grid(axis="x", alpha=0.3)
    samples = [np.asarray(r["_frame_samples"]) for r in results]
    lo = min((float(x.min()) for x in samples if x.size), default=1.0)
    hi = max((float(x.max()) for x in samples if x.size), default=2.0)
    wide = hi > 8 * lo > 0  # e.g. torch eager beside the graph engines: a log axis
    bins = np.geomspace(lo, hi, 50) if wide else 40
    for x, label in zip(samples, labels, strict=True):
        hist.hist(x, bins=bins, alpha=0.5, label=label)
    if wide:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        hist.set_xscale("log")
        hist.xaxis.set_major_formatter(ScalarFormatter())
        hist.xaxis.set_minor_formatter(NullFormatter())
    hist.set_xlabel("per-frame latency (ms), face tracking included")
    hist.set_ylabel("frames")
    hist.legend(fontsize=7)
    hist.grid(alpha=0.3)
    machine = results[0]["machine"] if results else ""
    fig.suptitle(f"iwarp bench on {machine}", fontsize=10)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


@dataclass
class BenchOptions:
    """`iwarp bench`: `bench_engines`' arguments (`iwarp bench-webrtc` times a server)."""

    engine: EngineOptions = option(default_factory=EngineOptions)  # its backend: a list
    size: int | None = option(None, help="check that the model runs at this size")
    sources: list[int] = option(
        default_factory=lambda: [1],
        parse=comma_list(int),
        repeat=False,
        help="number of avatar photos, comma-separated for several runs (e.g. 1,3)",
    )
    frames: int = option(200, help="frames to time (after warm-up)")
    clip: str | None = option(
        None, help="driving clip (default: a val clip from ../shared/data/clips)"
    )
    precision: str | None = option(
        None, help="fp32, bf16, fp16 or int8 (default: the backend's; int8 after calibrate)"
    )
    accuracy_frames: int = option(
        30, help="frames compared with the FP32 torch pipeline, in dB (0: skip)"
    )
    json: bool = option(False, help="one JSON object per run")
    plot: str | None = option(
        None, help="write a PNG: where each frame's time goes, and histograms"
    )


def bench_engines(
    engines: list[str],
    sources: list[int],
    frames: int = 200,
    clip: str | Path | None = None,
    checkpoint: str | Path | None = None,
    threads: int = 0,
    precision: str | None = None,
    accuracy_frames: int = 30,
    show_progress: bool = True,
    on_result: Any = None,
) -> list[dict[str, Any]]:
    """Every engine spec ("name" or "name:precision"; "all") on the same frames, interleaved
    (`run_interleaved`), for each number of sources; adds speed relative to torch and PSNR
    against the FP32 torch pipeline on the first `accuracy_frames` frames (torch is added to
    the runs for that when not in the list)."""
    specs: list[str] = []
    for spec in engines:
        specs += all_engines(checkpoint) if spec == "all" else [spec]
    results: list[dict[str, Any]] = []
    for n in sources:
        parsed = [parse_engine(spec) for spec in specs]
        parsed = [(name, p or precision) for name, p in parsed]
        if accuracy_frames > 0 and not any(name == "torch" for name, _ in parsed):
            parsed.append(("torch", None))  # the FP32 reference, timed alongside
        batch = run_interleaved(
            parsed,
            n,
            frames,
            clip,
            checkpoint,
            threads,
            show_progress=show_progress,
            keep_outputs=accuracy_frames,
        )
        reference = next((r["_outputs"] for r in batch if r["backend"] == "torch"), None)
        if accuracy_frames > 0 and reference:
            for r in batch:
                if r["backend"] != "torch" and r["_outputs"]:
                    count = min(len(r["_outputs"]), len(reference))
                    r["psnr_vs_torch_db"] = psnr(
                        np.stack(r["_outputs"][:count]), np.stack(reference[:count]), peak=255.0
                    )
        results += batch
    speedup_vs_torch(results)
    if on_result is not None:
        for r in results:
            on_result(r)
    return results


def run_bench(o: BenchOptions) -> int:
    """`iwarp bench`: the machine, one summary per run as it finishes, the comparison table."""
    if not o.json:
        isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa_features().items())
        print(f"CPU: {machine_label()}; {o.engine.threads or physical_cores()} threads")
        print(f"ISA: {isa}")

    def show(r: dict[str, Any]) -> None:
        if o.size is not None and r["size"] != o.size:
            raise IwarpError(
                f"the checkpoint is for {r['size']}x{r['size']}, not {o.size}",
                "leave out --size or pass a checkpoint trained for that size",
            )
        print(json.dumps(public_fields(r)) if o.json else run_summary(r))

    results = bench_engines(
        [b.strip() for b in o.engine.backend.split(",") if b.strip()],
        o.sources,
        o.frames,
        o.clip,
        o.engine.checkpoint,
        o.engine.threads,
        precision=o.precision,
        accuracy_frames=o.accuracy_frames,
        show_progress=not o.json,
        on_result=show,
    )
    if not o.json:
        print()
        print(comparison_table(results))
    if o.plot:
        plot_comparison(results, o.plot)
    return 0


def public_fields(r: dict[str, Any]) -> dict[str, Any]:
    """A run's result without its raw samples (the `_`-prefixed keys)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


def run_summary(r: dict[str, Any]) -> str:
    """Three lines on one run: frame time, stages, graph times in and out of the pipeline."""
    f, g, raw = r["frame_ms"], r["graphs_in_pipeline"], r["raw_graphs"]
    stages = "  ".join(f"{k} {v['p50_ms']:.1f}" for k, v in r["stages"].items())
    kp, an = f"{KEYPOINTS_GRAPH}_p50_ms", f"{ANIMATOR_GRAPH}_p50_ms"
    return (
        f"{r['backend']} {r['precision']} ({r['backend_detail']}), {r['sources']} src: "
        f"frame p50 {f['p50']:.1f} / p95 {f['p95']:.1f} / p99 {f['p99']:.1f} ms, "
        f"{r['fps']:.1f} fps\n  stages p50 ms: {stages}; avatar {r['avatar_ms']:.0f} ms\n"
        f"  graphs p50 ms in the pipeline / alone: {KEYPOINTS_GRAPH} {g.get(kp, 0):.1f} / "
        f"{raw.get(kp, 0):.1f}, {ANIMATOR_GRAPH} {g.get(an, 0):.1f} / {raw.get(an, 0):.1f}"
        f"; pipeline overhead p50 {r['overhead_ms'].get('p50', 0):.1f} ms"
    )
