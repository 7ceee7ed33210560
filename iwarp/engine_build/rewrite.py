"""The TensorRT plugin rewrite: the animator's attention subgraph -> one `IWarpAttention` node.

`iwarp.engine_build.export` writes the attention of `iwarp.model.warp.attention` either as one
ONNX `Attention` node named `ATTENTION_NODE` (opset 23, the default) or, at lower opsets, as a
MatMul/Softmax/MatMul decomposition whose nodes are named under `ATTENTION_SCOPE`. Both read
4-D tensors (B, 1, N, .) made by Unsqueeze from the network's 3-D ones, and a bool key mask
expanded to (B, 1, Nq, NT). `rewrite_attention` replaces that subgraph with

    IWarpAttention(q (B, Nq, d), k (B, NT, d), v (B, NT, dv), mask (B, NT) float32) -> (B, Nq, dv)
        domain "trt.plugins" (as NVIDIA ModelOpt marks TensorRT plugin nodes; the ONNX checker
        accepts a declared custom domain), attributes plugin_version "1", plugin_namespace "",
        scale (float, 1/sqrt(d))

which TensorRT's ONNX parser maps to the plugin of that name in the registry (plugins/tensorrt,
loaded by `iwarp.engine_build.plugin.load_plugin`). The mask becomes float32, nonzero = attend:
the plugin's mask form (TensorRT plugins cannot take bool tensors everywhere).

Two CPU ways to execute a rewritten graph (tests, and checks before a TensorRT build):
- `expand_plugin_nodes`: each IWarpAttention node back to standard ONNX ops;
- `ort_custom_op_model` + `register_ort_reference_op`: the node runs in ONNX Runtime as a
  Python custom op of onnxruntime-extensions, calling `attention_reference` (NumPy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iwarp.engine_build.export import ATTENTION_NODE, ATTENTION_SCOPE
from iwarp.errors import CheckpointError, IwarpError

PLUGIN_NAME = "IWarpAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
PLUGIN_DOMAIN = "trt.plugins"
ORT_CUSTOM_DOMAIN = "ai.onnx.contrib"  # where onnxruntime-extensions' Python ops live
PLUGIN_NODE = f"{ATTENTION_SCOPE}/{PLUGIN_NAME}"

_LAYOUT_OPS = ("Mul", "Div", "Transpose", "Reshape", "Cast", "Identity")


# --------------------------------------------------------------------------- the math


def attention_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """What the kernel/plugin computes, in float64: softmax(q k^T * scale, mask) v.

    q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv), mask (B, Nk) or (1, Nk), nonzero = attend;
    scale None or <= 0 means 1/sqrt(d). Rows whose keys are all masked are zeros.
    """
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if scale is None or scale <= 0:
        scale = 1.0 / math.sqrt(q64.shape[-1])
    out = np.zeros((*q64.shape[:2], v64.shape[-1]), dtype=np.float64)
    if k64.shape[1] == 0:
        return out
    logits = np.einsum("bqd,bkd->bqk", q64, k64) * scale
    if mask is not None:
        allowed = np.broadcast_to(np.asarray(mask) != 0, (q64.shape[0], k64.shape[1]))
        logits = np.where(allowed[:, None, :], logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(logits - top)
    total = p.sum(axis=-1, keepdims=True)
    np.divide(np.einsum("bqk,bkv->bqv", p, v64), total, out=out, where=total > 0)
    return out


# --------------------------------------------------------------------------- the rewrite


@dataclass
class AttentionSite:
    """Where the attention is in a graph (onnx-graphsurgeon objects)."""

    kind: str  # "fused" (one Attention node) or "decomposed"
    nodes: list[Any]  # the nodes to drop
    q: Any  # 4-D or 3-D tensors as the subgraph reads them
    k: Any
    v: Any
    mask: Any | None
    output: Any
    scale: float | None  # None: not given in the graph, the default 1/sqrt(d)


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:  # pragma: no cover - an install problem
        raise IwarpError(
            "onnx-graphsurgeon is not installed",
            "pip install onnx-graphsurgeon (or pip install 'iwarp[tensorrt]')",
        ) from exc
    return gs


def _const_values(tensor: Any) -> np.ndarray | None:
    gs = _gs()
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def _producer(tensor: Any) -> Any | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _int_list(tensor: Any | None, node: Any | None = None, attr: str = "axes") -> list[int] | None:
    if tensor is not None:
        values = _const_values(tensor)
        return None if values is None else [int(x) for x in np.atleast_1d(values)]
    if node is not None and attr in node.attrs:
        return [int(x) for x in node.attrs[attr]]
    return None


def find_attention(graph: Any) -> AttentionSite:
    """The attention subgraph of an exported animator graph (onnx-graphsurgeon Graph)."""
    fused = [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]
    named = [n for n in fused if n.name == ATTENTION_NODE]
    if named or fused:
        if len(named) != 1 and len(fused) != 1:
            raise CheckpointError(
                f"found {len(fused)} Attention nodes, expected one", "re-export the graphs"
            )
        return _fused_site(named[0] if named else fused[0])
    scoped = [n for n in graph.nodes if n.name.startswith(ATTENTION_SCOPE + "/")]
    if any(n.op == "Softmax" for n in scoped):
        return _decomposed_site(scoped)
    if any(n.op == PLUGIN_NAME for n in graph.nodes):
        raise CheckpointError(
            "the graph already has an IWarpAttention node", "rewrite the original export"
        )
    raise CheckpointError(
        "no attention subgraph found (neither an Attention node nor nodes named "
        f"{ATTENTION_SCOPE}/...)",
        "export the animator with iwarp.engine_build.export (it names the attention)",
    )


def _fused_site(node: Any) -> AttentionSite:
    attrs = node.attrs
    for name in ("is_causal", "softcap", "qk_matmul_output_mode"):
        if float(attrs.get(name, 0) or 0) != 0:
            raise CheckpointError(
                f"Attention node {node.name} has {name}={attrs[name]}", "not the iwarp attention"
            )
    extra_inputs = [t for t in node.inputs[4:] if t is not None and t.name]
    extra_outputs = [t for t in node.outputs[1:] if t.outputs]
    if extra_inputs or extra_outputs:
        raise CheckpointError(
            f"Attention node {node.name} uses a KV cache", "not the iwarp attention"
        )
    for name in ("q_num_heads", "kv_num_heads"):
        if int(attrs.get(name, 1) or 1) != 1:
            raise CheckpointError(f"Attention node {node.name} has several heads", "one head only")
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    scale = attrs.get("scale")
    return AttentionSite(
        "fused",
        [node],
        *node.inputs[:3],
        mask,
        node.outputs[0],
        float(scale) if scale else None,
    )


def _decomposed_site(scoped: list[Any]) -> AttentionSite:
    names = {id(n) for n in scoped}

    def inside(tensor: Any) -> bool:
        p = _producer(tensor)
        return p is not None and id(p) in names

    softmax = next(n for n in scoped if n.op == "Softmax")
    # Forward from the softmax (through IsNaN/Where clean-up) to the MatMul with V.
    final, frontier = None, [softmax.outputs[0]]
    while frontier and final is None:
        tensor = frontier.pop()
        for consumer in tensor.outputs:
            if id(consumer) not in names:
                continue
            if consumer.op == "MatMul":
                final = consumer
                break
            frontier.extend(consumer.outputs)
    if final is None:
        raise CheckpointError("decomposed attention without a MatMul after its Softmax", "")
    v_in = next(t for t in final.inputs if not inside(t) or _producer(t).op in _LAYOUT_OPS)
    # Backward from the softmax: Add(MatMul(Q', K'^T), mask bias) or Where(mask, logits, -inf).
    scores = _producer(softmax.inputs[0])
    first = scores
    mask_in = None
    while first is not None and first.op != "MatMul":
        if first.op in ("Add", "Where"):
            for t in first.inputs:
                src = _walk_back(t, names)
                outside = _producer(src) is None or id(_producer(src)) not in names
                if outside and _const_values(src) is None:
                    mask_in = mask_in or src
            first = next(
                (_producer(t) for t in first.inputs if inside(t) and _reaches_matmul(t, names)),
                None,
            )
        else:
            first = _producer(first.inputs[0]) if inside(first.inputs[0]) else None
    if first is None:
        raise CheckpointError("decomposed attention without a Q K^T MatMul", "")
    scale_q, q_in = _walk_scaled(first.inputs[0], names)
    scale_k, k_in = _walk_scaled(first.inputs[1], names)
    scale = None if scale_q is None or scale_k is None else scale_q * scale_k
    return AttentionSite(
        "decomposed", scoped, q_in, k_in, _walk_back(v_in, names), mask_in, final.outputs[0], scale
    )


def _walk_back(tensor: Any, names: set[int]) -> Any:
    """Back through layout ops of the scope to the tensor the scope reads."""
    p = _producer(tensor)
    while p is not None and id(p) in names and p.op in (*_LAYOUT_OPS, "Where", "Not", "Cast"):
        tensor = next((t for t in p.inputs if _const_values(t) is None), p.inputs[0])
        p = _producer(tensor)
    return tensor


def _reaches_matmul(tensor: Any, names: set[int]) -> bool:
    p = _producer(tensor)
    while p is not None and id(p) in names:
        if p.op == "MatMul":
            return True
        if p.op not in _LAYOUT_OPS:
            return False
        p = _producer(p.inputs[0])
    return False


def _walk_scaled(tensor: Any, names: set[int]) -> tuple[float | None, Any]:
    """Back through Mul/Div-by-constant and layout ops; the product of the constant factors."""
    factor: float | None = 1.0
    p = _producer(tensor)
    while p is not None and id(p) in names and p.op in _LAYOUT_OPS:
        if p.op in ("Mul", "Div"):
            consts = [_const_values(t) for t in p.inputs]
            data = [t for t, c in zip(p.inputs, consts, strict=True) if c is None]
            known = [c for c in consts if c is not None]
            if len(data) != 1:
                factor = None
                data = [p.inputs[0]]
            elif known and factor is not None:
                c = float(np.asarray(known[0]).reshape(-1)[0])
                factor *= c if p.op == "Mul" else 1.0 / c
            elif not known:
                factor = None
            tensor = data[0]
        else:
            tensor = p.inputs[0]
        p = _producer(tensor)
    return factor, tensor


def _squeeze_axis1(graph: Any, tensor: Any, tag: str) -> Any:
    """The 3-D tensor under a (B, 1, N, C) one: the Unsqueeze's input, else a new Squeeze."""
    gs = _gs()
    p = _producer(tensor)
    if p is not None and p.op == "Unsqueeze":
        axes = _int_list(p.inputs[1] if len(p.inputs) > 1 else None, p)
        if axes in ([1], [-3]):
            return p.inputs[0]
    shape = tensor.shape
    if shape is not None and len(shape) == 3:
        return tensor
    out = gs.Variable(f"{ATTENTION_SCOPE}/{tag}_3d", dtype=tensor.dtype)
    axes = gs.Constant(f"{ATTENTION_SCOPE}/{tag}_axes", np.array([1], dtype=np.int64))
    graph.nodes.append(
        gs.Node("Squeeze", f"{ATTENTION_SCOPE}/{tag}_Squeeze", inputs=[tensor, axes], outputs=[out])
    )
    return out


def _key_mask_2d(graph: Any, mask: Any) -> Any:
    """(B, NT) from the mask the subgraph reads: the bool (B, NT) before Unsqueeze/Expand, else
    row 0 of the (B, 1, Nq|1, NT) mask (the iwarp mask does not depend on the query)."""
    gs = _gs()
    t = mask
    for _ in range(4):
        p = _producer(t)
        if p is None or p.op not in ("Expand", "Unsqueeze", "Identity"):
            break
        t = p.inputs[0]
        if t.shape is not None and len(t.shape) == 2:
            return t
    if mask.shape is not None and len(mask.shape) == 2:
        return mask
    if mask.shape is not None and len(mask.shape) != 4:
        raise CheckpointError(f"attention mask of rank {len(mask.shape)}", "expected (B,1,Nq,NT)")
    row = gs.Variable(f"{ATTENTION_SCOPE}/mask_row", dtype=mask.dtype)
    out = gs.Variable(f"{ATTENTION_SCOPE}/mask_2d", dtype=mask.dtype)
    zero = gs.Constant(f"{ATTENTION_SCOPE}/mask_row_index", np.array(0, dtype=np.int64))
    axes = gs.Constant(f"{ATTENTION_SCOPE}/mask_axes", np.array([1], dtype=np.int64))
    graph.nodes += [
        gs.Node("Gather", f"{ATTENTION_SCOPE}/mask_Gather", {"axis": 2}, [mask, zero], [row]),
        gs.Node("Squeeze", f"{ATTENTION_SCOPE}/mask_Squeeze", inputs=[row, axes], outputs=[out]),
    ]
    return out


def _float_mask(graph: Any, mask: Any) -> Any:
    """float32 (B, NT), 1 = attend, from a bool mask or an additive 0/-inf float mask."""
    gs = _gs()
    out = gs.Variable(f"{ATTENTION_SCOPE}/mask_f32", dtype=np.float32)
    dtype = np.dtype(mask.dtype) if mask.dtype is not None else np.dtype(bool)
    if dtype == np.float32:
        src = mask
    elif dtype.kind == "f":  # additive: -inf where masked
        neg_inf = gs.Variable(f"{ATTENTION_SCOPE}/mask_is_neg_inf", dtype=np.bool_)
        src = gs.Variable(f"{ATTENTION_SCOPE}/mask_bool", dtype=np.bool_)
        graph.nodes += [
            gs.Node(
                "IsInf",
                f"{ATTENTION_SCOPE}/mask_IsInf",
                {"detect_positive": 0, "detect_negative": 1},
                [mask],
                [neg_inf],
            ),
            gs.Node("Not", f"{ATTENTION_SCOPE}/mask_Not", inputs=[neg_inf], outputs=[src]),
        ]
    else:
        src = mask
    if src is mask and dtype == np.float32:
        return mask
    graph.nodes.append(
        gs.Node("Cast", f"{ATTENTION_SCOPE}/mask_Cast", {"to": 1}, [src], [out])  # 1 = FLOAT
    )
    return out


def _dtype_of(tensor: Any) -> np.dtype | None:
    return np.dtype(tensor.dtype) if getattr(tensor, "dtype", None) is not None else None


def _cast_to(graph: Any, tensor: Any, dtype: np.dtype, tag: str) -> Any:
    """`tensor` as `dtype` (a new Cast node), or `tensor` itself when it already is."""
    from onnx import helper

    gs = _gs()
    if _dtype_of(tensor) == dtype:
        return tensor
    out = gs.Variable(f"{ATTENTION_SCOPE}/{tag}_as_{dtype.name}", dtype=dtype)
    to = helper.np_dtype_to_tensor_dtype(dtype)
    name = f"{ATTENTION_SCOPE}/{tag}_Cast"
    graph.nodes.append(gs.Node("Cast", name, {"to": to}, [tensor], [out]))
    return out


def rewrite_attention(model: Any, scale: float | None = None) -> Any:
    """A copy of `model` (ModelProto or path) with the attention replaced by IWarpAttention."""
    import onnx

    gs = _gs()
    if isinstance(model, str | Path):
        model = onnx.load(str(model))
    model = onnx.shape_inference.infer_shapes(model)
    graph = gs.import_onnx(model)
    site = find_attention(graph)
    q = _squeeze_axis1(graph, site.q, "q")
    k = _squeeze_axis1(graph, site.k, "k")
    v = _squeeze_axis1(graph, site.v, "v")
    # The plugin takes q, k, v (and gives out) in one type. A mixed-precision graph (AutoCast,
    # ONNX Attention's V may differ from Q/K) gets Casts to the type the attention's output
    # had, so everything downstream sees what it saw before.
    common = _dtype_of(site.output) or _dtype_of(q) or np.dtype(np.float32)
    if common.kind != "f":
        common = np.dtype(np.float32)
    q, k, v = (_cast_to(graph, t, common, tag) for t, tag in ((q, "q"), (k, "k"), (v, "v")))
    if site.mask is not None:
        mask = _float_mask(graph, _key_mask_2d(graph, site.mask))
    else:
        ones_shape = gs.Variable(f"{ATTENTION_SCOPE}/k_shape", dtype=np.int64)
        mask = gs.Variable(f"{ATTENTION_SCOPE}/mask_f32", dtype=np.float32)
        graph.nodes += [
            gs.Node("Shape", f"{ATTENTION_SCOPE}/k_Shape", {"end": 2}, [k], [ones_shape]),
            gs.Node(
                "ConstantOfShape",
                f"{ATTENTION_SCOPE}/mask_Ones",
                {"value": gs.Constant("one", np.array([1.0], dtype=np.float32))},
                [ones_shape],
                [mask],
            ),
        ]
    if scale is None:
        scale = site.scale
    if scale is None:
        d = q.shape[-1] if q.shape is not None else None
        scale = 1.0 / math.sqrt(d) if isinstance(d, int) and d > 0 else 0.0  # 0: kernel default

    out4 = site.output
    consumers = list(out4.outputs)
    squeeze = consumers[0] if len(consumers) == 1 and consumers[0].op == "Squeeze" else None
    if squeeze is not None and _int_list(
        squeeze.inputs[1] if len(squeeze.inputs) > 1 else None, squeeze
    ) in ([1], [-3]):
        out3 = squeeze.outputs[0]
        squeeze.outputs.clear()
        squeeze.inputs.clear()
    else:
        out3 = gs.Variable(f"{ATTENTION_SCOPE}/out_3d", dtype=common)
        axes = gs.Constant(f"{ATTENTION_SCOPE}/out_axes", np.array([1], dtype=np.int64))
        for node in site.nodes:
            if out4 in node.outputs:
                node.outputs.remove(out4)
        graph.nodes.append(
            gs.Node(
                "Unsqueeze", f"{ATTENTION_SCOPE}/out_Unsqueeze", inputs=[out3, axes], outputs=[out4]
            )
        )
    for node in site.nodes:
        node.outputs.clear()
        node.inputs.clear()
    graph.nodes.append(
        gs.Node(
            PLUGIN_NAME,
            PLUGIN_NODE,
            {
                "plugin_version": PLUGIN_VERSION,
                "plugin_namespace": PLUGIN_NAMESPACE,
                "scale": float(scale),
            },
            inputs=[q, k, v, mask],
            outputs=[out3],
            domain=PLUGIN_DOMAIN,
        )
    )
    graph.cleanup().toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    _set_opset(result, PLUGIN_DOMAIN, 1)
    result.ir_version = model.ir_version
    result.doc_string = model.doc_string
    return result


def _set_opset(model: Any, domain: str, version: int) -> None:
    import onnx

    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def plugin_nodes(model: Any) -> list[Any]:
    return [n for n in model.graph.node if n.op_type == PLUGIN_NAME]


def rewrite_file(src: str | Path, dst: str | Path) -> Path:
    """Rewrites an animator ONNX file; writes `dst` atomically."""
    import os

    import onnx

    model = rewrite_attention(src)
    onnx.checker.check_model(model)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------- CPU execution


def expand_plugin_nodes(model: Any) -> Any:
    """A copy where every IWarpAttention node is standard ONNX ops again (for ONNX Runtime):
    MatMul(q, k^T) * scale, -inf where mask == 0, Softmax, NaN (all masked) -> 0, MatMul v."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    types = _elem_types(model)
    nodes: list[Any] = []
    for i, node in enumerate(graph.node):
        if node.op_type != PLUGIN_NAME:
            nodes.append(node)
            continue
        q, k, v, mask = node.input
        out = node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = float(attrs.get("scale", 0.0))
        elem = types.get(q, TensorProto.FLOAT)
        np_dtype = helper.tensor_dtype_to_np_dtype(elem)
        p = f"{PLUGIN_NODE}_{i}/"
        if scale <= 0:
            raise CheckpointError(f"{node.name}: scale attribute missing", "rewrite again")

        def const(name: str, value: Any, dtype: Any = np_dtype, prefix: str = p) -> str:
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(value, dtype=dtype), prefix + name)
            )
            return prefix + name

        nodes += [
            helper.make_node("Transpose", [k], [p + "kT"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [q, p + "kT"], [p + "qk"]),
            helper.make_node("Mul", [p + "qk", const("scale", scale)], [p + "logits"]),
            helper.make_node("Cast", [mask], [p + "allowed"], to=TensorProto.BOOL),
            helper.make_node("Unsqueeze", [p + "allowed", const("ax", [1], np.int64)], [p + "m3"]),
            helper.make_node(
                "Where", [p + "m3", p + "logits", const("neg_inf", -np.inf)], [p + "masked"]
            ),
            helper.make_node("Softmax", [p + "masked"], [p + "prob_raw"], axis=-1),
            helper.make_node("IsNaN", [p + "prob_raw"], [p + "nan"]),
            helper.make_node("Where", [p + "nan", const("zero", 0.0), p + "prob_raw"], [p + "p"]),
            helper.make_node("MatMul", [p + "p", v], [out]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _elem_types(model: Any) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def ort_custom_op_model(model: Any) -> Any:
    """A copy whose IWarpAttention nodes are in onnxruntime-extensions' custom-op domain."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == PLUGIN_NAME:
            node.domain = ORT_CUSTOM_DOMAIN
    _set_opset(model, ORT_CUSTOM_DOMAIN, 1)
    return model


_REGISTERED: set[str] = set()


def register_ort_reference_op(dtypes: Iterable[str] = ("float",)) -> str:
    """Registers `attention_reference` as the IWarpAttention op of onnxruntime-extensions and
    returns the custom-op library path for `SessionOptions.register_custom_ops_library`."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as exc:
        raise IwarpError(
            "onnxruntime-extensions is not installed", "pip install onnxruntime-extensions"
        ) from exc
    for dtype in dtypes:
        if dtype in _REGISTERED:
            continue
        dt = PyCustomOpDef.dt_float if dtype == "float" else PyCustomOpDef.dt_float16
        np_dtype = np.float32 if dtype == "float" else np.float16

        def compute(q, k, v, mask, np_dtype=np_dtype, **attrs):
            scale = float(attrs.get("scale", 0.0))
            return attention_reference(q, k, v, mask, scale).astype(np_dtype)

        # Python custom ops are keyed by op type; one dtype (float) is what the tests need.
        onnx_op(
            op_type=PLUGIN_NAME,
            inputs=[dt, dt, dt, PyCustomOpDef.dt_float],
            outputs=[dt],
            attrs={
                "plugin_version": PyCustomOpDef.dt_string,
                "plugin_namespace": PyCustomOpDef.dt_string,
                "scale": PyCustomOpDef.dt_float,
            },
        )(compute)
        _REGISTERED.add(dtype)
    return get_library_path()
