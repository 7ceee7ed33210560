"""ONNX export: the network as three graphs plus `metadata.json`.

    keypoints.onnx, source_encoder.onnx, animator.onnx

Their inputs and outputs (names, shapes, dtypes) are the contract in `iwarp.graphs`; a network
with an expression (`expression_dim` > 0) has it as one more keypoints output and one more
source encoder and animator input. An avatar of N photos runs `source_encoder` once per photo
and concatenates the rows along the token axis (NT = N * T); `key_mask` is bool, True where a
token may be attended to. Batch B is dynamic in all three graphs and NT in the animator.

Exporter: `torch.onnx.export(dynamo=True)` at opset 23. It turns
`F.scaled_dot_product_attention` into one ONNX `Attention` node, folds BatchNorm into the
convolutions and leaves no shape-computing clutter; the TorchScript exporter produced about
twice as many nodes (Shape/Gather/Constant chains, a decomposed attention) and did not match
PyTorch on the query path. The attention node is renamed `ATTENTION_NODE`, so the TensorRT
plugin rewrite finds it by name; its mask is expanded to (B, 1, Nq, NT) in the graph because
ONNX Runtime's CPU kernel (1.31) refuses a mask that broadcasts over the query axis. At a lower
opset the exporter decomposes the attention into MatMul/Softmax/MatMul: those nodes are renamed
under `ATTENTION_SCOPE` instead.

`load_metadata` and `check_build` are torch-free, for the backends that load these graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import iwarp
from iwarp.config import Config
from iwarp.errors import CheckpointError, IwarpError
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    BATCH,
    EXPRESSION,
    GRAPHS,
    IMAGE,
    KEY_MASK,
    KEYPOINTS,
    KEYPOINTS_GRAPH,
    KEYS,
    PIXELS,
    SOURCE_ENCODER_GRAPH,
    STRENGTH,
    TOKENS,
    VALUES,
    graph_specs,
    image_to_tensor,
    pose_feeds,
    pose_of,
)
from iwarp.motion import Pose
from iwarp.options import option

FORMAT = "iwarp-onnx/1"
DEFAULT_OPSET = 23
MIN_OPSET = 18  # the dynamo exporter's floor
METADATA = "metadata.json"
ATTENTION_SCOPE = "iwarp/attention"
ATTENTION_NODE = f"{ATTENTION_SCOPE}/Attention"
FP32_TOLERANCE = 1e-3
# Example sizes traced by torch.export: dims of size 0/1 would be specialised, so use 2.
_EXAMPLE_BATCH = 2
_EXAMPLE_SOURCES = 2


def graph_path(build_dir: str | Path, graph: str) -> Path:
    return Path(build_dir) / f"{graph}.onnx"


# --------------------------------------------------------------------------- metadata


def load_metadata(build_dir: str | Path) -> dict[str, Any]:
    """The build's metadata.json; CheckpointError when it is missing or unreadable."""
    path = Path(build_dir) / METADATA
    hint = f"export the graphs with 'iwarp export --out {build_dir}'"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {build_dir} holds no exported graphs", hint)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})", hint) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not an iwarp build's metadata", hint)
    return meta


def check_build(
    build_dir: str | Path, checkpoint_sha: str, config: Config | None = None
) -> list[str]:
    """What keeps the graphs in `build_dir` from standing for this checkpoint (empty: usable).

    Checks the format, the checkpoint's sha256, the config (when given), the iwarp version the
    graphs were exported with, and that every graph file is there with its recorded size.
    """
    try:
        meta = load_metadata(build_dir)
    except CheckpointError as exc:
        return [exc.message]
    problems = []
    if meta.get("format") != FORMAT:
        problems.append(f"build format {meta.get('format')!r}, expected {FORMAT!r}")
    theirs = str(meta.get("checkpoint_sha256", ""))
    if theirs != checkpoint_sha:
        problems.append(
            f"exported from checkpoint sha256 {theirs[:16] or '?'}..., "
            f"not {checkpoint_sha[:16]}... ({meta.get('checkpoint', '?')})"
        )
    if config is not None:
        diffs = _dict_diff(meta.get("config", {}), config.to_dict())
        if diffs:
            shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            problems.append(f"config differs: {shown}")
    if meta.get("iwarp_version") != iwarp.__version__:
        problems.append(
            f"exported by iwarp {meta.get('iwarp_version')}, this is iwarp {iwarp.__version__}"
        )
    for graph in GRAPHS:
        path = graph_path(build_dir, graph)
        info = meta.get("graphs", {}).get(graph, {})
        if not path.is_file():
            problems.append(f"{path.name} is missing")
        elif info.get("bytes") is not None and path.stat().st_size != info["bytes"]:
            problems.append(f"{path.name} has changed since the export")
    return problems


def _dict_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'a.b old -> new' for every leaf that differs (JSON-style values: lists == tuples)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _dict_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    norm = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [] if norm[0] == norm[1] else [f"{prefix[:-1]} {norm[0]} -> {norm[1]}"]


def _tensor_info(value_info: Any) -> dict[str, Any]:
    from onnx import helper

    t = value_info.type.tensor_type
    return {
        "name": value_info.name,
        "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
        "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim],
    }


# --------------------------------------------------------------------------- export


@dataclass(kw_only=True)
class ExportOptions:
    """`iwarp export`: `export_onnx`'s arguments as command-line options."""

    checkpoint: str | None = option(None, help="weights (default: the ones shipped in the package)")
    out: str = option(help="build folder for the graphs and metadata.json")
    opset: int = option(DEFAULT_OPSET, help="ONNX opset (23: one Attention node)")
    check: bool = option(True, flag="--no-check", help="skip the parity check vs PyTorch")


def run_export(o: ExportOptions) -> int:
    """`iwarp export`: the graphs, then one JSON line with each graph's parity error."""
    meta = export_onnx(o.checkpoint, o.out, o.opset, check=o.check)
    errors = {g: info["max_abs_error"] for g, info in meta["graphs"].items()}
    print(json.dumps({"out": str(o.out), "opset": meta["opset"], "max_abs_error": errors}))
    return 0


def export_onnx(
    checkpoint: str | Path | None = None,
    out_dir: str | Path = "build",
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Exports the three graphs of `checkpoint` (None: the shipped weights) into `out_dir`.

    Each graph is checked against PyTorch in ONNX Runtime (random inputs at batch 2, a real
    face crop at batch 1, an avatar of 3 sources for the animator); an fp32 error above
    FP32_TOLERANCE raises. metadata.json is written last, so a directory that has it holds a
    complete, checked build. Returns the metadata.
    """
    from iwarp.checkpoint import file_sha256, load_network

    if opset < MIN_OPSET:
        raise IwarpError(f"opset {opset} is too old", f"use opset {MIN_OPSET} or newer")
    net, ckpt = load_network(checkpoint, "cpu")
    config = ckpt.config
    if config.model.multi_source_mode != "attention":
        raise IwarpError(
            f"multi_source_mode {config.model.multi_source_mode!r} cannot be exported "
            "(its per-source loop fixes the number of sources)",
            "export a checkpoint trained with multi_source_mode='attention'",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA).unlink(missing_ok=True)  # the build is incomplete until it is rewritten

    def say(text: str) -> None:
        if show_progress:
            print(f"iwarp export: {text}", file=sys.stderr, flush=True)

    say(f"{ckpt.path} -> {out}/ (opset {opset}, {config.model.image_size} px)")
    graphs: dict[str, dict[str, Any]] = {}
    modules = _graph_modules(net)
    for i, graph in enumerate(GRAPHS, 1):
        t0 = time.perf_counter()
        model = _export_graph(modules[graph], graph, config, opset)
        path = graph_path(out, graph)
        _save_atomic(model, path)
        graphs[graph] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "inputs": [_tensor_info(v) for v in model.graph.input],
            "outputs": [_tensor_info(v) for v in model.graph.output],
            "max_abs_error": None,
        }
        say(f"[{i}/{len(GRAPHS)}] {path.name} exported in {time.perf_counter() - t0:.1f} s")
    attention = _attention_summary(out)
    if check:
        errors = check_parity(net, out, show_progress=show_progress)
        for graph, err in errors.items():
            graphs[graph]["max_abs_error"] = err
        bad = {g: e for g, e in errors.items() if max(e.values()) > FP32_TOLERANCE}
        if bad:
            raise RuntimeError(
                f"ONNX graphs differ from PyTorch by more than {FP32_TOLERANCE}: {bad}"
            )
    import onnx
    import onnxruntime
    import torch

    meta = {
        "format": FORMAT,
        "iwarp_version": iwarp.__version__,
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": file_sha256(ckpt.path),
        "checkpoint_step": ckpt.step,
        "config": config.to_dict(),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image_size": config.model.image_size,
        "tokens_per_source": config.model.tokens_per_source,
        "key_mask": "bool (B, NT): True where a source token may be attended to",
        "attention": attention,
        "fp32_tolerance": FP32_TOLERANCE,
        "graphs": graphs,
    }
    tmp = out / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / METADATA)
    say(f"done: {out / METADATA}")
    return meta


def _graph_modules(net: Any) -> dict[str, Any]:
    """torch modules whose forward is exactly one exported graph; their arguments are named
    and ordered as the graphs' inputs (`iwarp.graphs`), with the expression only for a network
    that has one."""
    from torch import nn

    from iwarp.model import Keypoints, SourceSet

    class KeypointsGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image):
            kp = self.net.detect(image)
            if kp.expression is None:
                return kp.points, kp.strength
            return kp.points, kp.strength, kp.expression

    class SourceEncoderGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image, keypoints, strength):
            return self.encode(image, Keypoints(keypoints, strength))

        def encode(self, image, kp):
            s = self.net.encode_with_keypoints(image, kp, image.shape[0], 1)
            return s.keys, s.values, s.pixels

    class SourceEncoderExpressionGraph(SourceEncoderGraph):
        def forward(self, image, keypoints, strength, expression):
            return self.encode(image, Keypoints(keypoints, strength, expression))

    class AnimatorGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, keypoints, strength, keys, values, pixels, key_mask):
            return self.animate(Keypoints(keypoints, strength), keys, values, pixels, key_mask)

        def animate(self, driving, keys, values, pixels, key_mask):
            # `source.keypoints` is not used per frame; all tokens share one softmax, so the
            # number of sources matters to the graph only through the flow warp's per-source
            # columns: N = tokens / T, a symbolic size (multi_source_mode="attention").
            source = SourceSet(
                keypoints=Keypoints(driving.points[:, None], driving.strength[:, None]),
                keys=keys,
                values=values,
                pixels=pixels,
                mask=key_mask,
                num_sources=keys.shape[1] // self.net.config.tokens_per_source,
                image_size=self.net.config.image_size,
            )
            return self.net.animate(source, driving)

    class AnimatorExpressionGraph(AnimatorGraph):
        def forward(self, keypoints, strength, expression, keys, values, pixels, key_mask):
            driving = Keypoints(keypoints, strength, expression)
            return self.animate(driving, keys, values, pixels, key_mask)

    expression = net.config.expression_dim > 0
    return {
        KEYPOINTS_GRAPH: KeypointsGraph().eval(),
        SOURCE_ENCODER_GRAPH: (
            SourceEncoderExpressionGraph() if expression else SourceEncoderGraph()
        ).eval(),
        ANIMATOR_GRAPH: (AnimatorExpressionGraph() if expression else AnimatorGraph()).eval(),
    }


def example_inputs(
    config: Config, graph: str, batch: int, sources: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of the right shapes and ranges for one graph (numpy, float32/bool)."""
    rng = np.random.default_rng(seed)
    spec = graph_specs(config.model)[graph]
    dims = {BATCH: batch, TOKENS: config.model.tokens_per_source * sources}
    # Ranges as the runtime sees them: images and pixel rows in [0, 1], keypoints inside the
    # frame, strengths away from 0, keys and values roughly unit-scaled.
    ranges = {
        IMAGE: (rng.uniform, 0.0, 1.0),
        KEYPOINTS: (rng.uniform, -0.8, 0.8),
        STRENGTH: (rng.uniform, 0.05, 1.0),
        PIXELS: (rng.uniform, 0.0, 1.0),
        KEYS: (rng.normal, 0.0, 1.0),  # the same draws as standard_normal
        VALUES: (rng.normal, 0.0, 1.0),
        EXPRESSION: (rng.normal, 0.0, 1.0),  # standardised openness ratios
    }
    # Drawn in one fixed order (the driving keypoints always first), so that the inputs of a
    # seed stay the same whichever graph asks (the expression last: a network without one
    # draws what it always drew).
    order = (KEYPOINTS, STRENGTH, IMAGE, KEY_MASK, KEYS, VALUES, PIXELS, EXPRESSION)
    kp_specs = graph_specs(config.model)[KEYPOINTS_GRAPH].outputs
    specs = {t.name: t for t in (*kp_specs, *spec.inputs)}
    drawn: dict[str, np.ndarray] = {}
    for name in order:
        if name not in specs:
            continue
        shape = specs[name].concrete(**dims)
        if name == KEY_MASK:
            mask = rng.uniform(size=shape) > 0.1
            mask[:, 0] = True  # every row attends to something
            drawn[name] = mask
        else:
            draw, low, high = ranges[name]
            drawn[name] = draw(low, high, shape).astype(specs[name].dtype)
    return {n: drawn[n] for n in spec.input_names}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter's warnings and log lines are about its internals, not ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _export_graph(module: Any, graph: str, config: Config, opset: int) -> Any:
    import torch
    from torch.export import Dim

    spec = graph_specs(config.model)[graph]
    dims = {BATCH: Dim(BATCH), TOKENS: Dim(TOKENS)}  # one Dim object per symbolic name
    sources = _EXAMPLE_SOURCES if graph == ANIMATOR_GRAPH else 1
    feeds = example_inputs(config, graph, _EXAMPLE_BATCH, sources)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    dynamic = {
        t.name: {axis: dims[name] for axis, name in t.dynamic_axes.items()} for t in spec.inputs
    }
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
            report=False,
        )
    model = program.model_proto
    model.doc_string = (
        f"iwarp {iwarp.__version__} {graph}: {config.name} {config.model.image_size}px"
    )
    if graph == ANIMATOR_GRAPH:
        _tag_attention(model, config.model.grid_size**2)
    import onnx

    onnx.checker.check_model(model)
    return model


def _namespace(node: Any) -> str:
    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "namespace":
            return prop.value
    return ""


def _tag_attention(model: Any, num_queries: int) -> None:
    """Names the attention subgraph so later rewrites find it; see the module docstring."""
    from onnx import TensorProto, helper

    graph = model.graph
    fused = [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if len(fused) > 1:
        raise RuntimeError(f"expected one Attention node in animator.onnx, found {len(fused)}")
    if fused:
        node = fused[0]
        node.name = ATTENTION_NODE
        node.doc_string = (
            "iwarp.model.warp.attention: softmax(Q K^T / sqrt(d) masked) [V | P | K] over "
            "all source tokens + extra tokens"
        )
        if len(node.input) > 3 and node.input[3]:
            shape = f"{ATTENTION_SCOPE}/mask_shape"
            expanded = f"{ATTENTION_SCOPE}/mask"
            graph.initializer.append(
                helper.make_tensor(shape, TensorProto.INT64, [4], [1, 1, num_queries, 1])
            )
            expand = helper.make_node(
                "Expand", [node.input[3], shape], [expanded], name=f"{ATTENTION_SCOPE}/Expand"
            )
            node.input[3] = expanded
            index = list(graph.node).index(node)
            graph.node.insert(index, expand)
        return
    # Decomposed (opset < 23): every node the exporter made from scaled_dot_product_attention.
    parts = [n for n in graph.node if "scaled_dot_product_attention" in _namespace(n)]
    if not any(n.op_type == "Softmax" for n in parts):
        raise RuntimeError("no attention subgraph found in animator.onnx")
    for i, node in enumerate(parts):
        node.name = f"{ATTENTION_SCOPE}/{node.op_type}_{i}"


def _attention_summary(build_dir: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(graph_path(build_dir, ANIMATOR_GRAPH)), load_external_data=False)
    nodes = [n for n in model.graph.node if n.name.startswith(ATTENTION_SCOPE + "/")]
    return {
        "graph": ANIMATOR_GRAPH,
        "scope": ATTENTION_SCOPE,
        "fused": any(n.op_type == "Attention" for n in nodes),
        "nodes": [{"name": n.name, "op_type": n.op_type} for n in nodes],
    }


def _save_atomic(model: Any, path: Path) -> None:
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- parity


def ort_session(
    path: str | Path,
    threads: int = 0,
    providers: list[str] | None = None,
    basic_optimizations: bool = False,
) -> Any:
    """An ONNX Runtime session as the backends make it (all optimisations, sequential).

    `basic_optimizations`: no fusions beyond the basic ones, for FP8 Q/DQ graphs, which ONNX
    Runtime's CPU kernels cannot fuse and only emulate (calibration measures their accuracy).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = "ORT_ENABLE_BASIC" if basic_optimizations else "ORT_ENABLE_ALL"
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Idle worker threads must sleep, not spin: on a 2-core machine spinning threads steal the
    # cores from the other stages (face tracking, the next graph). Measured on the tiny model at
    # 256 px, 2 threads, keypoints + animator: 40.9 ms spinning, 20.8 ms without.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Subnormal floats (the peaked attention softmax makes them) are flushed to zero on the
    # pool threads: Intel cores are several times slower on them (iwarp.runtime.backends.
    # denormals; the backends also flush the calling thread).
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    providers = providers or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        # ORT 1.31's QDQ propagation can move a QuantizeLinear so that its output type and
        # zero point disagree (microsoft/onnxruntime#25526, #27845); the graph is fine without
        # that one optimisation.
        if "zero_point" not in str(exc):
            raise
        return ort.InferenceSession(
            str(path), so, providers=providers, disabled_optimizers=["QDQPropagationTransformer"]
        )


def packaged_face_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A face crop of the packaged photo (1, 3, S, S) and 3 moved copies as an avatar (3, ...)."""
    from iwarp.face import FaceDetector, crop_and_resize, face_crop_box
    from iwarp.media import read_image, synthetic_driving_frames
    from iwarp.paths import DEFAULT_AVATAR

    photo = read_image(DEFAULT_AVATAR)
    with FaceDetector() as detector:
        face = detector.detect(photo)
    if face is not None:
        crop = crop_and_resize(photo, face_crop_box(face), size)
    else:  # cannot happen with the packaged photo; keep the check usable anyway
        crop = synthetic_driving_frames(photo, 1, size)[0]
    moved = synthetic_driving_frames(crop, 8, size)
    return image_to_tensor(crop), image_to_tensor(np.stack([moved[1], moved[3], moved[6]]))


def check_parity(
    net: Any, build_dir: str | Path, show_progress: bool = True, threads: int = 0
) -> dict[str, dict[str, float]]:
    """Max abs error of each graph in ONNX Runtime against `net`, on random and real inputs."""
    import torch

    config = Config(model=net.config)
    specs = graph_specs(net.config)
    modules = _graph_modules(net)
    sessions = {g: ort_session(graph_path(build_dir, g), threads) for g in GRAPHS}

    def compare(graph: str, feeds: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
        with torch.no_grad():
            ref = modules[graph](*(torch.from_numpy(feeds[n]) for n in specs[graph].input_names))
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = sessions[graph].run(None, feeds)
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
        return err, ref

    errors: dict[str, dict[str, float]] = {g: {} for g in GRAPHS}
    for graph in GRAPHS:
        sources = 3 if graph == ANIMATOR_GRAPH else 1
        errors[graph]["random"] = compare(graph, example_inputs(config, graph, 2, sources))[0]

    # Real inputs: the packaged face, detected, encoded as an avatar of 3 sources, animated.
    crop, avatar = packaged_face_images(net.config.image_size)
    err, outputs = compare(KEYPOINTS_GRAPH, {IMAGE: crop})
    driving = pose_of(specs[KEYPOINTS_GRAPH].named_outputs(outputs))
    errors[KEYPOINTS_GRAPH]["real"] = err
    worst, rows = 0.0, []
    with torch.no_grad():
        kp = net.detect(torch.from_numpy(avatar))
    sources_pose = Pose(kp.points, kp.strength, kp.expression).map(lambda t: t.numpy())
    for i in range(avatar.shape[0]):
        feeds = {IMAGE: avatar[i : i + 1], **pose_feeds(sources_pose.select(i))}
        err, ref = compare(SOURCE_ENCODER_GRAPH, feeds)
        worst = max(worst, err)
        rows.append(ref)
    errors[SOURCE_ENCODER_GRAPH]["real"] = worst
    keys, values, pixels = (np.concatenate([r[j] for r in rows], axis=1) for j in range(3))
    mask = np.ones(keys.shape[:2], dtype=bool)
    feeds = {**pose_feeds(driving), KEYS: keys, VALUES: values, PIXELS: pixels, KEY_MASK: mask}
    errors[ANIMATOR_GRAPH]["real"] = compare(ANIMATOR_GRAPH, feeds)[0]
    if show_progress:
        for graph in GRAPHS:
            e = errors[graph]
            print(
                f"iwarp export: {graph}.onnx vs PyTorch max abs error: random {e['random']:.2e}, "
                f"real {e['real']:.2e}",
                file=sys.stderr,
                flush=True,
            )
    return errors
