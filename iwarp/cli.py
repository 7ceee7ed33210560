"""The `iwarp` command. Thin: parse arguments, call one function per subcommand.

User mistakes (IwarpError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from iwarp.errors import IwarpError

Handler = Callable[[argparse.Namespace], int]


def _cmd_info(args: argparse.Namespace) -> int:
    from iwarp.model.stats import model_stats

    stats = model_stats(args.config, args.size, args.sources)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"config {stats['config']} at {stats['size']}x{stats['size']}")
    print(f"  parameters            {stats['parameters'] / 1e6:.3f} M")
    for name, count in stats["parameters_by_module"].items():
        print(f"    {name:<20s}{count / 1e6:.3f} M")
    print(f"  GFLOP per source image  {stats['gflop_per_source']:.3f}")
    print(f"  GFLOP per driving frame {stats['gflop_per_frame']:.3f} ({args.sources} source(s))")
    for name, g in stats["gflop_per_frame_by_stage"].items():
        print(f"    {name:<20s}{g:.3f}")
    print(f"  attention tokens        {stats['query_tokens']} queries x {stats['key_tokens']} keys")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from iwarp.config import get_config
    from iwarp.train.trainer import train

    config = get_config(args.config)
    tc = config.train
    for name in ("batch_size", "lr", "seed", "max_sources"):
        if getattr(args, name) is not None:
            setattr(tc, name, getattr(args, name))
    if args.size is not None:
        tc.train_size = args.size
    if args.bf16:
        tc.bf16 = True
    for spec in args.loss or []:
        key, _, value = spec.partition("=")
        if not hasattr(tc.loss, key):
            raise IwarpError(f"unknown loss {key!r}", f"choose from {sorted(vars(tc.loss))}")
        setattr(tc.loss, key, float(value))
    for flag in ("sample_every", "checkpoint_every", "val_every", "log_every"):
        if getattr(args, flag) is not None:
            setattr(tc, flag, getattr(args, flag))
    if args.no_residual:
        config.model.residual_branch = False
    if args.extra_tokens is not None:
        config.model.extra_tokens = args.extra_tokens
    last = train(
        config,
        args.data,
        args.out,
        args.steps,
        resume=args.resume,
        device=args.device,
        init_checkpoint=args.init,
        cache_dir=args.cache,
    )
    print(json.dumps(last))
    return 0


def _cmd_animate(args: argparse.Namespace) -> int:
    from iwarp.offline import animate_video, default_driving_clip
    from iwarp.paths import DEFAULT_AVATAR

    sources = args.source or [DEFAULT_AVATAR]
    driving = args.driving or default_driving_clip()
    written = animate_video(
        sources=sources,
        driving=driving,
        out=args.out,
        checkpoint=args.checkpoint,
        relative=args.relative,
        reference_frame=args.reference_frame,
        max_frames=args.max_frames,
        backend=args.backend,
    )
    print(
        f"wrote {written} frames to {args.out} (avatar: {', '.join(map(str, sources))}; "
        f"driving: {driving})"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.webrtc:
        return _bench_webrtc(args)
    from iwarp.runtime.benchmark import bench_engines, comparison_table, plot_comparison
    from iwarp.system import isa_features, machine_label, physical_cores

    if not args.json:
        isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa_features().items())
        print(f"CPU: {machine_label()}; {args.threads or physical_cores()} threads")
        print(f"ISA: {isa}")

    def show(r: dict) -> None:
        if args.size is not None and r["size"] != args.size:
            raise IwarpError(
                f"the checkpoint is for {r['size']}x{r['size']}, not {args.size}",
                "leave out --size or pass a checkpoint trained for that size",
            )
        if args.json:
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
        [b.strip() for b in args.backend.split(",") if b.strip()],
        args.sources,
        args.frames,
        args.clip,
        args.checkpoint,
        args.threads,
        precision=args.precision,
        accuracy_frames=args.accuracy_frames,
        show_progress=not args.json,
        on_result=show,
    )
    if not args.json:
        print()
        print(comparison_table(results))
    if args.plot:
        plot_comparison(results, args.plot)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from iwarp.checkpoint import load_network
    from iwarp.evaluation.protocol import EvalSettings, evaluate, load_eval_clips
    from iwarp.evaluation.report import (
        markdown_table,
        plot_metrics_vs_sources,
        save_cross_grid,
        save_grids,
    )

    net, ckpt = load_network(args.checkpoint)
    settings = EvalSettings(
        sources=tuple(int(n) for n in args.sources.split(",")),
        targets_per_clip=args.targets,
        split=args.split or None,
        image_size=args.size,
        cross_identity=not args.no_cross_identity,
    )
    size = settings.image_size or net.config.image_size
    clips = load_eval_clips(args.data, settings.split, size, show_progress=not args.quiet)
    if args.max_clips:
        clips = clips[: args.max_clips]
    run = evaluate(net, clips, settings, show_progress=not args.quiet)
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
        "data": str(args.data),
        **run.report,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.grid:
        for path in save_grids(args.grid, run.pictures):
            print(f"wrote {path}", file=sys.stderr)
        if run.cross_pictures:
            cross = Path(args.grid).with_name(Path(args.grid).stem + "_cross_identity.png")
            print(f"wrote {save_cross_grid(cross, run.cross_pictures)}", file=sys.stderr)
    if args.plot:
        title = f"{Path(ckpt.path).name}, {args.split or 'all'} split, {size}x{size}"
        print(f"wrote {plot_metrics_vs_sources(report, args.plot, title)}", file=sys.stderr)
    print(markdown_table(report))
    for r in report["cross_identity"]["results"]:
        print(
            f"cross-identity {r['mode']:<13s} identity cos {r['identity']:.3f}, "
            f"distance {r['identity_distance']:.3f}, same person {r['same_person_rate']:.2f}"
        )
    return 0


def _cmd_cam(args: argparse.Namespace) -> int:
    import os

    from iwarp.cam.app import CamSettings, run_cam

    settings = CamSettings(
        avatars=[spec.split(",") for spec in args.avatar or []],
        camera=args.camera,
        server=args.server,
        token=args.token or os.environ.get("IWARP_TOKEN"),
        sink=args.sink,
        size=args.size,
        fps=args.fps,
        backend=args.backend,
        checkpoint=args.checkpoint,
        threads=args.threads,
        control_port=args.control_port,
        stats=args.stats,
        stats_json=args.stats_json,
        loop=args.loop,
        lossless=args.lossless,
        steady_file=args.steady,
        seconds=args.seconds,
        connect_timeout=args.connect_timeout,
    )
    summary = run_cam(settings)
    if args.stats:
        print(json.dumps(summary))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from iwarp.engine_build.export import export_onnx

    meta = export_onnx(args.checkpoint, args.out, args.opset, check=not args.no_check)
    errors = {g: info["max_abs_error"] for g, info in meta["graphs"].items()}
    print(json.dumps({"out": str(args.out), "opset": meta["opset"], "max_abs_error": errors}))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from iwarp.calibration import CalibrationConfig, GateThresholds, calibrate

    gate = GateThresholds()
    for name in ("min_animator_psnr_db", "max_keypoint_error_px", "min_source_psnr_db"):
        if getattr(args, name) is not None:
            setattr(gate, name, getattr(args, name))
    if args.min_end_to_end_psnr_db is not None:
        gate.min_end_to_end_psnr_db = args.min_end_to_end_psnr_db
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = calibrate(
        CalibrationConfig(
            data=args.data,
            out=args.out,
            mode=args.mode,
            split=args.split or None,
            frames=args.frames,
            eval_frames=args.eval_frames,
            sources_per_avatar=args.sources,
            checkpoint=args.checkpoint,
            onnx_dir=args.onnx,
            quantizer=args.quantizer,
            method=args.method,
            exclusions=args.exclude,
            search_frames=args.search_frames,
            threads=args.threads,
            timing_runs=args.timing_runs,
            seed=args.seed,
            cache=args.cache,
            clip_cache=args.clip_cache,
            fp16=not args.no_fp16,
            gate=gate,
            show_progress=not args.json,
        )
    )
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


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from iwarp.streaming.server import serve

    return serve(
        avatars=args.avatar,
        backend=args.backend,
        checkpoint=args.checkpoint,
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("IWARP_TOKEN") or None,
        max_sessions=args.max_sessions,
        cert=args.cert,
        key=args.key,
        store=args.store,
        workers=args.workers,
        threads=args.threads,
        idle_timeout=args.idle_timeout,
        max_sessions_per_client=args.max_sessions_per_client,
        allow_origins=args.allow_origin or (),
        allow_hosts=args.allow_host or (),
        max_avatars=args.max_avatars,
        max_avatar_memory_mib=args.max_avatar_memory,
        engine=args.engine,
        ray_address=args.ray_address,
        replicas=args.replicas,
        batch=args.batch,
    )


def _bench_webrtc(args: argparse.Namespace) -> int:
    from iwarp.streaming.latency import run_from_args

    args.size = args.size or 256
    return run_from_args(args)


def _cmd_build(args: argparse.Namespace) -> int:
    from iwarp.engine_build.tensorrt_build import build_engines

    results = build_engines(
        checkpoint=args.checkpoint,
        build_dir=args.build_dir,
        precision=args.precision,
        plugin=args.plugin,
        max_sources=args.max_sources,
        max_batch=args.max_batch,
        opt_sources=args.opt_sources,
        rebuild=args.rebuild,
        plugin_library=args.plugin_path,
        show_progress=not args.json,
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _cmd_build_plugin(args: argparse.Namespace) -> int:
    from iwarp.engine_build.plugin import build_plugin

    result = build_plugin(
        tensorrt_root=args.tensorrt_root,
        cuda_archs=args.cuda_arch,
        kernels_only=args.kernels_only,
        build_dir=args.build_dir,
        jobs=args.jobs,
        clean=args.clean,
        install=args.install,
    )
    what = result.library or result.kernels
    print(f"built {what} in {result.seconds:.0f} s (CUDA architectures {result.cuda_archs})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwarp", description="Real-time avatar animation with implicit warping."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters and GFLOP of a config")
    p.add_argument("--config", default="tiny", help="tiny, paper or paper512")
    p.add_argument("--size", type=int, default=None, help="image side (default: the config's)")
    p.add_argument("--sources", type=int, default=1, help="source images for the per-frame cost")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("train", help="train the network on a folder of clips")
    p.add_argument("--config", default="tiny")
    p.add_argument("--data", required=True, help="folder of clips (manifest.csv optional)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, samples, curves")
    p.add_argument("--steps", type=int, default=10_000, help="total steps, resumed ones included")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--init", help="start from these weights (a fine-tune), not from scratch")
    p.add_argument("--size", type=int, help="training crop size (default: the config's)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-sources", type=int, dest="max_sources")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--loss", action="append", metavar="NAME=W", help="override a loss weight")
    p.add_argument("--no-residual", action="store_true", help="ablation: no residual branch")
    p.add_argument("--extra-tokens", type=int, help="ablation: number of extra tokens (0 = off)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cache", help="where prepared clips are cached (default ~/.cache/iwarp)")
    for flag in ("sample-every", "checkpoint-every", "val-every", "log-every"):
        p.add_argument(f"--{flag}", type=int, dest=flag.replace("-", "_"))
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("animate", help="animate source photo(s) with a driving video")
    p.add_argument(
        "--source", action="append", help="avatar photo, repeatable (default: a packaged portrait)"
    )
    p.add_argument(
        "--driving",
        help="driving video (default: a clip from ../shared/data/clips, else a generated one)",
    )
    p.add_argument("--out", default="iwarp_animation.mp4", help="output video (.mp4)")
    p.add_argument("--checkpoint", help="weights (default: the ones shipped in the package)")
    p.add_argument("--relative", action="store_true", help="relative motion from a reference frame")
    p.add_argument("--reference-frame", type=int, default=0, help="driving frame used as neutral")
    p.add_argument("--max-frames", type=int, help="stop after this many driving frames")
    p.add_argument(
        "--backend", default="auto", help="auto, torch, onnxruntime, openvino or tensorrt"
    )
    p.set_defaults(handler=_cmd_animate)
    p = sub.add_parser("bench", help="per-stage latency of the runtime on real frames")
    p.add_argument(
        "--backend",
        default="auto",
        help="auto, torch, onnxruntime, openvino, tensorrt, optionally NAME:PRECISION "
        "(openvino:bf16); comma-separated; 'all': every engine and precision installed here",
    )
    p.add_argument("--size", type=int, help="check that the model runs at this size")
    p.add_argument(
        "--sources",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="number of avatar photos, comma-separated for several runs (e.g. 1,3)",
    )
    p.add_argument("--frames", type=int, default=200, help="frames to time (after warm-up)")
    p.add_argument("--clip", help="driving clip (default: a val clip from ../shared/data/clips)")
    p.add_argument("--checkpoint", help="weights (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument(
        "--precision",
        help="fp32, bf16, fp16 or int8 (default: the backend's; int8 after calibrate)",
    )
    p.add_argument(
        "--accuracy-frames",
        type=int,
        default=30,
        help="frames compared with the FP32 torch pipeline, in dB (0: skip)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.add_argument("--plot", help="write a PNG: where each frame's time goes, and histograms")
    # WebRTC round trip against a running `iwarp serve` (same as bench/latency.py):
    p.add_argument("--webrtc", action="store_true", help="measure a running iwarp serve")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="with --webrtc: server URL")
    p.add_argument("--clients", default="1", help="with --webrtc: e.g. 1,2,4 (one run each)")
    p.add_argument("--seconds", type=float, default=10.0, help="with --webrtc: seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="with --webrtc: seconds left out")
    p.add_argument("--avatar", action="append", help="with --webrtc: avatar photo(s) to use")
    p.add_argument("--token", help="with --webrtc: the server's token (default $IWARP_TOKEN)")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("eval", help="quality metrics on real clips, with baselines")
    p.add_argument("--checkpoint", help="weights (default: the ones shipped in the package)")
    p.add_argument("--data", required=True, help="folder of clips (manifest.csv optional)")
    p.add_argument("--split", default="val", help="manifest split ('' = every clip)")
    p.add_argument("--sources", default="1,2,3", help="numbers of source frames, e.g. 1,2,3")
    p.add_argument("--targets", type=int, default=24, help="driving/target frames per clip")
    p.add_argument("--size", type=int, help="evaluation size (default: the checkpoint's)")
    p.add_argument("--max-clips", type=int, dest="max_clips", help="only the first N clips")
    p.add_argument("--no-cross-identity", action="store_true", dest="no_cross_identity")
    p.add_argument("--json", help="write the full report (aggregates and per clip) here")
    p.add_argument("--grid", help="write picture grids here (PATH and PATH_<clip>.png)")
    p.add_argument("--plot", help="write metrics against the number of sources (PNG) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("cam", help="the avatar as a camera for call apps (virtual camera)")
    p.add_argument(
        "--avatar",
        action="append",
        metavar="PHOTO[,PHOTO...]",
        help="one avatar (several photos of one face, comma-separated); repeat for avatars 1-9",
    )
    p.add_argument("--camera", default="0", help="camera index, /dev/videoN, or a video file")
    p.add_argument("--server", help="animate on an `iwarp serve` at this URL (default: locally)")
    p.add_argument("--token", help="the server's token (default $IWARP_TOKEN)")
    p.add_argument("--sink", default="virtualcam", help="virtualcam, window, or FILE.mp4")
    p.add_argument("--size", type=int, default=256, choices=(256, 512), help="output side")
    p.add_argument("--fps", type=float, default=30.0, help="camera and virtual camera rate")
    p.add_argument(
        "--backend", default="auto", help="local: auto, torch, onnxruntime, openvino, tensorrt"
    )
    p.add_argument("--checkpoint", help="local: weights (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=0, help="local: CPU threads (0: all cores)")
    p.add_argument("--control-port", type=int, default=8765, help="local control endpoint (0: off)")
    p.add_argument("--stats", action="store_true", help="fps and latency on stderr every second")
    p.add_argument("--stats-json", help="write a summary (frames, fps, latency) here at exit")
    p.add_argument(
        "--lossless",
        action="store_true",
        help="a file camera waits for each avatar frame (no frame skipped; for tests/renders)",
    )
    p.add_argument("--steady", action="store_true", help="a file sink recorded at --fps")
    p.add_argument("--loop", action="store_true", help="a file camera starts over at its end")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument(
        "--connect-timeout", type=float, default=15.0, help="remote: seconds to get a first call"
    )
    p.set_defaults(handler=_cmd_cam)

    p = sub.add_parser("export", help="export the ONNX graphs (keypoints, sources, animator)")
    p.add_argument("--checkpoint", help="weights (default: the ones shipped in the package)")
    p.add_argument("--out", required=True, help="build folder for the graphs and metadata.json")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (23: one Attention node)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check vs PyTorch")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("calibrate", help="INT8/FP8 quantization of the graphs from real frames")
    p.add_argument("--data", required=True, help="folder of clips (manifest.csv optional)")
    p.add_argument("--out", default="build", help="build folder: OUT/<mode>/, report, cache")
    p.add_argument("--mode", choices=("int8", "fp8"), default="int8")
    p.add_argument("--split", default="train", help="manifest split to calibrate on ('' = all)")
    p.add_argument("--frames", type=int, default=512, help="calibration driving frames")
    p.add_argument("--eval-frames", type=int, default=32, help="val frames for the gate")
    p.add_argument("--sources", type=int, default=3, help="source frames per avatar")
    p.add_argument("--checkpoint", help="weights (default: the ones shipped in the package)")
    p.add_argument("--onnx", help="folder of the exported FP32 graphs (default: OUT/onnx)")
    p.add_argument("--quantizer", choices=("auto", "modelopt", "ort"), default="auto")
    p.add_argument("--method", help="calibration method (modelopt: entropy/max; ort: minmax...)")
    p.add_argument(
        "--exclude",
        default="auto",
        help="layers kept FP32: auto (measured), default, none, or graph:group,...",
    )
    p.add_argument("--search-frames", type=int, default=64, help="frames per exclusion trial")
    p.add_argument("--threads", type=int, default=0, help="ORT/torch threads (0: all cores)")
    p.add_argument("--timing-runs", type=int, default=20, help="latency: median of N runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="calibration cache (default OUT/calibration_cache.npz)")
    p.add_argument("--clip-cache", help="decoded clips cache (default ~/.cache/iwarp/clips)")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 comparison")
    p.add_argument("--min-animator-psnr", type=float, dest="min_animator_psnr_db")
    p.add_argument("--max-keypoint-error", type=float, dest="max_keypoint_error_px")
    p.add_argument("--min-source-psnr", type=float, dest="min_source_psnr_db")
    p.add_argument("--min-end-to-end-psnr", type=float, dest="min_end_to_end_psnr_db")
    p.add_argument("--json", action="store_true", help="no progress; print one JSON line")
    p.set_defaults(handler=_cmd_calibrate)

    p = sub.add_parser("serve", help="WebRTC server: webcam in, animated avatar out")
    p.add_argument(
        "--avatar", action="append", help="avatar photo, repeatable (default: a packaged one)"
    )
    p.add_argument(
        "--backend", default="auto", help="auto, torch, onnxruntime, openvino or tensorrt"
    )
    p.add_argument("--checkpoint", help="weights (default: the ones shipped in the package)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or $IWARP_TOKEN)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent streams")
    p.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=2,
        help="concurrent streams one client (X-Iwarp-Client) may hold",
    )
    p.add_argument(
        "--max-avatars",
        type=int,
        default=100,
        help="uploaded avatars kept in all; past it the least recently used unused one goes",
    )
    p.add_argument(
        "--max-avatar-memory",
        type=float,
        default=256.0,
        metavar="MIB",
        help="memory for uploaded avatars (~1.5 MiB per photo at 256 px), evicted the same way",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        help="also accept requests from pages of this origin (e.g. https://app.example.com; "
        "repeatable; '*' allows any). Default: only the server's own page",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        help="also answer to this Host name (repeatable). Default: IP addresses, localhost "
        "and this machine's name",
    )
    p.add_argument("--cert", help="TLS certificate (PEM): serve HTTPS")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--store", help="folder that keeps uploaded avatars across restarts")
    p.add_argument("--workers", type=int, default=0, help="frames animated at once (0: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per frame (0: auto)")
    p.add_argument(
        "--idle-timeout", type=float, default=10.0, help="close a session after S s without video"
    )
    # Scale-out (docs/SCALING.md): the networks on Ray Serve replicas, WebRTC stays here.
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: animate in this process; ray: on Ray Serve replicas (the cluster extra)",
    )
    p.add_argument(
        "--ray-address",
        help="with --engine ray: the cluster's head, HOST:PORT or auto (default: start one here)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="with --engine ray: replicas to deploy (a GPU each where the cluster has GPUs)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="with --engine ray: most frames of different sessions per replica call "
        "(0: 8 on GPUs, 1 on CPUs)",
    )
    p.set_defaults(handler=_cmd_serve)

    # `iwarp build` (TensorRT engines) and `iwarp build-plugin` (CUDA kernel + plugin).
    from iwarp.engine_build.tensorrt_build import PRECISIONS

    p = sub.add_parser("build", help="TensorRT engines (GPU, TensorRT 11)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument(
        "--plugin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused IWarpAttention plugin for the animator (default: when its library exists)",
    )
    p.add_argument("--max-sources", type=int, default=4, help="largest avatar (photos)")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch (streams per call)")
    p.add_argument("--opt-sources", type=int, default=1, help="sources the build optimises for")
    p.add_argument("--checkpoint", help="weights (default: the shipped ones)")
    p.add_argument("--build-dir", help="output folder (default: the user cache)")
    p.add_argument("--rebuild", action="store_true", help="rebuild engines that do not match")
    p.add_argument("--plugin-path", help="the plugin library (default: search, see docs)")
    p.add_argument("--json", action="store_true", help="print the engines' metadata as JSON")
    p.set_defaults(handler=_cmd_build)

    p = sub.add_parser("build-plugin", help="compile the attention kernel and plugin")
    p.add_argument("--tensorrt-root", help="TensorRT folder with include/NvInferRuntime.h")
    p.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES (default: this GPU or 80-90)")
    p.add_argument("--kernels-only", action="store_true", help="only the CUDA kernel library")
    p.add_argument("--build-dir", help="cmake build folder (default: the user cache)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--clean", action="store_true", help="start from an empty build folder")
    p.add_argument("--install", action="store_true", help="copy the library into the package")
    p.set_defaults(handler=_cmd_build_plugin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except IwarpError as exc:
        print(f"iwarp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iwarp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
