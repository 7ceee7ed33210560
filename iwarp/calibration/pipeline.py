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
from iwarp.system import cpu_name, physical_cores

GRAPHS = ("keypoints", "source_encoder", "animator")
REPORT_FORMAT = "iwarp-calibration-report/1"
# What exclusions="auto" chose on the shipped checkpoint (tiny, 256 px) with 128 train frames
# of ../shared/data/clips, gated on 32 val frames (the trials are in the calibration report);
# used by exclusions="default", which skips the search.
DEFAULT_EXCLUSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "modelopt": {
        "keypoints": ("heatmap", "input"),
        "source_encoder": ("key_proj", "input"),
        "animator": ("residual_mlp", "query_proj"),
    },
    "ort": {  # these still miss the default gate on keypoints (1.09 px mean abs error)
        "keypoints": ("input", "softargmax"),
        "source_encoder": ("input", "value_out"),
        "animator": ("keypoint_maps", "query_out", "generator_out"),
    },
}


class CalibrationGateError(IwarpError):
    """The quantized graphs are further from FP32 than the thresholds allow."""


@dataclass
class GateThresholds:
    """What the quantized graphs must reach against FP32 on the evaluation frames."""

    min_animator_psnr_db: float = 30.0  # animator alone (FP32 inputs)
    max_keypoint_error_px: float = 1.0  # keypoints graph: mean abs error, pixels at model size
    min_source_psnr_db: float | None = 30.0  # FP32 animator fed the quantized avatar rows
    min_end_to_end_psnr_db: float | None = None  # all three graphs quantized


@dataclass
class CalibrationConfig:
    data: str | Path
    out: str | Path = "build"
    mode: str = "int8"
    split: str | None = "train"
    eval_split: str = "val"
    frames: int = 512
    eval_frames: int = 32
    sources_per_avatar: int = 3
    checkpoint: str | Path | None = None
    onnx_dir: str | Path | None = None
    quantizer: str = "auto"  # auto, modelopt, ort
    method: str | None = None  # calibration method (None: the quantizer's default)
    exclusions: str = "auto"  # auto (measured), default, none, or "graph:group,..." / "group,..."
    search_frames: int = 64
    min_gain_db: float = 0.5  # PSNR graphs: exclusions must gain this much
    min_gain_fraction: float = 0.1  # keypoints: exclusions must cut the error by this fraction
    threads: int = 0  # ORT threads for evaluation and timing (0: physical cores)
    timing_runs: int = 20
    timing_warmup: int = 3
    seed: int = 0
    cache: str | Path | None = None
    clip_cache: str | Path | None = None  # where ClipDataset keeps decoded clips
    fp16: bool = True
    grid_frames: int = 6
    gate: GateThresholds = field(default_factory=GateThresholds)
    show_progress: bool = True


# --------------------------------------------------------------------------- entry point


def calibrate(config: CalibrationConfig) -> dict[str, Any]:
    """Runs the whole calibration; returns the report (also written to OUT/calibration.*).

    Raises CalibrationGateError (after writing the report) when the gate fails, and
    IwarpError subclasses for bad input.
    """
    return _Run(config).run()


class _Run:
    def __init__(self, config: CalibrationConfig) -> None:
        self.c = config
        self.out = Path(config.out)
        self.notes: list[str] = []

    def say(self, text: str) -> None:
        if self.c.show_progress:
            print(f"iwarp calibrate: {text}", file=sys.stderr, flush=True)

    # -- steps --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.c
        t_start = time.perf_counter()
        if c.frames < cdata.MIN_FRAMES:
            raise InputError(
                f"--frames {c.frames} is too few to calibrate",
                f"use at least {cdata.MIN_FRAMES} frames (512 is a good default)",
            )
        if c.eval_frames < 1 or c.sources_per_avatar < 1:
            raise InputError("need at least 1 evaluation frame and 1 source per avatar")
        self.split = self.check_split()  # bad folders and splits fail before any export
        quantizer, why = qz.choose_quantizer(c.quantizer, c.mode)
        method = c.method or qz.DEFAULT_METHOD[quantizer][c.mode]
        self.say(f"{c.mode} with {quantizer} ({why}), calibration method {method}")
        self.threads = c.threads or physical_cores()

        from iwarp.checkpoint import Checkpoint, file_sha256
        from iwarp.paths import DEFAULT_CHECKPOINT

        ckpt_path = Path(c.checkpoint) if c.checkpoint else DEFAULT_CHECKPOINT
        ckpt = Checkpoint(ckpt_path)
        sha = file_sha256(ckpt_path)
        size = ckpt.config.model.image_size
        onnx_dir = self.fp32_graphs(ckpt_path, sha, ckpt.config)
        fp32 = {g: ev.session(onnx_dir / f"{g}.onnx", self.threads) for g in GRAPHS}

        data = self.calibration_data(sha, size, fp32)
        calib, evals = data.calib, data.eval
        self.say(
            f"{len(calib)} calibration frames, {len(evals)} evaluation frames "
            f"({data.meta['eval_source']})"
        )
        reference = ev.reference_outputs(fp32, evals)
        feeds = {
            "keypoints": qz.FeedReader(calib.keypoint_feeds()),
            "source_encoder": qz.FeedReader(calib.source_feeds(limit=max(c.frames, 16))),
            "animator": qz.FeedReader(calib.animator_feeds()),
        }
        staging = Path(tempfile.mkdtemp(prefix=f".{c.mode}-", dir=self.out))
        try:
            exclusions, trials, how = self.choose_exclusions(
                onnx_dir, staging, calib, evals, fp32, reference, quantizer, method, size
            )
            results = {}
            for i, graph in enumerate(GRAPHS, 1):
                self.say(
                    f"[{i}/3] quantizing {graph} on {len(feeds[graph])} inputs"
                    + (f", FP32: {', '.join(exclusions[graph])}" if exclusions[graph] else "")
                )
                results[graph] = qz.quantize_graph(
                    onnx_dir / f"{graph}.onnx",
                    staging / f"{graph}.onnx",
                    graph,
                    feeds[graph],
                    c.mode,
                    quantizer,
                    exclusions[graph],
                    method,
                    show_progress=c.show_progress,
                )
                self.say(f"      {graph}: {results[graph].seconds:.0f} s")
            emulate = c.mode == "fp8"
            qsessions = {
                g: ev.session(staging / f"{g}.onnx", self.threads, emulate) for g in GRAPHS
            }
            self.say("evaluating against FP32")
            qout = ev.run_variant(qsessions, evals, fp32)
            perceptual, perceptual_note = ev.perceptual_or_none()
            accuracy = {g: ev.graph_metrics(g, qout, reference, size) for g in GRAPHS}
            accuracy["end_to_end"] = ev.end_to_end_metrics(qout, reference, evals, perceptual)
            fp16 = self.fp16_variant(onnx_dir, evals, fp32, reference, perceptual, size)
            fp16.pop("_sessions", None)
            latency = self.latency(fp32, qsessions, evals)
            gate = self.gate(accuracy)
            target = self.out / (c.mode if gate["passed"] else f"{c.mode}.rejected")
            grid, grid_note = self.grid(evals, reference, qout, fp16.pop("_outputs", None))
            report = {
                "format": REPORT_FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "iwarp_version": iwarp.__version__,
                "checkpoint": str(ckpt_path),
                "checkpoint_sha256": sha,
                "image_size": size,
                "mode": c.mode,
                "quantizer": {
                    "name": quantizer,
                    "why": why,
                    "method": method,
                    "modelopt": qz.modelopt_status()[1],
                    "high_precision": "fp32",
                },
                "data": self.data_summary(data),
                "exclusions": {
                    "how": how,
                    "chosen": {g: list(v) for g, v in exclusions.items()},
                    "trials": trials,
                    "score_note": _SCORE_NOTES,
                    "groups": {g: qz.describe_groups(g) for g in GRAPHS},
                },
                "accuracy": accuracy,
                "perceptual": perceptual_note,
                "fp16": fp16,
                "graphs": self.graph_info(onnx_dir, staging, results),
                "latency": latency,
                "gate": gate,
                "config": _config_dict(c),
                "outputs": {
                    "graphs_dir": str(target),
                    "grid": str(grid) if grid else None,
                    "grid_note": grid_note,
                    "json": str(self.out / "calibration.json"),
                    "markdown": str(self.out / "calibration.md"),
                    "cache": str(self.cache_path),
                },
                "notes": self.notes,
                "seconds": round(time.perf_counter() - t_start, 1),
            }
            self.publish(staging, target, onnx_dir, report, results)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if getattr(self, "_fp16_dir", None) is not None:
                shutil.rmtree(self._fp16_dir, ignore_errors=True)
        rep.write_json(self.out / "calibration.json", report)
        rep.write_markdown(self.out / "calibration.md", report)
        self.say(f"report: {self.out / 'calibration.md'}")
        if not gate["passed"]:
            failed = [ch for ch in gate["checks"] if not ch["passed"]]
            shown = "; ".join(
                f"{ch['name']} {ch['value']:.3g} (needs {ch['op']} {ch['threshold']})"
                for ch in failed
            )
            raise CalibrationGateError(
                f"{c.mode} graphs fail the accuracy gate: {shown}",
                f"see {self.out / 'calibration.md'}; graphs left in {target}",
            )
        return report

    def fp32_graphs(self, ckpt_path: Path, sha: str, config: Any) -> Path:
        """The plain graphs of this checkpoint: --onnx, OUT/onnx or OUT; exported if absent."""
        from iwarp.engine_build.export import METADATA, check_build, export_onnx

        if self.c.onnx_dir is not None:
            candidates = [Path(self.c.onnx_dir)]
        else:
            candidates = [self.out / "onnx", self.out]
        found = next((d for d in candidates if (d / METADATA).is_file()), None)
        if found is None:
            target = candidates[0]
            self.say(f"exporting the FP32 graphs of {ckpt_path} to {target}")
            export_onnx(ckpt_path, target, show_progress=self.c.show_progress)
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
        self.say(f"FP32 graphs: {found}")
        return found

    def calibration_data(self, sha: str, size: int, fp32: dict[str, Any]) -> cdata.CalibrationData:
        """The cache when it matches; else frames from the clips, annotated by the FP32 graphs."""
        c = self.c
        self.cache_path = Path(c.cache) if c.cache else self.out / "calibration_cache.npz"
        split = self.split
        spec = cdata.cache_spec(
            c.data,
            split,
            c.eval_split,
            c.frames,
            c.eval_frames,
            c.sources_per_avatar,
            size,
            c.seed,
        )
        cached = None
        if self.cache_path.is_file():
            try:
                cached = cdata.load_cache(self.cache_path)
            except InputError as exc:
                self.say(f"ignoring the cache: {exc}")
        if cached is not None:
            frame_issues = cdata.frame_problems(cached, spec)
            if not frame_issues and cached.checkpoint_sha256 == sha:
                self.say(f"reusing {self.cache_path}")
                return cached
            if not frame_issues:
                self.say("the checkpoint changed: recomputing keypoints and avatar rows")
                calib = cdata.strip_annotations(cached.calib)
                evals = cdata.strip_annotations(cached.eval)
                meta = {**cached.meta, "checkpoint_sha256": sha}
                return self.annotate_and_save(meta, calib, evals, fp32)
            self.say(f"the cache is for other frames ({'; '.join(frame_issues[:3])})")
        clips = cdata.load_clips(c.data, split, size, c.clip_cache, c.show_progress)
        calib = cdata.sample_frames(clips, c.frames, c.sources_per_avatar, c.seed)
        eval_source, evals = self.eval_frames(clips, calib, split, size)
        meta = {
            **spec,
            "checkpoint_sha256": sha,
            "eval_source": eval_source,
            "calib_clips": calib.clips,
            "eval_clips": evals.clips,
        }
        return self.annotate_and_save(meta, calib, evals, fp32)

    def check_split(self) -> str | None:
        from iwarp.train.data import find_clips

        c = self.c
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

    def eval_frames(
        self, clips: list[cdata.ClipFrames], calib: cdata.FrameSet, split: str | None, size: int
    ) -> tuple[str, cdata.FrameSet]:
        """Frames of the val clips; held-out frames of the calibration clips without any."""
        from iwarp.train.data import find_clips

        c = self.c
        entries = find_clips(c.data, None)
        has_manifest = (Path(c.data) / "manifest.csv").is_file()
        if has_manifest and c.eval_split != split and any(e.split == c.eval_split for e in entries):
            val = cdata.load_clips(c.data, c.eval_split, size, c.clip_cache, c.show_progress)
            fs = cdata.sample_frames(
                val,
                c.eval_frames,
                c.sources_per_avatar,
                c.seed + 1,
                min_frames=1,
                what="evaluation",
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
        self.notes.append(note)
        self.say(note)
        return f"held-out frames of the calibration clips ({why})", fs

    def annotate_and_save(
        self,
        meta: dict[str, Any],
        calib: cdata.FrameSet,
        evals: cdata.FrameSet,
        fp32: dict[str, Any],
    ) -> cdata.CalibrationData:
        self.say("running the FP32 graphs on the frames (keypoints, avatar rows)")
        cdata.annotate(calib, fp32, show_progress=self.c.show_progress, label="(calibration)")
        cdata.annotate(evals, fp32, show_progress=self.c.show_progress, label="(evaluation)")
        data = cdata.CalibrationData(meta, calib, evals)
        cdata.save_cache(self.cache_path, data)
        self.say(f"saved {self.cache_path}")
        return data

    # -- exclusions -----------------------------------------------------------------------
    def choose_exclusions(
        self,
        onnx_dir: Path,
        staging: Path,
        calib: cdata.FrameSet,
        evals: cdata.FrameSet,
        fp32: dict[str, Any],
        reference: ev.Outputs,
        quantizer: str,
        method: str,
        size: int,
    ) -> tuple[dict[str, tuple[str, ...]], dict[str, list[dict[str, Any]]], str]:
        c = self.c
        spec = c.exclusions.strip()
        if spec == "none":
            return {g: () for g in GRAPHS}, {}, "none (--exclude none)"
        if spec == "default":
            chosen = dict(DEFAULT_EXCLUSIONS[quantizer])
            return chosen, {}, f"the defaults measured for {quantizer} (--exclude default)"
        if spec != "auto":
            return _parse_exclusions(spec), {}, f"given: {spec}"
        sub = calib.subset(c.search_frames)
        feeds = {
            "keypoints": qz.FeedReader(sub.keypoint_feeds()),
            "source_encoder": qz.FeedReader(sub.source_feeds(limit=c.search_frames)),
            "animator": qz.FeedReader(sub.animator_feeds()),
        }
        emulate = c.mode == "fp8"
        chosen: dict[str, tuple[str, ...]] = {}
        trials: dict[str, list[dict[str, Any]]] = {}
        import onnx

        for graph in GRAPHS:
            src = onnx_dir / f"{graph}.onnx"
            model = onnx.load(str(src), load_external_data=False)
            path = staging / f"search_{graph}.onnx"

            def trial(exclude: tuple[str, ...], graph=graph, path=path, src=src):
                r = qz.quantize_graph(
                    src, path, graph, feeds[graph], c.mode, quantizer, exclude, method, False
                )
                sess = ev.session(path, self.threads, emulate)
                out = ev.run_graph(graph, sess, evals, fp32)
                metrics = ev.graph_metrics(graph, out, reference, size)
                return ev.score(graph, metrics), metrics, r, onnx.load(str(path))

            self.say(f"searching FP32 layers for {graph} on {len(feeds[graph])} inputs")
            base_score, base_metrics, _, base_model = trial(())
            rows = [{"exclude": [], "score": base_score, "gain": 0.0, "metrics": base_metrics}]
            quantized = _quantized_nodes(base_model)
            good = []
            for g in qz.GROUPS[graph]:
                nodes = qz.group_nodes(model, [g])
                if not nodes:
                    rows.append({"exclude": [g.name], "note": "matches no node of this graph"})
                    continue
                if not quantized.intersection(nodes):
                    rows.append(
                        {"exclude": [g.name], "note": f"already FP32 ({quantizer} leaves it)"}
                    )
                    continue
                try:
                    s, m, _, _ = trial((g.name,))
                except qz.UnloadableGraphError as exc:
                    rows.append({"exclude": [g.name], "note": f"not usable: {exc.message}"})
                    self.say(f"      {graph} without {g.name}: not usable ({exc.message})")
                    continue
                gain = s - base_score
                rows.append({"exclude": [g.name], "score": s, "gain": gain, "metrics": m})
                self.say(f"      {graph} without {g.name}: gain {gain:+.3f}")
                if self.pays(graph, gain, base_score):
                    good.append((gain, g.name))
            picked = tuple(name for _, name in sorted(good, reverse=True))
            if len(picked) > 1:
                try:
                    s, m, _, _ = trial(picked)
                except qz.UnloadableGraphError as exc:  # keep the best single exclusion
                    s, m = -float("inf"), {"error": exc.message}
                rows.append(
                    {"exclude": list(picked), "score": s, "gain": s - base_score, "metrics": m}
                )
                best_single = max(good)
                if s < base_score + best_single[0]:  # the combination is no better: keep one
                    picked = (best_single[1],)
                    rows[-1]["note"] = f"no better than {best_single[1]} alone: kept that"
            chosen[graph] = picked
            trials[graph] = rows
        how = (
            f"measured: each group excluded alone on {len(sub)} calibration frames, kept when "
            f"it gains >= {c.min_gain_db} dB (keypoints: cuts the error by "
            f">= {c.min_gain_fraction:.0%})"
        )
        return chosen, trials, how

    def pays(self, graph: str, gain: float, base: float) -> bool:
        if graph == "keypoints":  # score = -error in px
            return gain >= self.c.min_gain_fraction * abs(base) and gain > 0
        return gain >= self.c.min_gain_db

    # -- comparisons -------------------------------------------------------------------------
    def fp16_variant(
        self,
        onnx_dir: Path,
        evals: cdata.FrameSet,
        fp32: dict[str, Any],
        reference: ev.Outputs,
        perceptual: ev.PerceptualDistance | None,
        size: int,
    ) -> dict[str, Any]:
        if not self.c.fp16:
            return {"available": False, "why": "not requested (--no-fp16)"}
        folder = Path(tempfile.mkdtemp(prefix=".fp16-", dir=self.out))
        try:
            method = None
            try:
                from iwarp.engine_build.tensorrt_build import convert_fp16
            except Exception:  # that module is optional here; convert directly
                convert_fp16 = None
            for g in GRAPHS:
                if convert_fp16 is not None:
                    method = convert_fp16(onnx_dir / f"{g}.onnx", folder / f"{g}.onnx").method
                else:
                    method = _onnxconverter_fp16(onnx_dir / f"{g}.onnx", folder / f"{g}.onnx")
            sessions = {g: ev.session(folder / f"{g}.onnx", self.threads) for g in GRAPHS}
            out = ev.run_variant(sessions, evals, fp32)
        except Exception as exc:  # any failure only costs the FP16 column
            shutil.rmtree(folder, ignore_errors=True)
            return {
                "available": False,
                "why": f"FP16 conversion failed: {type(exc).__name__}: {exc}",
            }
        accuracy = {g: ev.graph_metrics(g, out, reference, size) for g in GRAPHS}
        accuracy["end_to_end"] = ev.end_to_end_metrics(out, reference, evals, perceptual)
        self._fp16_dir = folder
        return {
            "available": True,
            "method": method,
            "note": "FP16 graphs as `iwarp build --precision fp16` makes them, run by ONNX "
            "Runtime on the CPU (for accuracy; its CPU kernels are FP32)",
            "accuracy": accuracy,
            "_sessions": sessions,
            "_outputs": out,
        }

    def latency(
        self,
        fp32: dict[str, Any],
        quant: dict[str, Any],
        evals: cdata.FrameSet,
    ) -> dict[str, Any]:
        c = self.c
        base = {
            "threads": self.threads,
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
        self.say(f"timing FP32 vs {c.mode.upper()} ({self.threads} thread(s))")
        variants = {"fp32": fp32, c.mode: quant}
        ms = ev.measure_latency(variants, evals, c.timing_runs, c.timing_warmup)
        return {
            **base,
            "ms": ms,
            "variants": list(variants),
            "note": "Timings on a shared machine are noisy: compare variants of one run only.",
        }

    def gate(self, accuracy: dict[str, Any]) -> dict[str, Any]:
        g = self.c.gate
        checks = [
            ("animator PSNR vs FP32 (dB)", accuracy["animator"]["psnr_db"], ">=",
             g.min_animator_psnr_db),
            ("keypoints mean abs error (px)", accuracy["keypoints"]["keypoint_mae_px"], "<=",
             g.max_keypoint_error_px),
            ("source_encoder: animator PSNR on its rows (dB)",
             accuracy["source_encoder"].get("animator_psnr_db"), ">=", g.min_source_psnr_db),
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
        return {
            "passed": all(ch["passed"] for ch in out),
            "checks": out,
            "thresholds": asdict(g),
        }

    def grid(
        self,
        evals: cdata.FrameSet,
        reference: ev.Outputs,
        quant: ev.Outputs,
        fp16: ev.Outputs | None,
    ) -> tuple[Path | None, str]:
        n = min(self.c.grid_frames, len(evals))
        if n <= 0:
            return None, ""
        rows = np.unique(np.linspace(0, len(evals) - 1, n).round().astype(int))
        source = np.stack([evals.sources[evals.avatar[i], 0] for i in rows])
        columns = [("source", source), ("driving", evals.driving[rows])]
        columns.append(("FP32", rep.to_uint8(reference.image_e2e[rows])))
        if fp16 is not None:
            columns.append(("FP16", rep.to_uint8(fp16.image_e2e[rows])))
        columns.append((self.c.mode.upper(), rep.to_uint8(quant.image_e2e[rows])))
        labels = [f"{ev.psnr(quant.image_e2e[i], reference.image_e2e[i]):.1f} dB" for i in rows]
        note = f"end to end on evaluation frames; label: {self.c.mode.upper()} PSNR vs FP32" + (
            "" if fp16 is not None else "; no FP16 column (see the report)"
        )
        path = rep.write_grid(self.out / "calibration_grid.png", columns, labels, note)
        return path, note

    # -- outputs --------------------------------------------------------------------------
    def graph_info(
        self, onnx_dir: Path, staging: Path, results: dict[str, qz.QuantizeResult]
    ) -> dict[str, Any]:
        info = {}
        for g in GRAPHS:
            info[g] = {
                **results[g].to_dict(),
                "bytes": (staging / f"{g}.onnx").stat().st_size,
                "fp32_bytes": (onnx_dir / f"{g}.onnx").stat().st_size,
            }
        return info

    def data_summary(self, data: cdata.CalibrationData) -> dict[str, Any]:
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
            "cache": str(self.cache_path),
        }

    def publish(
        self,
        staging: Path,
        target: Path,
        onnx_dir: Path,
        report: dict[str, Any],
        results: dict[str, qz.QuantizeResult],
    ) -> None:
        """Moves the graphs to OUT/<mode>/ (or .rejected) with their metadata.json, last."""
        import hashlib

        from iwarp.engine_build.export import METADATA, load_metadata

        meta = load_metadata(onnx_dir)
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
                "precision": self.c.mode,
                "source_onnx": str(onnx_dir),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "quantizer": report["quantizer"],
                "exclusions": report["exclusions"]["chosen"],
                "calibration": {
                    "frames": report["data"]["frames"],
                    "folder": report["data"]["folder"],
                    "split": report["data"]["split"],
                    "report": str(self.out / "calibration.json"),
                },
                "gate": {"passed": report["gate"]["passed"], "checks": report["gate"]["checks"]},
            }
        )
        name = METADATA if report["gate"]["passed"] else "metadata.rejected.json"
        tmp = target / (name + ".tmp")
        tmp.write_text(json.dumps(rep._jsonable(meta), indent=2) + "\n")
        os.replace(tmp, target / name)


_SCORE_NOTES = {
    "keypoints": "score = -(keypoint mean abs error in px); higher is better",
    "source_encoder": "score = PSNR (dB) of the FP32 animator fed this graph's avatar rows",
    "animator": "score = PSNR (dB) of the animator's output vs FP32, on FP32 inputs",
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


def _onnxconverter_fp16(src: Path, dst: Path) -> str:
    import warnings

    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(dst))
    return "onnxconverter-common"


def _config_dict(c: CalibrationConfig) -> dict[str, Any]:
    d = asdict(c)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
