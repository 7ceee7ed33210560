"""TensorRT engines for the three graphs: `iwarp build --precision {fp32,fp16,int8}`.

TensorRT 11 API only: strongly typed networks (`builder.create_network(0)`; there is no
BuilderFlag.FP16/INT8 any more), so the precision lives in the ONNX graph:
  fp32  the exported graphs as they are;
  fp16  an FP16 graph from NVIDIA ModelOpt AutoCast
        (`modelopt.onnx.autocast.convert_to_mixed_precision(low_precision_type="fp16")`) when
        nvidia-modelopt is importable, else onnxconverter-common's `convert_float_to_float16`
        (keep_io_types: inputs/outputs stay float32); either runs in ONNX Runtime on the CPU and
        is checked there against the FP32 graph (tests: PSNR of the animator image >=
        FP16_MIN_PSNR_DB = 50 dB; about 80 dB measured with both converters);
  int8  the Q/DQ graphs that `iwarp calibrate --out BUILD/onnx` made from real frames and
        that passed its accuracy gate (BUILD/onnx/int8/); never quantized here without data.
With the plugin (default when its library is found), the animator's attention becomes one
IWarpAttention node (iwarp.engine_build.rewrite) after the precision conversion.

Layout of a build folder (default: $IWARP_CACHE/tensorrt/<checkpoint sha256[:16]>):
    onnx/                      the exported fp32 graphs (iwarp.engine_build.export)
    <precision>/<graph>.onnx   the graphs TensorRT parses (converted, rewritten)
    engines/<graph>.<precision>[.plugin].engine  + .json sidecar (ENGINE_FORMAT metadata)
    engines/timing.cache       TensorRT timing cache, next to the engines, reused by every build
An engine whose sidecar does not match this TensorRT, GPU, precision, ONNX file (sha256),
plugin library or profile is rebuilt (`rebuild=True`) or refused with a CheckpointError.
Every `tensorrt` import is lazy: this module imports on machines without TensorRT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import iwarp
from iwarp.engine_build.fp16 import Fp16Result, convert_fp16, modelopt_available  # noqa: F401
from iwarp.errors import CheckpointError, IwarpError
from iwarp.graphs import ANIMATOR_GRAPH, GRAPHS
from iwarp.metrics import psnr  # noqa: F401  (FP16 conversion, PSNR: own modules; names kept)
from iwarp.options import option

ENGINE_FORMAT = "iwarp-trt/1"
PRECISIONS = ("fp32", "fp16", "int8")
STAGES = GRAPHS  # one engine per graph of the contract, in run order
FP16_MIN_PSNR_DB = 50.0  # animator image, FP16 vs FP32 graph in ONNX Runtime (CPU); measured ~80
# Sidecar fields that must match for an engine to be reused.
MATCH_FIELDS = (
    "format",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "precision",
    "plugin",
    "plugin_sha256",
    "onnx_sha256",
    "profile",
)


# --------------------------------------------------------------------------- metadata


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def engine_metadata(
    *,
    graph: str,
    precision: str,
    onnx_path: str | Path,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profile: dict[str, list[list[int]]],
    plugin_library: str | Path | None = None,
) -> dict[str, Any]:
    from iwarp.checkpoint import file_sha256

    """What an engine is (and must stay) built from; written next to it as JSON."""
    return {
        "format": ENGINE_FORMAT,
        "graph": graph,
        "precision": precision,
        "plugin": plugin_library is not None,
        "plugin_sha256": file_sha256(plugin_library) if plugin_library else None,
        "onnx": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "profile": profile,
        "iwarp_version": iwarp.__version__,
    }


def check_engine(engine: str | Path, expected: dict[str, Any]) -> list[str]:
    """Why the engine file cannot be used for `expected` (empty list: it can)."""
    engine = Path(engine)
    if not engine.is_file():
        return [f"{engine.name} does not exist"]
    side = sidecar_path(engine)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        return [f"{side.name} (its metadata) is missing"]
    except (OSError, ValueError) as exc:
        return [f"{side.name} is unreadable ({exc})"]
    problems = []
    for key in MATCH_FIELDS:
        if key not in expected:
            continue
        have, want = meta.get(key), expected[key]
        if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
            problems.append(f"{key}: engine has {_short(have)}, need {_short(want)}")
    if meta.get("engine_bytes") is not None and engine.stat().st_size != meta["engine_bytes"]:
        problems.append(f"{engine.name} changed size since it was built")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return text if len(text) < 80 else text[:77] + "..."


def require_engine(engine: str | Path, expected: dict[str, Any]) -> None:
    """CheckpointError when the engine does not match (what the runtime calls)."""
    problems = check_engine(engine, expected)
    if problems:
        raise CheckpointError(
            f"TensorRT engine {engine} does not match: {'; '.join(problems)}",
            f"rebuild it: iwarp build --precision {expected.get('precision', 'fp16')} "
            "(or delete the engines folder)",
        )


def write_sidecar(engine: Path, meta: dict[str, Any]) -> Path:
    side = sidecar_path(engine)
    meta = {**meta, "engine_bytes": engine.stat().st_size}
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, side)
    return side


# --------------------------------------------------------------------------- profiles


def stage_profiles(
    graph_inputs: dict[str, list[dict[str, Any]]],
    tokens_per_source: int,
    max_sources: int,
    max_batch: int,
    opt_sources: int = 1,
) -> dict[str, dict[str, list[list[int]]]]:
    """(min, opt, max) shapes of every graph input, from the graphs' real input shapes.

    `graph_inputs` is {graph: [{"name", "shape"}, ...]} as the export's metadata.json records
    it (`metadata["graphs"][graph]["inputs"]`): fixed dims are kept as they are, the symbolic
    batch dim runs 1..max_batch (opt 1) and the token dim (the animator's avatar rows) covers
    1..max_sources sources (opt `opt_sources`). Nothing is written by hand, so a graph input of
    another width (the pixel patches, a new value width) gets the profile it needs.
    """
    from iwarp.graphs import BATCH, TOKENS

    b1 = max(1, max_batch)
    n1 = max(1, max_sources)
    ranges = {
        BATCH: (1, 1, b1),
        TOKENS: (
            tokens_per_source,
            tokens_per_source * max(1, min(opt_sources, n1)),
            tokens_per_source * n1,
        ),
    }
    profiles: dict[str, dict[str, list[list[int]]]] = {}
    for graph, inputs in graph_inputs.items():
        profiles[graph] = {}
        for spec in inputs:
            lo, mid, hi = [], [], []
            for dim in spec["shape"]:
                if isinstance(dim, int) and dim > 0:
                    lo.append(dim)
                    mid.append(dim)
                    hi.append(dim)
                elif dim in ranges:
                    a, o, z = ranges[dim]
                    lo.append(a)
                    mid.append(o)
                    hi.append(z)
                else:
                    raise CheckpointError(
                        f"{graph} input {spec['name']} has the dim {dim!r}, neither fixed nor "
                        f"{BATCH!r}/{TOKENS!r}",
                        "re-export the graphs with this iwarp (iwarp export)",
                    )
            profiles[graph][spec["name"]] = [lo, mid, hi]
    return profiles


def profiles_for_export(
    onnx_meta: dict[str, Any], max_sources: int, max_batch: int, opt_sources: int = 1
) -> dict[str, dict[str, list[list[int]]]]:
    """`stage_profiles` of an export's metadata.json (what `build_engines` builds with)."""
    graphs = onnx_meta.get("graphs") or {}
    missing = [g for g in STAGES if not graphs.get(g, {}).get("inputs")]
    if missing:
        raise CheckpointError(
            f"the export metadata lists no inputs for {', '.join(missing)}",
            "re-export the graphs with this iwarp (iwarp export)",
        )
    inputs = {g: graphs[g]["inputs"] for g in STAGES}
    return stage_profiles(
        inputs, int(onnx_meta["tokens_per_source"]), max_sources, max_batch, opt_sources
    )


# --------------------------------------------------------------------------- precision


def calibrated_int8(src: Path, graph: str) -> Path:
    """The gate-passed INT8 graph `iwarp calibrate` wrote next to the FP32 graph `src`."""
    import json

    folder = src.parent / "int8"
    path, meta = folder / f"{graph}.onnx", folder / "metadata.json"
    if not (path.is_file() and meta.is_file()):
        raise IwarpError(
            f"no calibrated INT8 graphs in {folder}",
            f"run 'iwarp calibrate --data CLIPS --mode int8 --out {src.parent}' first",
        )
    gate = json.loads(meta.read_text()).get("gate", {})
    if not gate.get("passed", False):
        raise IwarpError(
            f"the INT8 graphs in {folder} did not pass the accuracy gate",
            "see calibration.md there; calibrate again with other exclusions",
        )
    return path


# --------------------------------------------------------------------------- TensorRT


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'M.m') of the current CUDA device."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return torch.cuda.get_device_name(), f"{major}.{minor}"
    except ImportError:
        pass
    raise IwarpError("no CUDA GPU visible", "TensorRT engines are built on the GPU they run on")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise IwarpError(
            "TensorRT is not installed",
            "pip install 'iwarp[tensorrt]' (TensorRT 11) on a machine with an NVIDIA GPU",
        ) from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 11:
        raise IwarpError(
            f"TensorRT {trt.__version__} is too old", "iwarp needs TensorRT 11 (strongly typed)"
        )
    return trt


def _progress_monitor(trt, label: str):
    """A trt.IProgressMonitor printing phases on one line per phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                print(f"iwarp build: {label}: {phase_name} ...", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self._steps.pop(phase_name, None)

    return Monitor()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profile: dict[str, list[list[int]]],
    timing_cache: str | Path,
    plugin_library: str | Path | None = None,
    show_progress: bool = True,
    label: str = "",
    workspace_bytes: int | None = None,
) -> Path:
    """Parses an ONNX graph into a strongly typed network and serializes one engine."""
    trt = import_tensorrt()
    if plugin_library is not None:
        from iwarp.engine_build.plugin import load_plugin

        load_plugin(plugin_library)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 11: always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(
            f"TensorRT could not parse {onnx_path}: {'; '.join(errors)[:2000]}",
            "with the plugin: is the IWarpAttention library loaded (iwarp build-plugin)?",
        )
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    monitor = _progress_monitor(trt, label or Path(engine_path).name) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # `monitor` outlives the build (TensorRT's rule)
    timing_cache = Path(timing_cache)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    opt = builder.create_optimization_profile()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, mid, hi) in profile.items():
        if name in inputs:
            opt.set_shape(name, tuple(lo), tuple(mid), tuple(hi))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    del monitor
    if serialized is None:
        raise IwarpError(
            f"TensorRT failed to build {engine_path}", "see the TensorRT messages above"
        )
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, engine_path)
    updated = config.get_timing_cache()
    if updated is not None:
        tmp_cache = timing_cache.with_name(timing_cache.name + ".tmp")
        with open(tmp_cache, "wb") as f:
            f.write(memoryview(updated.serialize()))
        os.replace(tmp_cache, timing_cache)
    return engine_path


# --------------------------------------------------------------------------- the whole build


def default_build_dir(checkpoint_sha: str) -> Path:
    from iwarp.paths import user_cache_dir

    return user_cache_dir() / "tensorrt" / checkpoint_sha[:16]


def engine_file(build_dir: Path, graph: str, precision: str, plugin: bool) -> Path:
    suffix = ".plugin" if plugin and graph == ANIMATOR_GRAPH else ""
    return Path(build_dir) / "engines" / f"{graph}.{precision}{suffix}.engine"


def ensure_onnx(checkpoint: Path, onnx_dir: Path, show_progress: bool) -> dict[str, Any]:
    """The exported fp32 graphs for `checkpoint` in `onnx_dir` (exported when stale/missing)."""
    from iwarp.checkpoint import Checkpoint, file_sha256
    from iwarp.engine_build.export import METADATA, check_build, export_onnx, load_metadata

    sha = file_sha256(checkpoint)
    if (onnx_dir / METADATA).is_file():
        problems = check_build(onnx_dir, sha, Checkpoint(checkpoint).config)
        if not problems:
            return load_metadata(onnx_dir)
        if show_progress:
            print(f"iwarp build: re-exporting ({'; '.join(problems)})", file=sys.stderr)
    return export_onnx(checkpoint, onnx_dir, show_progress=show_progress)


def prepare_graph(
    src: Path,
    dst_dir: Path,
    graph: str,
    precision: str,
    plugin: bool,
) -> tuple[Path, dict[str, Any]]:
    """The ONNX file TensorRT parses for one stage, and notes on how it was made."""
    from iwarp.engine_build import rewrite

    dst_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, Any] = {"source_onnx": str(src)}
    current = src
    if precision == "fp16":
        result = convert_fp16(src, dst_dir / f"{graph}.onnx")
        current, notes["fp16_method"] = result.path, result.method
    elif precision == "int8":
        current = calibrated_int8(src, graph)
    if plugin and graph == ANIMATOR_GRAPH:
        current = rewrite.rewrite_file(current, dst_dir / f"{graph}.plugin.onnx")
        notes["plugin_node"] = rewrite.PLUGIN_NODE
    return current, notes


def plugin_choice(config: Any, precision: str, gpu_name: str, opt_sources: int = 1) -> Any:
    """Whether the animator's attention should be the IWarpAttention plugin: the fused kernel
    where the device measurement (`iwarp.model.fused_attention.choose`, the table that
    bench/device_check.sh writes) found it faster than SDPA for the engine's dtype and its
    usual shape (`opt_sources` sources), TensorRT's own attention otherwise. The measurement
    compares the kernel with PyTorch's SDPA, which stands in for TensorRT's fused attention."""
    from iwarp.model.fused_attention import attention_widths, choose

    m = config.model
    d, dv = attention_widths(m, max(1, opt_sources))
    keys = m.tokens_per_source * max(1, opt_sources) + m.extra_tokens
    dtype = {"fp32": "float32", "fp16": "float16"}.get(precision, "float16")  # int8: fp16 attn
    return choose(gpu_name, dtype, 1, m.grid_size**2, keys, d, dv)


@dataclass
class BuildOptions:
    """`iwarp build`: `build_engines`'s arguments as command-line options."""

    precision: str = option("fp16", choices=PRECISIONS, help="the engines' precision")
    plugin: bool | None = option(
        None,
        action=argparse.BooleanOptionalAction,
        help="fused IWarpAttention plugin for the animator (default: when its library exists)",
    )
    max_sources: int = option(4, help="largest avatar (photos)")
    max_batch: int = option(1, help="largest batch (streams per call)")
    opt_sources: int = option(1, help="sources the build optimises for")
    checkpoint: str | None = option(None, help="weights (default: the shipped ones)")
    build_dir: str | None = option(None, help="output folder (default: the user cache)")
    rebuild: bool = option(False, help="rebuild engines that do not match")
    plugin_library: str | None = option(
        None, flag="--plugin-path", help="the plugin library (default: search, see docs)"
    )
    json: bool = option(False, help="print the engines' metadata as JSON")


def run_build(o: BuildOptions) -> int:
    """`iwarp build`: the engines (progress on stderr); with --json, their metadata."""
    results = build_engines(o, show_progress=not o.json)
    if o.json:
        print(json.dumps(results, indent=2))
    return 0


def build_engines(o: BuildOptions, show_progress: bool = True) -> dict[str, Any]:
    """Builds (or reuses) one engine per stage; returns {stage: sidecar metadata}."""
    from iwarp.checkpoint import Checkpoint, file_sha256
    from iwarp.engine_build.plugin import find_plugin_library
    from iwarp.paths import DEFAULT_CHECKPOINT

    precision, plugin = o.precision, o.plugin
    if precision not in PRECISIONS:
        raise IwarpError(
            f"unknown precision {precision!r}", f"choose one of {', '.join(PRECISIONS)}"
        )
    trt = import_tensorrt()
    gpu_name, capability = gpu_identity()
    ckpt_path = Path(o.checkpoint) if o.checkpoint else DEFAULT_CHECKPOINT
    ckpt = Checkpoint(ckpt_path)
    out = Path(o.build_dir) if o.build_dir else default_build_dir(file_sha256(ckpt_path))
    library = Path(o.plugin_library) if o.plugin_library else None
    attention_choice = "IWarpAttention plugin (asked for)" if plugin else "TensorRT attention"
    if plugin is None:  # auto: the plugin where it exists and a measurement found it faster
        library = library or find_plugin_library()
        plugin = library is not None
        if not plugin:
            attention_choice = "TensorRT attention: plugin library not found (iwarp build-plugin)"
        else:
            choice = plugin_choice(ckpt.config, precision, gpu_name, o.opt_sources)
            plugin = choice.backend == "fused"
            attention_choice = f"{'IWarpAttention plugin' if plugin else 'TensorRT attention'}"
            attention_choice += f" ({choice.reason})"
        if show_progress:
            print(f"iwarp build: animator attention: {attention_choice}", file=sys.stderr)
    elif plugin:
        from iwarp.engine_build.plugin import load_plugin

        library = load_plugin(library)
    onnx_meta = ensure_onnx(ckpt_path, out / "onnx", show_progress)
    profiles = profiles_for_export(onnx_meta, o.max_sources, o.max_batch, o.opt_sources)
    results: dict[str, Any] = {}
    for i, graph in enumerate(STAGES, 1):
        use_plugin = bool(plugin) and graph == ANIMATOR_GRAPH
        src = out / "onnx" / f"{graph}.onnx"
        parsed, notes = prepare_graph(src, out / precision, graph, precision, use_plugin)
        engine = engine_file(out, graph, precision, use_plugin)
        expected = engine_metadata(
            graph=graph,
            precision=precision,
            onnx_path=parsed,
            tensorrt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=capability,
            profile=profiles[graph],
            plugin_library=library if use_plugin else None,
        )
        problems = check_engine(engine, expected)
        label = f"[{i}/{len(STAGES)}] {engine.name}"
        if not problems:
            if show_progress:
                print(f"iwarp build: {label} is up to date", file=sys.stderr)
            results[graph] = {**json.loads(sidecar_path(engine).read_text()), "engine": str(engine)}
            continue
        if engine.is_file() and not o.rebuild:
            require_engine(engine, expected)  # raises with the reasons
        t0 = time.perf_counter()
        build_engine(
            parsed,
            engine,
            profiles[graph],
            out / "engines" / "timing.cache",
            library if use_plugin else None,
            show_progress,
            label,
        )
        meta = {
            **expected,
            **notes,
            **({"attention": attention_choice} if graph == ANIMATOR_GRAPH else {}),
            "engine": str(engine),
            "checkpoint_sha256": onnx_meta.get("checkpoint_sha256"),
            "max_sources": o.max_sources,
            "max_batch": o.max_batch,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_sidecar(engine, meta)
        results[graph] = json.loads(sidecar_path(engine).read_text())
        if show_progress:
            print(f"iwarp build: {label} built in {meta['build_seconds']} s", file=sys.stderr)
    return results
