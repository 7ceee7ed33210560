"""`iwarp calibrate`: real frames -> Q/DQ graphs -> accuracy gate -> report.

    OUT/onnx/ (or OUT/, or --onnx)  the plain FP32 graphs (exported here when missing)
    OUT/calibration_cache.npz       frames, keypoints and avatar key/value rows (reused)
    OUT/<mode>/                     the quantized graphs + metadata.json (precision, gate)
    OUT/<mode>.rejected/            the same when the gate fails (no backend loads them)
    OUT/calibration.json, .md       the report; OUT/calibration_grid.png

`iwarp build --precision int8` and `OrtBackend.from_checkpoint(..., precision="int8")` read
OUT/int8/. Layers kept in FP32 are chosen by measurement (``exclusions="auto"``): each
candidate group of `iwarp.calibration.quantize.GROUPS` is excluded alone on a subset of the
calibration frames, and the ones whose exclusion gains at least `min_gain` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import iwarp
from iwarp.calibration import data as cdata
from iwarp.calibration import evaluate as ev
from iwarp.calibration import quantize as qz
from iwarp.calibration import report as rep
from iwarp.errors import CheckpointError, InputError, IwarpError
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    GRAPHS,
    KEYPOINTS_GRAPH,
    SOURCE_ENCODER_GRAPH,
    tensor_to_image,
)
from iwarp.metrics import psnr
from iwarp.options import none_if_empty, option
from iwarp.runtime.backends.ort_backend import OrtBackend
from iwarp.system import cpu_name, physical_cores

REPORT_FORMAT = "iwarp-calibration-report/1"
# What exclusions="auto" chose on the shipped checkpoint (tiny, 256 px) with 128 train frames
# of ../shared/data/clips, gated on 32 val frames (the trials are in the calibration report);
# used by exclusions="default", which skips the search.
DEFAULT_EXCLUSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "modelopt": {
        KEYPOINTS_GRAPH: ("heatmap", "input"),
        SOURCE_ENCODER_GRAPH: ("key_proj", "input"),
        ANIMATOR_GRAPH: ("residual_mlp", "query_proj"),
    },
    "ort": {  # these still miss the default gate on keypoints (1.09 px mean abs error)
        KEYPOINTS_GRAPH: ("input", "softargmax"),
        SOURCE_ENCODER_GRAPH: ("input", "value_out"),
        ANIMATOR_GRAPH: ("keypoint_maps", "query_out", "generator_out"),
    },
}


class CalibrationGateError(IwarpError):
    """The quantized graphs are further from FP32 than the thresholds allow."""


@dataclass
class GateThresholds:
    """What the quantized graphs must reach against FP32 on the evaluation frames."""

    min_animator_psnr_db: float = option(
        30.0, flag="--min-animator-psnr", help="gate: animator alone (FP32 inputs), dB"
    )
    max_keypoint_error_px: float = option(
        1.0,
        flag="--max-keypoint-error",
        help="gate: keypoints graph mean abs error, pixels at model size",
    )
    min_source_psnr_db: float | None = option(
        30.0,
        flag="--min-source-psnr",
        help="gate: FP32 animator fed the quantized avatar rows, dB",
    )
    min_end_to_end_psnr_db: float | None = option(
        None,
        flag="--min-end-to-end-psnr",
        help="gate: all three graphs quantized, dB (default: off)",
    )


@dataclass
class CalibrationConfig:
    """`iwarp calibrate`'s settings; each field with help is its command-line option."""

    data: str | Path = option(help="folder of clips (manifest.csv optional)")
    out: str | Path = option("build", help="build folder: OUT/<mode>/, report, cache")
    mode: str = option("int8", choices=("int8", "fp8"), help="quantization")
    split: str | None = option(
        "train", parse=none_if_empty, help="manifest split to calibrate on ('' = all)"
    )
    eval_split: str = option("val", cli=False)
    frames: int = option(512, help="calibration driving frames")
    eval_frames: int = option(32, help="val frames for the gate")
    sources_per_avatar: int = option(3, flag="--sources", help="source frames per avatar")
    checkpoint: str | Path | None = option(
        None, help="weights (default: the ones shipped in the package)"
    )
    onnx_dir: str | Path | None = option(
        None, flag="--onnx", help="folder of the exported FP32 graphs (default: OUT/onnx)"
    )
    quantizer: str = option(
        "auto",
        choices=("auto", "modelopt", "ort"),
        help="auto: ModelOpt if usable, else onnxruntime",
    )
    method: str | None = option(  # None: the quantizer's default
        None, help="calibration method (modelopt: entropy/max; ort: minmax...)"
    )
    exclusions: str = option(  # "graph:group,..." / "group,..."
        "auto",
        flag="--exclude",
        help="layers kept FP32: auto (measured), default, none, or graph:group,...",
    )
    search_frames: int = option(64, help="frames per exclusion trial")
    min_gain_db: float = option(0.5, cli=False)  # PSNR graphs: exclusions must gain this much
    # keypoints: exclusions must cut the error by this fraction
    min_gain_fraction: float = option(0.1, cli=False)
    threads: int = option(0, help="ORT/torch threads (0: all cores)")
    timing_runs: int = option(20, help="latency: median of N runs")
    timing_warmup: int = option(3, cli=False)
    seed: int = option(0, help="calibration frame sampling seed")
    cache: str | Path | None = option(
        None, help="calibration cache (default OUT/calibration_cache.npz)"
    )
    clip_cache: str | Path | None = option(
        None, help="decoded clips cache (default ~/.cache/iwarp/clips)"
    )
    fp16: bool = option(True, flag="--no-fp16", help="skip the FP16 comparison")
    grid_frames: int = option(6, cli=False)
    gate: GateThresholds = option(default_factory=GateThresholds)
    show_progress: bool = option(
        True, flag="--json", invert=True, help="no progress; print one JSON line"
    )


# --------------------------------------------------------------------------- the run's state


@dataclass
class Setup:
    """What every step reads, decided before any work: the run's typed state. Steps return
    their results; the only thing they add here is `notes` (lines the report must show)."""

    config: CalibrationConfig
    out: Path
    split: str | None  # the calibration split as the data folder names it (None: all clips)
    quantizer: str
    quantizer_why: str
    method: str
    threads: int
    checkpoint: Path
    checkpoint_sha256: str
    image_size: int
    onnx_dir: Path  # the plain FP32 graphs
    cache_path: Path
    started: float
    notes: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        _say(self.config, text)


@dataclass
class Exclusions:
    chosen: dict[str, tuple[str, ...]]  # graph -> groups kept in FP32
    trials: dict[str, list[dict[str, Any]]]  # the search's measurements (empty: no search)
    how: str


@dataclass
class Fp16Variant:
    summary: dict[str, Any]  # the report's "fp16" entry
    outputs: ev.Outputs | None = None
    folder: Path | None = None  # its temporary graphs (calibrate removes them)


@dataclass
class Measurements:
    """The quantized graphs against FP32 (and FP16) on the evaluation frames."""

    outputs: ev.Outputs
    accuracy: dict[str, Any]
    perceptual_note: str
    fp16: Fp16Variant
    latency: dict[str, Any]
    gate: dict[str, Any]


def _say(config: CalibrationConfig, text: str) -> None:
    if config.show_progress:
        print(f"iwarp calibrate: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- entry point


def run_calibrate(config: CalibrationConfig) -> int:
    """`iwarp calibrate`: calibrates, then prints one JSON line that sums up the report."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    report = calibrate(config)
    summary = {
        "out": report["outputs"]["graphs_dir"],
        "mode": report["mode"],
        "quantizer": report["quantizer"]["name"],
        "exclusions": report["exclusions"]["chosen"],
        "gate": report["gate"]["passed"],
        "animator_psnr_db": report["accuracy"][ANIMATOR_GRAPH]["psnr_db"],
        "end_to_end_psnr_db": report["accuracy"]["end_to_end"]["psnr_db"],
        "report": report["outputs"]["markdown"],
    }
    print(json.dumps(summary))
    return 0


def calibrate(config: CalibrationConfig) -> dict[str, Any]:
    """Runs the whole calibration; returns the report (also written to OUT/calibration.*).

    Raises CalibrationGateError (after writing the report) when the gate fails, and
    IwarpError subclasses for bad input. The steps, in order: `prepare` (checks, FP32 graphs),
    `calibration_data` (frames and their FP32 inputs, cached), `choose_exclusions`,
    `quantize`, `measure` (accuracy, FP16, latency, gate), `build_report`, `publish`.
    """
    setup = prepare(config)
    fp32 = ev.fp32_backend(setup.onnx_dir, setup.threads)
    data = calibration_data(setup, fp32)
    setup.say(
        f"{len(data.calib)} calibration frames, {len(data.eval)} evaluation frames "
        f"({data.meta['eval_source']})"
    )
    reference = ev.reference_outputs(fp32, data.eval)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.mode}-", dir=setup.out))
    fp16: Fp16Variant | None = None
    try:
        exclusions = choose_exclusions(setup, staging, data, fp32, reference)
        results = quantize(setup, staging, data.calib, exclusions)
        quantized = ev.variant(fp32, staging, GRAPHS, emulate=config.mode == "fp8")
        measured = measure(setup, quantized, fp32, reference, data.eval)
        fp16 = measured.fp16
        target = setup.out / (config.mode if measured.gate["passed"] else f"{config.mode}.rejected")
        grid, grid_note = write_grid(setup, data.eval, reference, measured)
        report = build_report(
            setup, data, exclusions, results, measured, staging, target, grid, grid_note
        )
        publish(setup, staging, target, report, results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if fp16 is not None and fp16.folder is not None:
            shutil.rmtree(fp16.folder, ignore_errors=True)
    rep.write_json(setup.out / "calibration.json", report)
    rep.write_markdown(setup.out / "calibration.md", report)
    setup.say(f"report: {setup.out / 'calibration.md'}")
    gate = measured.gate
    if not gate["passed"]:
        failed = [ch for ch in gate["checks"] if not ch["passed"]]
        shown = "; ".join(
            f"{ch['name']} {ch['value']:.3g} (needs {ch['op']} {ch['threshold']})" for ch in failed
        )
        raise CalibrationGateError(
            f"{config.mode} graphs fail the accuracy gate: {shown}",
            f"see {setup.out / 'calibration.md'}; graphs left in {target}",
        )
    return report


# --------------------------------------------------------------------------- step: prepare


def prepare(c: CalibrationConfig) -> Setup:
    """Checks the arguments and the data folder (before any export), picks the quantizer and
    finds (or exports) the checkpoint's FP32 graphs."""
    started = time.perf_counter()
    if c.frames < cdata.MIN_FRAMES:
        raise InputError(
            f"--frames {c.frames} is too few to calibrate",
            f"use at least {cdata.MIN_FRAMES} frames (512 is a good default)",
        )
    if c.eval_frames < 1 or c.sources_per_avatar < 1:
        raise InputError("need at least 1 evaluation frame and 1 source per avatar")
    split = check_split(c)  # bad folders and splits fail before any export
    quantizer, why = qz.choose_quantizer(c.quantizer, c.mode)
    method = c.method or qz.DEFAULT_METHOD[quantizer][c.mode]
    _say(c, f"{c.mode} with {quantizer} ({why}), calibration method {method}")

    from iwarp.checkpoint import Checkpoint, file_sha256
    from iwarp.paths import DEFAULT_CHECKPOINT

    out = Path(c.out)
    ckpt_path = Path(c.checkpoint) if c.checkpoint else DEFAULT_CHECKPOINT
    ckpt = Checkpoint(ckpt_path)
    sha = file_sha256(ckpt_path)
    return Setup(
        config=c,
        out=out,
        split=split,
        quantizer=quantizer,
        quantizer_why=why,
        method=method,
        threads=c.threads or physical_cores(),
        checkpoint=ckpt_path,
        checkpoint_sha256=sha,
        image_size=ckpt.config.model.image_size,
        onnx_dir=fp32_graphs(c, out, ckpt_path, sha, ckpt.config),
        cache_path=Path(c.cache) if c.cache else out / "calibration_cache.npz",
        started=started,
    )


def check_split(c: CalibrationConfig) -> str | None:
    from iwarp.train.data import find_clips

    entries = find_clips(c.data, None)
    if c.split is None:
        return None
    if not any(e.split == c.split for e in entries):
        has_manifest = (Path(c.data) / "manifest.csv").is_file()
        raise InputError(
            f"no clips of split {c.split!r} in {c.data}",
            "leave out --split"
            if not has_manifest
            else f"choose a split of its manifest.csv: {sorted({e.split for e in entries})}",
        )
    return c.split if (Path(c.data) / "manifest.csv").is_file() else None


def fp32_graphs(c: CalibrationConfig, out: Path, ckpt_path: Path, sha: str, config: Any) -> Path:
    """The plain graphs of this checkpoint: --onnx, OUT/onnx or OUT; exported if absent."""
    from iwarp.engine_build.export import METADATA, check_build, export_onnx

    candidates = [Path(c.onnx_dir)] if c.onnx_dir is not None else [out / "onnx", out]
    found = next((d for d in candidates if (d / METADATA).is_file()), None)
    if found is None:
        target = candidates[0]
        _say(c, f"exporting the FP32 graphs of {ckpt_path} to {target}")
        export_onnx(ckpt_path, target, show_progress=c.show_progress)
        return target
    meta = json.loads((found / METADATA).read_text())
    if meta.get("precision", "fp32") != "fp32":
        raise CheckpointError(
            f"{found} holds {meta['precision']} graphs, not the plain FP32 ones",
            "pass the folder of the exported FP32 graphs with --onnx",
        )
    problems = check_build(found, sha, config)
    if problems:
        raise CheckpointError(
            f"the ONNX graphs in {found} do not match {ckpt_path}: {'; '.join(problems)}",
            f"re-export them: iwarp export --checkpoint {ckpt_path} --out {found}",
        )
    _say(c, f"FP32 graphs: {found}")
    return found


# --------------------------------------------------------------------------- step: data


def calibration_data(setup: Setup, fp32: OrtBackend) -> cdata.CalibrationData:
    """The cache when it matches; else frames from the clips, annotated by the FP32 graphs."""
    c = setup.config
    spec = cdata.cache_spec(
        c.data,
        setup.split,
        c.eval_split,
        c.frames,
        c.eval_frames,
        c.sources_per_avatar,
        setup.image_size,
        c.seed,
    )
    sha = setup.checkpoint_sha256
    cached = None
    if setup.cache_path.is_file():
        try:
            cached = cdata.load_cache(setup.cache_path)
        except InputError as exc:
            setup.say(f"ignoring the cache: {exc}")
    if cached is not None:
        frame_issues = cdata.frame_problems(cached, spec)
        if not frame_issues and cached.checkpoint_sha256 == sha:
            setup.say(f"reusing {setup.cache_path}")
            return cached
        if not frame_issues:
            setup.say("the checkpoint changed: recomputing keypoints and avatar rows")
            calib = cdata.strip_annotations(cached.calib)
            evals = cdata.strip_annotations(cached.eval)
            meta = {**cached.meta, "checkpoint_sha256": sha}
            return annotate_and_save(setup, meta, calib, evals, fp32)
        setup.say(f"the cache is for other frames ({'; '.join(frame_issues[:3])})")
    clips = cdata.load_clips(c.data, setup.split, setup.image_size, c.clip_cache, c.show_progress)
    calib = cdata.sample_frames(clips, c.frames, c.sources_per_avatar, c.seed)
    eval_source, evals = eval_frames(setup, clips, calib)
    meta = {
        **spec,
        "checkpoint_sha256": sha,
        "eval_source": eval_source,
        "calib_clips": calib.clips,
        "eval_clips": evals.clips,
    }
    return annotate_and_save(setup, meta, calib, evals, fp32)


def eval_frames(
    setup: Setup, clips: list[cdata.ClipFrames], calib: cdata.FrameSet
) -> tuple[str, cdata.FrameSet]:
    """Frames of the val clips; held-out frames of the calibration clips without any."""
    from iwarp.train.data import find_clips

    c = setup.config
    entries = find_clips(c.data, None)
    has_manifest = (Path(c.data) / "manifest.csv").is_file()
    if (
        has_manifest
        and c.eval_split != setup.split
        and any(e.split == c.eval_split for e in entries)
    ):
        val = cdata.load_clips(
            c.data, c.eval_split, setup.image_size, c.clip_cache, c.show_progress
        )
        fs = cdata.sample_frames(
            val, c.eval_frames, c.sources_per_avatar, c.seed + 1, min_frames=1, what="evaluation"
        )
        return f"the {c.eval_split!r} split ({len(fs.clips)} clips)", fs
    fs = cdata.sample_frames(
        clips,
        c.eval_frames,
        c.sources_per_avatar,
        c.seed + 1,
        avoid=cdata.used_frames(calib),
        min_frames=1,
        what="evaluation",
    )
    why = "no manifest" if not has_manifest else f"no {c.eval_split!r} clips to use"
    note = (
        f"evaluation frames are held-out frames of the calibration clips ({why}): the gate "
        "measures unseen frames, not unseen people"
    )
    setup.notes.append(note)
    setup.say(note)
    return f"held-out frames of the calibration clips ({why})", fs


def annotate_and_save(
    setup: Setup,
    meta: dict[str, Any],
    calib: cdata.FrameSet,
    evals: cdata.FrameSet,
    fp32: OrtBackend,
) -> cdata.CalibrationData:
    setup.say("running the FP32 graphs on the frames (keypoints, avatar rows)")
    show = setup.config.show_progress
    ev.annotate(calib, fp32, show_progress=show, label="(calibration)")
    ev.annotate(evals, fp32, show_progress=show, label="(evaluation)")
    data = cdata.CalibrationData(meta, calib, evals)
    cdata.save_cache(setup.cache_path, data)
    setup.say(f"saved {setup.cache_path}")
    return data


# --------------------------------------------------------------------------- step: exclusions


def choose_exclusions(
    setup: Setup,
    staging: Path,
    data: cdata.CalibrationData,
    fp32: OrtBackend,
    reference: ev.Outputs,
) -> Exclusions:
    """The layer groups kept in FP32: none, the defaults, the given ones, or measured."""
    c = setup.config
    spec = c.exclusions.strip()
    if spec == "none":
        return Exclusions({g: () for g in GRAPHS}, {}, "none (--exclude none)")
    if spec == "default":
        chosen = dict(DEFAULT_EXCLUSIONS[setup.quantizer])
        how = f"the defaults measured for {setup.quantizer} (--exclude default)"
        return Exclusions(chosen, {}, how)
    if spec != "auto":
        return Exclusions(_parse_exclusions(spec), {}, f"given: {spec}")
    sub = data.calib.subset(c.search_frames)
    feeds = {
        KEYPOINTS_GRAPH: qz.FeedReader(sub.keypoint_feeds()),
        SOURCE_ENCODER_GRAPH: qz.FeedReader(sub.source_feeds(limit=c.search_frames)),
        ANIMATOR_GRAPH: qz.FeedReader(sub.animator_feeds()),
    }
    chosen: dict[str, tuple[str, ...]] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    for graph in GRAPHS:
        setup.say(f"searching FP32 layers for {graph} on {len(feeds[graph])} inputs")
        chosen[graph], trials[graph] = _search_graph(
            setup, graph, staging, feeds[graph], data.eval, fp32, reference
        )
    how = (
        f"measured: each group excluded alone on {len(sub)} calibration frames, kept when "
        f"it gains >= {c.min_gain_db} dB (keypoints: cuts the error by "
        f">= {c.min_gain_fraction:.0%})"
    )
    return Exclusions(chosen, trials, how)


def _search_graph(
    setup: Setup,
    graph: str,
    staging: Path,
    feeds: qz.FeedReader,
    evals: cdata.FrameSet,
    fp32: OrtBackend,
    reference: ev.Outputs,
) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """Each candidate group of one graph excluded alone (then the winners together)."""
    import onnx

    c = setup.config
    src = setup.onnx_dir / f"{graph}.onnx"
    model = onnx.load(str(src), load_external_data=False)
    path = staging / f"search_{graph}.onnx"

    def trial(exclude: tuple[str, ...]) -> tuple[float, dict[str, Any], Any]:
        qz.quantize_graph(
            src, path, graph, feeds, c.mode, setup.quantizer, exclude, setup.method, False
        )
        engine = fp32.with_graphs({graph: path}, basic_optimizations=c.mode == "fp8")
        metrics = ev.graph_metrics(
            graph, ev.run_graph(graph, engine, evals, fp32), reference, setup.image_size
        )
        return ev.score(graph, metrics), metrics, onnx.load(str(path))

    base_score, base_metrics, base_model = trial(())
    rows: list[dict[str, Any]] = [
        {"exclude": [], "score": base_score, "gain": 0.0, "metrics": base_metrics}
    ]
    quantized = _quantized_nodes(base_model)
    good = []
    for g in qz.GROUPS[graph]:
        nodes = qz.group_nodes(model, [g])
        if not nodes:
            rows.append({"exclude": [g.name], "note": "matches no node of this graph"})
            continue
        if not quantized.intersection(nodes):
            rows.append(
                {"exclude": [g.name], "note": f"already FP32 ({setup.quantizer} leaves it)"}
            )
            continue
        try:
            s, m, _ = trial((g.name,))
        except qz.UnloadableGraphError as exc:
            rows.append({"exclude": [g.name], "note": f"not usable: {exc.message}"})
            setup.say(f"      {graph} without {g.name}: not usable ({exc.message})")
            continue
        gain = s - base_score
        rows.append({"exclude": [g.name], "score": s, "gain": gain, "metrics": m})
        setup.say(f"      {graph} without {g.name}: gain {gain:+.3f}")
        if _pays(c, graph, gain, base_score):
            good.append((gain, g.name))
    picked = tuple(name for _, name in sorted(good, reverse=True))
    if len(picked) > 1:
        try:
            s, m, _ = trial(picked)
        except qz.UnloadableGraphError as exc:  # keep the best single exclusion
            s, m = -float("inf"), {"error": exc.message}
        rows.append({"exclude": list(picked), "score": s, "gain": s - base_score, "metrics": m})
        best_single = max(good)
        if s < base_score + best_single[0]:  # the combination is no better: keep one
            picked = (best_single[1],)
            rows[-1]["note"] = f"no better than {best_single[1]} alone: kept that"
    return picked, rows


def _pays(c: CalibrationConfig, graph: str, gain: float, base: float) -> bool:
    if graph == KEYPOINTS_GRAPH:  # score = -error in px
        return gain >= c.min_gain_fraction * abs(base) and gain > 0
    return gain >= c.min_gain_db


# --------------------------------------------------------------------------- step: quantize


def quantize(
    setup: Setup, staging: Path, calib: cdata.FrameSet, exclusions: Exclusions
) -> dict[str, qz.QuantizeResult]:
    """The three Q/DQ graphs into `staging`, from the calibration frames' inputs."""
    c = setup.config
    feeds = {
        KEYPOINTS_GRAPH: qz.FeedReader(calib.keypoint_feeds()),
        SOURCE_ENCODER_GRAPH: qz.FeedReader(calib.source_feeds(limit=max(c.frames, 16))),
        ANIMATOR_GRAPH: qz.FeedReader(calib.animator_feeds()),
    }
    results = {}
    for i, graph in enumerate(GRAPHS, 1):
        kept = exclusions.chosen[graph]
        setup.say(
            f"[{i}/3] quantizing {graph} on {len(feeds[graph])} inputs"
            + (f", FP32: {', '.join(kept)}" if kept else "")
        )
        results[graph] = qz.quantize_graph(
            setup.onnx_dir / f"{graph}.onnx",
            staging / f"{graph}.onnx",
            graph,
            feeds[graph],
            c.mode,
            setup.quantizer,
            kept,
            setup.method,
            show_progress=c.show_progress,
        )
        setup.say(f"      {graph}: {results[graph].seconds:.0f} s")
    return results


# --------------------------------------------------------------------------- step: measure


def measure(
    setup: Setup,
    quantized: OrtBackend,
    fp32: OrtBackend,
    reference: ev.Outputs,
    evals: cdata.FrameSet,
) -> Measurements:
    """Accuracy of every graph and end to end, the FP16 comparison, latency, the gate."""
    setup.say("evaluating against FP32")
    out = ev.run_variant(quantized, evals, fp32)
    perceptual, perceptual_note = ev.perceptual_or_none()
    accuracy: dict[str, Any] = {
        g: ev.graph_metrics(g, out, reference, setup.image_size) for g in GRAPHS
    }
    accuracy["end_to_end"] = ev.end_to_end_metrics(out, reference, evals, perceptual)
    fp16 = fp16_variant(setup, fp32, reference, evals, perceptual)
    latency = measure_latency(setup, fp32, quantized, evals)
    return Measurements(out, accuracy, perceptual_note, fp16, latency, gate(setup, accuracy))


def fp16_variant(
    setup: Setup,
    fp32: OrtBackend,
    reference: ev.Outputs,
    evals: cdata.FrameSet,
    perceptual: ev.Perceptual | None,
) -> Fp16Variant:
    """The same comparison for FP16 graphs, as `iwarp build --precision fp16` makes them."""
    from iwarp.engine_build.fp16 import convert_fp16

    if not setup.config.fp16:
        return Fp16Variant({"available": False, "why": "not requested (--no-fp16)"})
    folder = Path(tempfile.mkdtemp(prefix=".fp16-", dir=setup.out))
    try:
        method = None
        for g in GRAPHS:
            method = convert_fp16(setup.onnx_dir / f"{g}.onnx", folder / f"{g}.onnx").method
        out = ev.run_variant(ev.variant(fp32, folder, GRAPHS), evals, fp32)
    except Exception as exc:  # any failure only costs the FP16 column
        shutil.rmtree(folder, ignore_errors=True)
        why = f"FP16 conversion failed: {type(exc).__name__}: {exc}"
        return Fp16Variant({"available": False, "why": why})
    accuracy: dict[str, Any] = {
        g: ev.graph_metrics(g, out, reference, setup.image_size) for g in GRAPHS
    }
    accuracy["end_to_end"] = ev.end_to_end_metrics(out, reference, evals, perceptual)
    summary = {
        "available": True,
        "method": method,
        "note": "FP16 graphs as `iwarp build --precision fp16` makes them, run by ONNX "
        "Runtime on the CPU (for accuracy; its CPU kernels are FP32)",
        "accuracy": accuracy,
    }
    return Fp16Variant(summary, out, folder)


def measure_latency(
    setup: Setup, fp32: OrtBackend, quantized: OrtBackend, evals: cdata.FrameSet
) -> dict[str, Any]:
    c = setup.config
    base = {
        "threads": setup.threads,
        "repeats": c.timing_runs,
        "warmup": c.timing_warmup,
        "cpu": cpu_name(),
    }
    if c.mode == "fp8":
        return {
            **base,
            "ms": {},
            "variants": [],
            "note": "FP8 is for TensorRT on FP8 GPUs; ONNX Runtime only emulates it on "
            "the CPU, so no CPU latency is reported",
        }
    if c.timing_runs <= 0:
        return {**base, "ms": {}, "variants": [], "note": "not measured (--timing-runs 0)"}
    setup.say(f"timing FP32 vs {c.mode.upper()} ({setup.threads} thread(s))")
    variants = {"fp32": fp32, c.mode: quantized}
    ms = ev.measure_latency(variants, evals, c.timing_runs, c.timing_warmup)
    return {
        **base,
        "ms": ms,
        "variants": list(variants),
        "note": "Timings on a shared machine are noisy: compare variants of one run only.",
    }


def gate(setup: Setup, accuracy: dict[str, Any]) -> dict[str, Any]:
    g = setup.config.gate
    checks = [
        ("animator PSNR vs FP32 (dB)", accuracy[ANIMATOR_GRAPH]["psnr_db"], ">=",
         g.min_animator_psnr_db),
        ("keypoints mean abs error (px)", accuracy[KEYPOINTS_GRAPH]["keypoint_mae_px"], "<=",
         g.max_keypoint_error_px),
        ("source_encoder: animator PSNR on its rows (dB)",
         accuracy[SOURCE_ENCODER_GRAPH].get("animator_psnr_db"), ">=", g.min_source_psnr_db),
        ("end-to-end PSNR vs FP32 (dB)", accuracy["end_to_end"]["psnr_db"], ">=",
         g.min_end_to_end_psnr_db),
    ]  # fmt: skip
    out = []
    for name, value, op, threshold in checks:
        if threshold is None or value is None:
            continue
        passed = value >= threshold if op == ">=" else value <= threshold
        out.append(
            {"name": name, "value": value, "op": op, "threshold": threshold, "passed": passed}
        )
    return {"passed": all(ch["passed"] for ch in out), "checks": out, "thresholds": asdict(g)}


# --------------------------------------------------------------------------- step: report


def write_grid(
    setup: Setup, evals: cdata.FrameSet, reference: ev.Outputs, measured: Measurements
) -> tuple[Path | None, str]:
    mode = setup.config.mode.upper()
    n = min(setup.config.grid_frames, len(evals))
    if n <= 0:
        return None, ""
    quant, fp16 = measured.outputs, measured.fp16.outputs
    assert quant.image_e2e is not None and reference.image_e2e is not None
    rows = np.unique(np.linspace(0, len(evals) - 1, n).round().astype(int))
    source = np.stack([evals.sources[evals.avatar[i], 0] for i in rows])
    columns = [("source", source), ("driving", evals.driving[rows])]
    columns.append(("FP32", tensor_to_image(reference.image_e2e[rows])))
    if fp16 is not None and fp16.image_e2e is not None:
        columns.append(("FP16", tensor_to_image(fp16.image_e2e[rows])))
    columns.append((mode, tensor_to_image(quant.image_e2e[rows])))
    labels = [f"{psnr(quant.image_e2e[i], reference.image_e2e[i]):.1f} dB" for i in rows]
    note = f"end to end on evaluation frames; label: {mode} PSNR vs FP32" + (
        "" if fp16 is not None else "; no FP16 column (see the report)"
    )
    path = rep.write_grid(setup.out / "calibration_grid.png", columns, labels, note)
    return path, note


def build_report(
    setup: Setup,
    data: cdata.CalibrationData,
    exclusions: Exclusions,
    results: dict[str, qz.QuantizeResult],
    measured: Measurements,
    staging: Path,
    target: Path,
    grid: Path | None,
    grid_note: str,
) -> dict[str, Any]:
    c = setup.config
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "iwarp_version": iwarp.__version__,
        "checkpoint": str(setup.checkpoint),
        "checkpoint_sha256": setup.checkpoint_sha256,
        "image_size": setup.image_size,
        "mode": c.mode,
        "quantizer": {
            "name": setup.quantizer,
            "why": setup.quantizer_why,
            "method": setup.method,
            "modelopt": qz.modelopt_status()[1],
            "high_precision": "fp32",
        },
        "data": data_summary(setup, data),
        "exclusions": {
            "how": exclusions.how,
            "chosen": {g: list(v) for g, v in exclusions.chosen.items()},
            "trials": exclusions.trials,
            "score_note": _SCORE_NOTES,
            "groups": {g: qz.describe_groups(g) for g in GRAPHS},
        },
        "accuracy": measured.accuracy,
        "perceptual": measured.perceptual_note,
        "fp16": measured.fp16.summary,
        "graphs": graph_info(setup, staging, results),
        "latency": measured.latency,
        "gate": measured.gate,
        "config": _config_dict(c),
        "outputs": {
            "graphs_dir": str(target),
            "grid": str(grid) if grid else None,
            "grid_note": grid_note,
            "json": str(setup.out / "calibration.json"),
            "markdown": str(setup.out / "calibration.md"),
            "cache": str(setup.cache_path),
        },
        "notes": setup.notes,
        "seconds": round(time.perf_counter() - setup.started, 1),
    }


def graph_info(
    setup: Setup, staging: Path, results: dict[str, qz.QuantizeResult]
) -> dict[str, Any]:
    return {
        g: {
            **results[g].to_dict(),
            "bytes": (staging / f"{g}.onnx").stat().st_size,
            "fp32_bytes": (setup.onnx_dir / f"{g}.onnx").stat().st_size,
        }
        for g in GRAPHS
    }


def data_summary(setup: Setup, data: cdata.CalibrationData) -> dict[str, Any]:
    m = data.meta
    return {
        "folder": m["data"],
        "split": m["split"] or "all clips",
        "frames": len(data.calib),
        "frames_requested": m["frames"],
        "avatars": int(data.calib.sources.shape[0]),
        "sources_per_avatar": data.calib.sources_per_avatar,
        "clips": list(data.calib.clips),
        "eval_frames": len(data.eval),
        "eval_source": m["eval_source"],
        "eval_clips": list(data.eval.clips),
        "cache": str(setup.cache_path),
    }


# --------------------------------------------------------------------------- step: publish


def publish(
    setup: Setup,
    staging: Path,
    target: Path,
    report: dict[str, Any],
    results: dict[str, qz.QuantizeResult],
) -> None:
    """Moves the graphs to OUT/<mode>/ (or .rejected) with their metadata.json, last."""
    import hashlib

    from iwarp.engine_build.export import METADATA, load_metadata

    meta = load_metadata(setup.onnx_dir)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for g in GRAPHS:
        path = target / f"{g}.onnx"
        os.replace(staging / f"{g}.onnx", path)
        meta["graphs"][g].update(
            {
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "source_sha256": meta["graphs"][g].get("sha256"),
                "quantization": results[g].to_dict(),
                "max_abs_error": None,
            }
        )
    meta.update(
        {
            "precision": setup.config.mode,
            "source_onnx": str(setup.onnx_dir),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quantizer": report["quantizer"],
            "exclusions": report["exclusions"]["chosen"],
            "calibration": {
                "frames": report["data"]["frames"],
                "folder": report["data"]["folder"],
                "split": report["data"]["split"],
                "report": str(setup.out / "calibration.json"),
            },
            "gate": {"passed": report["gate"]["passed"], "checks": report["gate"]["checks"]},
        }
    )
    name = METADATA if report["gate"]["passed"] else "metadata.rejected.json"
    tmp = target / (name + ".tmp")
    tmp.write_text(json.dumps(rep._jsonable(meta), indent=2) + "\n")
    os.replace(tmp, target / name)


_SCORE_NOTES = {
    KEYPOINTS_GRAPH: "score = -(keypoint mean abs error in px); higher is better",
    SOURCE_ENCODER_GRAPH: "score = PSNR (dB) of the FP32 animator fed this graph's avatar rows",
    ANIMATOR_GRAPH: "score = PSNR (dB) of the animator's output vs FP32, on FP32 inputs",
}


def _quantized_nodes(model: Any) -> set[str]:
    """Nodes with at least one input coming out of a DequantizeLinear."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type != "QuantizeLinear" and dq & set(n.input)}


def _parse_exclusions(spec: str) -> dict[str, tuple[str, ...]]:
    """'animator:generator_out,keypoints:heatmap' or bare group names (looked up per graph)."""
    chosen: dict[str, list[str]] = {g: [] for g in GRAPHS}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if ":" in item:
            graph, name = item.split(":", 1)
            if graph not in GRAPHS:
                raise IwarpError(f"unknown graph {graph!r} in --exclude", f"use {GRAPHS}")
            qz.group(graph, name)  # raises for unknown names
            chosen[graph].append(name)
            continue
        owners = [g for g in GRAPHS if any(x.name == item for x in qz.GROUPS[g])]
        if not owners:
            known = sorted({f"{g}:{x.name}" for g in GRAPHS for x in qz.GROUPS[g]})
            raise IwarpError(f"unknown exclusion group {item!r}", f"choose from {known}")
        for g in owners:
            chosen[g].append(item)
    return {g: tuple(v) for g, v in chosen.items()}


def _config_dict(c: CalibrationConfig) -> dict[str, Any]:
    d = asdict(c)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
