"""Q/DQ graphs from the plain FP32 graphs: NVIDIA ModelOpt's ONNX PTQ, or ONNX Runtime's.

TensorRT 11 takes INT8/FP8 only from Q/DQ nodes in the ONNX graph (DESIGN.md section 4).
Two quantizers write them, both calibrating on the CPU with ONNX Runtime:

- ``modelopt``: `modelopt.onnx.quantization.quantize(quantize_mode="int8"|"fp8",
  calibration_eps=["cpu"])`, NVIDIA's TensorRT-oriented placement (Q/DQ on the inputs of
  Conv/Gemm/MatMul/..., signed symmetric INT8, per-channel weights). The only FP8 path.
  Everything it leaves unquantized stays FP32 here (``high_precision_dtype="fp32"``, since
  the same files feed ONNX Runtime on the CPU); ModelOpt's default would cast it to FP16.
- ``ort``: `onnxruntime.quantization.quantize_static` in QDQ format, per-channel INT8
  weights, signed symmetric INT8 activations (what TensorRT accepts), MinMax ranges by
  default, collected in slices of <= 16 inputs so that memory stays bounded. The fallback
  when ModelOpt is not installed.

Both run on the plain graphs, before the attention-plugin rewrite (that rewrite keeps the
Q/DQ nodes around the attention node as they are).

Exclusions: `GROUPS` names the layers of each graph that may be kept in FP32 (found by the
module path that the exporter leaves in each node's ``namespace`` metadata), so a choice
survives a re-export. `iwarp.calibration.pipeline` measures which of them pay off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from iwarp.engine_build.export import ATTENTION_SCOPE
from iwarp.engine_build.fp16 import quiet_lief_at_exit
from iwarp.errors import IwarpError
from iwarp.graphs import ANIMATOR_GRAPH, KEYPOINTS_GRAPH, SOURCE_ENCODER_GRAPH

MODES = ("int8", "fp8")
QUANTIZERS = ("modelopt", "ort")
MODELOPT_INSTALL = (
    "pip install nvidia-modelopt==0.47.0 onnxslim lief polygraphy "
    "(not nvidia-modelopt[onnx]: that extra swaps in numpy 2, onnx 1.21 and onnxruntime-gpu)"
)
# ModelOpt's default INT8/FP8 calibration, and the fallback's (see the module docstring).
DEFAULT_METHOD = {"modelopt": {"int8": "entropy", "fp8": "max"}, "ort": {"int8": "minmax"}}
ORT_METHODS = ("minmax", "entropy", "percentile")


# --------------------------------------------------------------------------- availability


def modelopt_status() -> tuple[bool, str]:
    """(importable, version or why not) for ModelOpt's ONNX quantizer."""
    try:
        with _quiet():
            import modelopt
            from modelopt.onnx.quantization import quantize  # noqa: F401
    except Exception as exc:  # ImportError, or one of its optional dependencies missing
        return False, f"{type(exc).__name__}: {exc}"
    quiet_lief_at_exit()
    return True, str(getattr(modelopt, "__version__", "?"))


def choose_quantizer(requested: str, mode: str) -> tuple[str, str]:
    """(quantizer, why) for `requested` in auto/modelopt/ort; IwarpError when it cannot run."""
    if mode not in MODES:
        raise IwarpError(f"unknown quantization mode {mode!r}", f"choose one of {', '.join(MODES)}")
    if requested not in ("auto", *QUANTIZERS):
        raise IwarpError(f"unknown quantizer {requested!r}", "choose auto, modelopt or ort")
    ok, detail = modelopt_status()
    if mode == "fp8":
        if requested == "ort":
            raise IwarpError("FP8 needs NVIDIA ModelOpt", "use --quantizer modelopt (or auto)")
        if not ok:
            raise IwarpError(f"FP8 quantization needs NVIDIA ModelOpt ({detail})", MODELOPT_INSTALL)
        return "modelopt", f"ModelOpt {detail}"
    if requested == "modelopt" and not ok:
        raise IwarpError(f"NVIDIA ModelOpt is not usable here ({detail})", MODELOPT_INSTALL)
    if requested == "ort":
        return "ort", "chosen with --quantizer ort"
    if ok:
        return "modelopt", f"ModelOpt {detail}"
    return "ort", f"ModelOpt is not usable ({detail}): fell back to onnxruntime.quantize_static"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- data reader


class FeedReader(CalibrationDataReader):
    """Calibration inputs, one dict per run, for ModelOpt and ONNX Runtime's calibrators.

    Holds the dicts (whose arrays are views of the calibration cache), so `rewind` is free;
    ModelOpt reads the data several times (shape probes, then calibration).
    """

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        if not self.feeds:
            raise IwarpError("no calibration inputs", "calibration needs at least one frame")
        self._it = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.feeds[0]

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """ONNX Runtime's strided calibration reads the data in slices (bounded memory)."""
        self._it = iter(self.feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self.feeds)


# --------------------------------------------------------------------------- exclusions


def node_module(node: Any) -> str:
    """The innermost `net.*` module path the exporter recorded for a node ('' if none)."""
    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "namespace":
            parts = [p.split(":")[0].strip() for p in prop.value.split("/")]
            mods = [p for p in parts if p.startswith("net")]
            return mods[-1] if mods else ""
    return ""


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class ExclusionGroup:
    """Layers of one graph that can be kept in FP32 together."""

    graph: str
    name: str
    description: str
    modules: tuple[str, ...] = ()  # these modules and everything under them
    local_ops: tuple[tuple[str, str], ...] = ()  # (module exactly, op type)
    name_prefix: str = ""  # nodes whose name starts with this

    def module_paths(self) -> set[str]:
        """Every module path this group names (its modules and its local ops' modules)."""
        return set(self.modules) | {module for module, _ in self.local_ops if module}

    def matches(self, node: Any) -> bool:
        module = node_module(node)
        if self.modules and _under(module, self.modules):
            return True
        if (module, node.op_type) in self.local_ops:
            return True
        return bool(self.name_prefix) and node.name.startswith(self.name_prefix)


def _maps(graph: str) -> ExclusionGroup:
    ops = ("Sub", "Mul", "ReduceSum", "Div", "Exp")
    return ExclusionGroup(
        graph,
        "keypoint_maps",
        "Gaussian keypoint maps (elementwise, from the keypoints)",
        local_ops=tuple(("", op) for op in ops),
    )


# Module paths as the exporter records them: `net.` + the network's own module names.
# tests/test_calibration.py checks each against the shipped network, so a renamed module fails
# there instead of silently matching no node.
KP = "net.keypoint_detector"
GROUPS: dict[str, tuple[ExclusionGroup, ...]] = {
    KEYPOINTS_GRAPH: (
        ExclusionGroup(
            KEYPOINTS_GRAPH,
            "input",
            "first conv on the image (and its pooling)",
            modules=(f"{KP}.unet.stem",),
            local_ops=((KP, "AveragePool"),),
        ),
        ExclusionGroup(
            KEYPOINTS_GRAPH,
            "heatmap",
            "heatmap conv, the input of the keypoint softmax",
            modules=(f"{KP}.heatmap",),
        ),
        ExclusionGroup(
            KEYPOINTS_GRAPH,
            "softargmax",
            "spatial softmax and soft-argmax",
            local_ops=tuple((KP, op) for op in ("Div", "Softmax", "Mul", "ReduceSum")),
        ),
        ExclusionGroup(
            KEYPOINTS_GRAPH,
            "strength",
            "strength head (pool, linear, sigmoid)",
            modules=(f"{KP}.strength",),
            local_ops=((KP, "ReduceMean"), (KP, "Sigmoid")),
        ),
    ),
    SOURCE_ENCODER_GRAPH: (
        _maps(SOURCE_ENCODER_GRAPH),
        ExclusionGroup(
            SOURCE_ENCODER_GRAPH,
            "input",
            "first convs on the image (key and value encoders)",
            modules=("net.key_encoder.unet.stem", "net.value_encoder.body.0"),
            local_ops=(("", "AveragePool"),),
        ),
        ExclusionGroup(
            SOURCE_ENCODER_GRAPH,
            "key_out",
            "last convs of the key encoder",
            modules=("net.key_encoder.to_grid", "net.key_encoder.out"),
        ),
        ExclusionGroup(
            SOURCE_ENCODER_GRAPH,
            "value_out",
            "last conv of the value encoder",
            modules=("net.value_encoder.out",),
        ),
        ExclusionGroup(
            SOURCE_ENCODER_GRAPH,
            "key_proj",
            "key projection (+ positional encoding)",
            modules=("net.warp.key_proj",),
            local_ops=(("", "Add"),),
        ),
    ),
    ANIMATOR_GRAPH: (
        _maps(ANIMATOR_GRAPH),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "query_out",
            "last convs of the query encoder",
            modules=("net.query_encoder.to_grid", "net.query_encoder.out"),
        ),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "query_proj",
            "query projection (+ positional encoding)",
            modules=("net.warp.query_proj",),
            local_ops=(("", "Add"),),
        ),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "attention",
            "the ONNX Attention node (and its mask)",
            name_prefix=f"{ATTENTION_SCOPE}/",
        ),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "residual_mlp",
            "residual branch MLP and its sum with A V",
            modules=("net.warp.residual",),
            local_ops=(("net.warp", "Add"),),
        ),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "generator_full_res",
            "the generator's last upsampling conv (full resolution)",
            modules=("net.generator.up.2",),
        ),
        ExclusionGroup(
            ANIMATOR_GRAPH,
            "generator_out",
            "the generator's final conv and sigmoid",
            modules=("net.generator.out",),
            local_ops=(("net.generator", "Sigmoid"),),
        ),
    ),
}


def group(graph: str, name: str) -> ExclusionGroup:
    for g in GROUPS.get(graph, ()):
        if g.name == name:
            return g
    known = ", ".join(g.name for g in GROUPS.get(graph, ()))
    raise IwarpError(f"no exclusion group {name!r} for {graph}", f"choose from: {known}")


def group_nodes(model: Any, groups: Iterable[ExclusionGroup]) -> list[str]:
    """Names of the nodes of `model` (an onnx.ModelProto) that any of `groups` matches."""
    groups = list(groups)
    return [n.name for n in model.graph.node if any(g.matches(n) for g in groups)]


# --------------------------------------------------------------------------- quantize


@dataclass
class QuantizeResult:
    path: Path
    quantizer: str
    mode: str
    method: str
    excluded_groups: list[str]
    excluded_nodes: list[str]
    qdq_nodes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "quantizer": self.quantizer,
            "mode": self.mode,
            "calibration_method": self.method,
            "excluded_groups": self.excluded_groups,
            "excluded_nodes": self.excluded_nodes,
            "qdq_nodes": self.qdq_nodes,
            "seconds": round(self.seconds, 1),
        }


def quantize_graph(
    src: str | Path,
    dst: str | Path,
    graph: str,
    feeds: FeedReader,
    mode: str = "int8",
    quantizer: str = "modelopt",
    exclude: Iterable[str] = (),
    method: str | None = None,
    show_progress: bool = True,
) -> QuantizeResult:
    """A Q/DQ copy of `src` at `dst`, calibrated with `feeds`; `exclude` names GROUPS."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    groups = [group(graph, name) for name in exclude]
    nodes = group_nodes(model, groups)
    method = method or DEFAULT_METHOD.get(quantizer, {}).get(mode)
    if method is None:
        raise IwarpError(f"{quantizer} cannot quantize to {mode}", "use --quantizer modelopt")
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    feeds.rewind()
    # Both quantizers work on a copy: ModelOpt rewrites its input file in place (it runs
    # onnx.shape_inference.infer_shapes_path on it), which would break the FP32 build's
    # recorded sizes, and both leave intermediate files next to their output.
    with tempfile.TemporaryDirectory(prefix="iwarp-quant-", dir=dst.parent) as work:
        copy, tmp = Path(work) / src.name, Path(work) / f"{graph}.{mode}.onnx"
        shutil.copyfile(src, copy)
        with _quiet_tools(show_progress):
            if quantizer == "modelopt":
                _modelopt(copy, tmp, mode, feeds, nodes, method)
            elif quantizer == "ort":
                _ort(copy, tmp, mode, feeds, nodes, method)
            else:
                raise IwarpError(f"unknown quantizer {quantizer!r}", "choose modelopt or ort")
        if not tmp.is_file():
            raise RuntimeError(f"{quantizer} wrote no graph for {src}")
        out = onnx.load(str(tmp))
        onnx.checker.check_model(out)
        if mode == "int8":
            _check_loads(tmp, quantizer)
        os.replace(tmp, dst)
    seconds = time.perf_counter() - t0
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in out.graph.node)
    return QuantizeResult(dst, quantizer, mode, method, list(exclude), nodes, qdq, seconds)


def _modelopt(src: Path, dst: Path, mode: str, feeds: FeedReader, nodes: list[str], method: str):
    from modelopt.onnx.quantization import quantize

    with _ort_unpatched_after():
        quantize(
            onnx_path=str(src),
            quantize_mode=mode,
            calibration_data_reader=feeds,
            calibration_method=method,
            calibration_eps=["cpu"],
            nodes_to_exclude=[re.escape(n) + "$" for n in nodes],
            high_precision_dtype="fp32",
            output_path=str(dst),
            log_level="ERROR",
        )


_MISSING = object()


@contextlib.contextmanager
def _ort_unpatched_after() -> Iterator[None]:
    """Undoes what ModelOpt does to onnxruntime.quantization for the rest of the process.

    ModelOpt (0.47, `ort_utils.configure_ort` / `ort_patching.patch_ort_modules`) replaces
    calibrator methods and edits ORT's op registries in place; left so, a later
    `quantize_static` (the ort quantizer) misses ranges ("Quantization parameters are not
    specified for param ...").
    """
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer, registry

    targets = [
        (calibrate.MinMaxCalibrater, ("augment_graph", "collect_data", "compute_data",
                                      "merge_range")),
        (calibrate.HistogramCalibrater, ("augment_graph", "collect_data")),
        (calibrate.HistogramCollector, ("collect", "collect_value", "collect_absolute_value")),
        (calibrate.CalibraterBase, ("__init__", "create_inference_session",
                                    "select_tensors_to_calibrate")),
        (qdq_quantizer.QDQQuantizer, ("check_opset_version",)),
        (base_quantizer.BaseQuantizer, ("adjust_tensor_ranges",)),
        (calibrate, ("create_calibrator",)),
    ]  # fmt: skip
    saved = [(obj, name, vars(obj).get(name, _MISSING)) for obj, names in targets for name in names]
    tables = [(t, dict(t)) for t in (registry.QDQRegistry, registry.QLinearOpsRegistry)]
    try:
        yield
    finally:
        for obj, name, value in saved:
            if value is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)
        for table, copy in tables:
            table.clear()
            table.update(copy)


def _ort(src: Path, dst: Path, mode: str, feeds: FeedReader, nodes: list[str], method: str):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if mode != "int8":
        raise IwarpError("onnxruntime's quantizer makes INT8 only here", MODELOPT_INSTALL)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise IwarpError(f"unknown calibration method {method!r}", f"choose {', '.join(methods)}")
    import onnx

    # ORT's quantizer takes op type "Attention" for its com.microsoft contrib op and gives the
    # ONNX Attention node's inputs mismatched Q/DQ types: leave that node FP32 (as ModelOpt).
    model = onnx.load(str(src), load_external_data=False)
    op_types = sorted({n.op_type for n in model.graph.node} - {"Attention"})
    with tempfile.TemporaryDirectory(prefix="iwarp-ortq-") as tmp:
        # The quantizer wants shapes everywhere; its own pre-processing adds them.
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        except Exception:  # shape inference is a help, not a requirement
            pre = src
        quantize_static(
            str(pre),
            str(dst),
            feeds,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            op_types_to_quantize=op_types,
            nodes_to_exclude=nodes,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: signed INT8, zero point 0
                "WeightSymmetric": True,
                # Ranges are collected (and activations freed) every `stride` inputs; ORT's
                # CalibMaxIntermediateOutputs would drop all but the last slice (ORT 1.31).
                "CalibStridedMinMax": _stride(len(feeds)),
                "CalibTensorRangeSymmetric": True,
            },
        )


class UnloadableGraphError(IwarpError):
    """ONNX Runtime refuses a quantized graph (its optimiser trips over the Q/DQ placement)."""


def _check_loads(path: Path, quantizer: str) -> None:
    """Builds the session the ONNX Runtime backend would (all optimisations on).

    ORT 1.31's QDQ propagation can make a QuantizeLinear whose output_dtype and zero point
    disagree (microsoft/onnxruntime#25526, #27845); `ort_session` then retries without that
    optimisation, and what still fails to load is reported here.
    """
    import onnxruntime as ort

    from iwarp.engine_build.export import ort_session

    try:
        ort_session(path, threads=1)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise UnloadableGraphError(
            f"ONNX Runtime {ort.__version__} cannot load this {quantizer} Q/DQ graph ({first})",
            "choose other layers to keep FP32 (--exclude), or use --quantizer modelopt",
        ) from exc


def _stride(count: int, most: int = 16) -> int:
    """The largest divisor of `count` up to `most` (ORT needs the slices to fit exactly)."""
    return max(d for d in range(1, min(most, count) + 1) if count % d == 0)


@contextlib.contextmanager
def _quiet_tools(show_progress: bool) -> Iterator[None]:
    """The quantizers log per-tensor INFO lines and warnings meant for their developers."""
    loggers = [logging.getLogger(n) for n in ("modelopt", "root", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if show_progress:
                yield
            else:
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def describe_groups(graph: str) -> list[dict[str, str]]:
    return [{"name": g.name, "description": g.description} for g in GROUPS.get(graph, ())]
