"""The `iwarp` command: dispatch only. Each subcommand's options are the fields of one
dataclass next to the function it configures (iwarp.options builds argparse from it, and the
dataclass back from the parsed arguments); the handlers here call that function and print.

User mistakes (IwarpError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from iwarp.errors import IwarpError
from iwarp.options import CommandParser, from_args

Handler = Callable[[Any], int]


def _cmd_info(o: Any) -> int:
    from iwarp.model.stats import model_stats

    stats = model_stats(o.config, o.size, o.sources)
    if o.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"config {stats['config']} at {stats['size']}x{stats['size']}")
    print(f"  parameters            {stats['parameters'] / 1e6:.3f} M")
    for name, count in stats["parameters_by_module"].items():
        print(f"    {name:<20s}{count / 1e6:.3f} M")
    print(f"  GFLOP per source image  {stats['gflop_per_source']:.3f}")
    print(f"  GFLOP per driving frame {stats['gflop_per_frame']:.3f} ({o.sources} source(s))")
    for name, g in stats["gflop_per_frame_by_stage"].items():
        print(f"    {name:<20s}{g:.3f}")
    print(f"  attention tokens        {stats['query_tokens']} queries x {stats['key_tokens']} keys")
    return 0


def _cmd_train(o: Any) -> int:
    from iwarp.train.trainer import train

    last = train(
        o.to_config(),
        o.data,
        o.out,
        o.steps,
        resume=o.resume,
        device=o.device,
        init_checkpoint=o.init,
        cache_dir=o.cache,
        stills=o.stills,
    )
    print(json.dumps(last))
    return 0


def _cmd_animate(o: Any) -> int:
    from iwarp.offline import animate_video, default_driving_clip
    from iwarp.paths import DEFAULT_AVATAR

    sources = o.sources or [DEFAULT_AVATAR]
    driving = o.driving or default_driving_clip()
    written = animate_video(
        **{**dataclasses.asdict(o), "sources": sources, "driving": driving},
    )
    print(
        f"wrote {written} frames to {o.out} (avatar: {', '.join(map(str, sources))}; "
        f"driving: {driving})"
    )
    return 0


def _cmd_bench(o: Any) -> int:
    if o.webrtc:
        return _bench_webrtc(o)
    from iwarp.runtime.benchmark import bench_engines, comparison_table, plot_comparison
    from iwarp.system import isa_features, machine_label, physical_cores

    if not o.json:
        isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa_features().items())
        print(f"CPU: {machine_label()}; {o.threads or physical_cores()} threads")
        print(f"ISA: {isa}")

    def show(r: dict) -> None:
        if o.size is not None and r["size"] != o.size:
            raise IwarpError(
                f"the checkpoint is for {r['size']}x{r['size']}, not {o.size}",
                "leave out --size or pass a checkpoint trained for that size",
            )
        if o.json:
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}))
            return
        f, g, raw = r["frame_ms"], r["graphs_in_pipeline"], r["raw_graphs"]
        st = "  ".join(f"{k} {v['p50_ms']:.1f}" for k, v in r["stages"].items())
        print(
            f"{r['backend']} {r['precision']} ({r['backend_detail']}), {r['sources']} src: "
            f"frame p50 {f['p50']:.1f} / p95 {f['p95']:.1f} / p99 {f['p99']:.1f} ms, "
            f"{r['fps']:.1f} fps\n  stages p50 ms: {st}; avatar {r['avatar_ms']:.0f} ms\n"
            f"  graphs p50 ms in the pipeline / alone: keypoints "
            f"{g.get('keypoints_p50_ms', 0):.1f} / {raw.get('keypoints_p50_ms', 0):.1f}, "
            f"animator {g.get('animator_p50_ms', 0):.1f} / {raw.get('animator_p50_ms', 0):.1f}"
            f"; pipeline overhead p50 {r['overhead_ms'].get('p50', 0):.1f} ms"
        )

    results = bench_engines(
        [b.strip() for b in o.backend.split(",") if b.strip()],
        o.sources,
        o.frames,
        o.clip,
        o.checkpoint,
        o.threads,
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


def _cmd_eval(o: Any) -> int:
    from iwarp.checkpoint import load_network
    from iwarp.evaluation.protocol import evaluate, load_eval_clips
    from iwarp.evaluation.report import (
        markdown_table,
        plot_metrics_vs_sources,
        save_cross_grid,
        save_grids,
        temporal_summary,
    )

    net, ckpt = load_network(o.checkpoint)
    settings = o.settings
    size = settings.image_size or net.config.image_size
    clips = load_eval_clips(o.data, settings.split, size, show_progress=not o.quiet)
    if o.max_clips:
        clips = clips[: o.max_clips]
    run = evaluate(net, clips, settings, show_progress=not o.quiet)
    report = {
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256(),
        "checkpoint_step": ckpt.step,
        "config": ckpt.config.name,
        "model": {
            "residual_branch": net.config.residual_branch,
            "extra_tokens": net.config.extra_tokens,
            "pixel_skip": net.config.pixel_skip,
        },
        "data": str(o.data),
        **run.report,
    }
    if o.json:
        Path(o.json).parent.mkdir(parents=True, exist_ok=True)
        Path(o.json).write_text(json.dumps(report, indent=2))
    if o.grid:
        for path in save_grids(o.grid, run.pictures):
            print(f"wrote {path}", file=sys.stderr)
        if run.cross_pictures:
            cross = Path(o.grid).with_name(Path(o.grid).stem + "_cross_identity.png")
            print(f"wrote {save_cross_grid(cross, run.cross_pictures)}", file=sys.stderr)
    if o.plot:
        title = f"{Path(ckpt.path).name}, {settings.split or 'all'} split, {size}x{size}"
        print(f"wrote {plot_metrics_vs_sources(report, o.plot, title)}", file=sys.stderr)
    print(markdown_table(report))
    for line in temporal_summary(report):
        print(line)
    for r in report["cross_identity"]["results"]:
        print(
            f"cross-identity {r['mode']:<13s} identity cos {r['identity']:.3f}, "
            f"distance {r['identity_distance']:.3f}, same person {r['same_person_rate']:.2f}"
        )
    return 0


def _cmd_cam(o: Any) -> int:
    from iwarp.cam.app import run_cam

    summary = run_cam(o)
    if o.stats:
        print(json.dumps(summary))
    return 0


def _cmd_export(o: Any) -> int:
    from iwarp.engine_build.export import export_onnx

    meta = export_onnx(o.checkpoint, o.out, o.opset, check=o.check)
    errors = {g: info["max_abs_error"] for g, info in meta["graphs"].items()}
    print(json.dumps({"out": str(o.out), "opset": meta["opset"], "max_abs_error": errors}))
    return 0


def _cmd_calibrate(o: Any) -> int:
    from iwarp.calibration import calibrate

    if o.threads:
        import torch

        torch.set_num_threads(o.threads)
    report = calibrate(o)
    summary = {
        "out": report["outputs"]["graphs_dir"],
        "mode": report["mode"],
        "quantizer": report["quantizer"]["name"],
        "exclusions": report["exclusions"]["chosen"],
        "gate": report["gate"]["passed"],
        "animator_psnr_db": report["accuracy"]["animator"]["psnr_db"],
        "end_to_end_psnr_db": report["accuracy"]["end_to_end"]["psnr_db"],
        "report": report["outputs"]["markdown"],
    }
    print(json.dumps(summary))
    return 0


def _cmd_serve(o: Any) -> int:
    from iwarp.streaming.server import serve

    return serve(**dataclasses.asdict(o))


def _bench_webrtc(o: Any) -> int:
    from iwarp.benchmarks.webrtc import WebrtcOptions, run_options

    shared = {f.name for f in dataclasses.fields(WebrtcOptions)} & set(vars(o))
    webrtc = WebrtcOptions(**{name: getattr(o, name) for name in shared})
    webrtc.size = o.size or 256
    return run_options(webrtc)


def _cmd_build(o: Any) -> int:
    from iwarp.engine_build.tensorrt_build import build_engines

    kwargs = dataclasses.asdict(o)
    show_json = kwargs.pop("json")
    results = build_engines(**kwargs, show_progress=not show_json)
    if show_json:
        print(json.dumps(results, indent=2))
    return 0


def _cmd_build_plugin(o: Any) -> int:
    from iwarp.engine_build.plugin import build_plugin

    result = build_plugin(**dataclasses.asdict(o))
    what = result.library or result.kernels
    print(f"built {what} in {result.seconds:.0f} s (CUDA architectures {result.cuda_archs})")
    return 0


def _declared(where: str) -> Callable[[], type]:
    """'module:Class' -> a function importing it (when its subcommand is parsed)."""
    module, _, name = where.partition(":")
    return lambda: getattr(importlib.import_module(module), name)


# name: (help, options dataclass, handler). The dataclass declares every option (iwarp.options).
COMMANDS: dict[str, tuple[str, str, Handler]] = {
    "info": ("parameters and GFLOP of a config", "iwarp.model.stats:InfoOptions", _cmd_info),
    "train": (
        "train the network on a folder of clips",
        "iwarp.train.trainer:TrainOptions",
        _cmd_train,
    ),
    "animate": (
        "animate source photo(s) with a driving video",
        "iwarp.offline:AnimateOptions",
        _cmd_animate,
    ),
    "bench": (
        "per-stage latency of the runtime on real frames",
        "iwarp.runtime.benchmark:BenchOptions",
        _cmd_bench,
    ),
    "eval": (
        "quality metrics on real clips, with baselines",
        "iwarp.evaluation.protocol:EvalOptions",
        _cmd_eval,
    ),
    "cam": (
        "the avatar as a camera for call apps (virtual camera)",
        "iwarp.cam.app:CamSettings",
        _cmd_cam,
    ),
    "export": (
        "export the ONNX graphs (keypoints, sources, animator)",
        "iwarp.engine_build.export:ExportOptions",
        _cmd_export,
    ),
    "calibrate": (
        "INT8/FP8 quantization of the graphs from real frames",
        "iwarp.calibration.pipeline:CalibrationConfig",
        _cmd_calibrate,
    ),
    "serve": (
        "WebRTC server: webcam in, animated avatar out",
        "iwarp.streaming.server:ServeOptions",
        _cmd_serve,
    ),
    "build": (
        "TensorRT engines (GPU, TensorRT 11)",
        "iwarp.engine_build.tensorrt_build:BuildOptions",
        _cmd_build,
    ),
    "build-plugin": (
        "compile the attention kernel and plugin",
        "iwarp.engine_build.plugin:BuildPluginOptions",
        _cmd_build_plugin,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwarp", description="Real-time avatar animation with implicit warping."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for name, (help_text, where, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, declare=_declared(where))
        p.set_defaults(handler=handler, declared_in=where)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = from_args(_declared(args.declared_in)(), args)  # imported by the parse
    try:
        return args.handler(options)
    except IwarpError as exc:
        print(f"iwarp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iwarp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
