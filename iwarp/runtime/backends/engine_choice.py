"""`--backend auto` on the CPU: the fastest installed engine and precision that pass the gate.

Speed depends on the CPU more than on the engine (bf16 needs AMX or AVX512-BF16; Intel and
AMD differ), so it is measured once on this machine, at first use, and cached in
`<cache>/engine_choice.json` per (CPU, ISA features, threads, checkpoint, engine versions).

Candidates: OpenVINO bf16 (where the CPU computes bf16 natively), OpenVINO fp32, OpenVINO int8
(where `iwarp calibrate` made the Q/DQ graphs), ONNX Runtime fp32. torch eager is not a
candidate: it was slower than ONNX Runtime fp32 in every run (1.35x on AMD EPYC, 1.0x on a
Sapphire Rapids Xeon, docs/PERFORMANCE.md), and loading it costs seconds.

Gate (like calibration's): end to end against FP32, on real pixels: the packaged portrait as a
1-source avatar, driven by it and three moved copies of it (keypoints graph, then animator).
The FP32 reference is ONNX Runtime fp32, which the export checks against PyTorch to 1e-3
(measured 2e-6). Threshold `MIN_PSNR_DB`; bf16 measured ~45 dB here. Speed: keypoints +
animator, 1 source, the candidates interleaved round by round so that load from other processes
hits all of them alike; the median per candidate.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from iwarp.metrics import interleaved_median_ms, psnr

if TYPE_CHECKING:
    from iwarp.runtime.backends.base import AvatarFeatures, Backend

MIN_PSNR_DB = 40.0  # end to end vs FP32; below this a precision is not offered
CHOICE_FILE = "engine_choice.json"
_ROUNDS = 12


@dataclass
class Trial:
    backend: str
    precision: str
    psnr_db: float | None = None  # end to end vs FP32 (None: is the reference)
    ms: float | None = None  # keypoints + animator, 1 source, median
    passed: bool = False
    error: str = ""


def candidates(build_dir: Path) -> list[tuple[str, str]]:
    """(backend, precision) pairs installed and sensible on this CPU; the reference first."""
    from iwarp.runtime.backends import openvino_backend
    from iwarp.system import has_bf16_compute

    out = [("onnxruntime", "fp32")]
    if openvino_backend.available():
        out.append(("openvino", "fp32"))
        if has_bf16_compute():
            out.append(("openvino", "bf16"))
        if (build_dir / "int8" / "metadata.json").is_file():
            out.append(("openvino", "int8"))
    return out


def gate_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(avatar (1, 3, S, S), driving (4, 3, S, S)) from the packaged portrait."""
    from iwarp.engine_build.export import packaged_face_images

    crop, moved = packaged_face_images(size)
    return crop, np.concatenate([crop, moved])


def run_trials(
    checkpoint: str | Path | None = None,
    build_dir: str | Path | None = None,
    threads: int = 0,
    show_progress: bool = True,
) -> list[Trial]:
    """Measures every candidate: accuracy against the FP32 reference, and speed."""
    from iwarp.runtime.backends import create_backend
    from iwarp.runtime.backends.onnx_build import prepared_graphs

    folder, _ = prepared_graphs(checkpoint, build_dir, "fp32", show_progress)
    engines: dict[tuple[str, str], Any] = {}
    trials: list[Trial] = []
    for name, precision in candidates(folder):
        trial = Trial(name, precision)
        try:
            engines[(name, precision)] = create_backend(
                name, checkpoint, None, folder, threads, show_progress, precision
            )
        except Exception as exc:  # an engine that cannot load is simply not offered
            trial.error = f"{type(exc).__name__}: {exc}"[:200]
        trials.append(trial)
    if not engines:
        return trials
    size = next(iter(engines.values())).image_size
    avatar_image, driving = gate_images(size)
    outputs, runs = {}, {}
    for key, engine in engines.items():
        avatar = engine.encode_avatar(avatar_image)
        pose = engine.detect(driving)
        outputs[key] = np.concatenate([engine.animate(avatar, pose.select(i)) for i in range(4)])
        runs[key] = (engine, avatar)
    reference = outputs.get(("onnxruntime", "fp32"))

    def frame(engine: Backend, avatar: AvatarFeatures) -> Callable[[], object]:
        return lambda: engine.animate(avatar, engine.detect(avatar_image))

    # The first rounds warm the caches.
    times = interleaved_median_ms({k: frame(*run) for k, run in runs.items()}, _ROUNDS - 2)
    for trial in trials:
        key = (trial.backend, trial.precision)
        if key not in engines:
            continue
        trial.ms = times[key]
        if key == ("onnxruntime", "fp32") or reference is None:
            trial.passed = key == ("onnxruntime", "fp32")
        else:
            trial.psnr_db = psnr(outputs[key], reference)
            trial.passed = trial.psnr_db >= MIN_PSNR_DB
    return trials


def _cache_key(folder: Path, threads: int) -> str:
    import onnxruntime

    import iwarp
    from iwarp.system import cpu_name, isa_features, physical_cores

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = "-"
    features = ",".join(k for k, v in isa_features().items() if v)
    return "|".join(
        [
            cpu_name(),
            features,
            f"threads={threads or physical_cores()}",
            folder.name,
            "int8" if (folder / "int8" / "metadata.json").is_file() else "no-int8",
            f"ort={onnxruntime.__version__}",
            f"ov={ov_version}",
            f"iwarp={iwarp.__version__}",
        ]
    )


def choose(
    checkpoint: str | Path | None = None,
    build_dir: str | Path | None = None,
    threads: int = 0,
    show_progress: bool = True,
    refresh: bool = False,
) -> tuple[str, str, list[Trial]]:
    """(backend, precision, trials): the fastest passing candidate, cached per machine."""
    from iwarp.paths import user_cache_dir
    from iwarp.runtime.backends.onnx_build import prepared_graphs

    folder, _ = prepared_graphs(checkpoint, build_dir, "fp32", show_progress)
    key = _cache_key(folder, threads)
    cache = user_cache_dir() / CHOICE_FILE
    known: dict[str, Any] = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    entry = known.get(key)
    if entry and not refresh:
        trials = [Trial(**t) for t in entry["trials"]]
        return entry["backend"], entry["precision"], trials
    if show_progress:
        print("iwarp: measuring the CPU engines once on this machine ...", file=sys.stderr)
    trials = run_trials(checkpoint, folder, threads, show_progress)
    passing = [t for t in trials if t.passed and t.ms is not None]
    best = min(passing, key=lambda t: t.ms or 0.0) if passing else Trial("onnxruntime", "fp32")
    if show_progress:
        for t in trials:
            acc = "reference" if t.psnr_db is None else f"{t.psnr_db:.1f} dB"
            state = t.error or ("passes" if t.passed else f"fails the {MIN_PSNR_DB} dB gate")
            ms = f"{t.ms:.1f} ms" if t.ms is not None else "-"
            print(f"  {t.backend} {t.precision}: {ms}, {acc}, {state}", file=sys.stderr)
        print(f"iwarp: chose {best.backend} {best.precision}", file=sys.stderr)
    known[key] = {
        "backend": best.backend,
        "precision": best.precision,
        "trials": [asdict(t) for t in trials],
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{CHOICE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=2) + "\n")
    os.replace(tmp, cache)
    return best.backend, best.precision, trials
