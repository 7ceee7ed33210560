"""The TensorRT plugin rewrite of the animator graph, checked on the CPU.

The rewritten graph (one IWarpAttention node in the `trt.plugins` domain) must pass the ONNX
checker and compute what the exported graph computes. TensorRT is not needed: the node is run in
ONNX Runtime two ways, (a) expanded back into standard ONNX ops (`expand_plugin_nodes`) and
(b) as an onnxruntime-extensions Python custom op calling the NumPy reference of the kernel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon not installed")
ort = pytest.importorskip("onnxruntime")

from iwarp.engine_build import rewrite  # noqa: E402
from iwarp.engine_build.export import example_inputs, export_onnx  # noqa: E402


def exported_graphs(tmp_path_factory):
    """The shipped weights exported once per test session (shared with test_tensorrt.py)."""
    out = tmp_path_factory.getbasetemp() / "iwarp_export_opset23"
    if not (out / "metadata.json").is_file():
        export_onnx(None, out, check=False, show_progress=False)
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from iwarp.engine_build.export import load_metadata

    out = exported_graphs(tmp_path_factory)
    return out, load_metadata(out)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _config(meta):
    from iwarp.config import Config

    return Config.from_dict(meta["config"])


def _feeds(meta, batch, sources, drop=0.3, seed=0):
    feeds = example_inputs(_config(meta), "animator", batch, sources, seed=seed)
    rng = np.random.default_rng(seed)
    mask = rng.random(feeds["key_mask"].shape) >= drop  # dropped source tokens
    mask[:, 0] = True
    feeds["key_mask"] = mask
    return feeds


def test_rewrite_fused_attention(build):
    out, meta = build
    original = onnx.load(str(out / "animator.onnx"))
    rewritten = rewrite.rewrite_attention(original)
    onnx.checker.check_model(rewritten, full_check=False)

    nodes = rewrite.plugin_nodes(rewritten)
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == rewrite.PLUGIN_DOMAIN and node.name == rewrite.PLUGIN_NODE
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b""
    d = _config(meta).model.attn_dim
    assert math.isclose(attrs["scale"], 1.0 / math.sqrt(d), rel_tol=1e-6)
    assert not any(n.op_type == "Attention" for n in rewritten.graph.node)
    assert any(o.domain == rewrite.PLUGIN_DOMAIN for o in rewritten.opset_import)

    ref_session = _session(original)
    expanded = _session(rewrite.expand_plugin_nodes(rewritten))
    for batch, sources in [(1, 1), (2, 3)]:
        feeds = _feeds(meta, batch, sources, seed=batch)
        ref = ref_session.run(None, feeds)[0]
        got = expanded.run(None, feeds)[0]
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_rewrite_runs_as_ort_custom_op(build):
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions not installed")
    out, meta = build
    original = onnx.load(str(out / "animator.onnx"))
    rewritten = rewrite.rewrite_attention(original)
    so = ort.SessionOptions()
    so.register_custom_ops_library(rewrite.register_ort_reference_op())
    custom = ort.InferenceSession(
        rewrite.ort_custom_op_model(rewritten).SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
    )
    for batch, sources in [(1, 2), (2, 3)]:
        feeds = _feeds(meta, batch, sources, seed=10 + batch)
        ref = _session(original).run(None, feeds)[0]
        got = custom.run(None, feeds)[0]
        # 1e-4: the flow warp divides the coordinate sums by the mass and samples the photo
        # there, so the reference's (float64) rounding moves pixels by up to ~7e-5.
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_rewrite_decomposed_attention(tmp_path):
    """Below opset 23 the exporter decomposes the attention; the rewrite finds it by name."""
    from iwarp.checkpoint import load_network
    from iwarp.engine_build import export

    net, ckpt = load_network(None)
    model = export._export_graph(
        export._graph_modules(net)["animator"], "animator", ckpt.config, 18
    )
    assert not any(n.op_type == "Attention" for n in model.graph.node)
    rewritten = rewrite.rewrite_attention(model)
    onnx.checker.check_model(rewritten)
    assert len(rewrite.plugin_nodes(rewritten)) == 1
    assert not any(n.op_type == "Softmax" for n in rewritten.graph.node)
    meta = {"config": ckpt.config.to_dict()}
    feeds = _feeds(meta, 2, 2, seed=3)
    ref = _session(model).run(None, feeds)[0]
    got = _session(rewrite.expand_plugin_nodes(rewritten)).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_rewrite_fp16_graph(build, tmp_path):
    """FP16 first, then the rewrite (the order `iwarp build --precision fp16 --plugin` uses)."""
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common not installed")
    from iwarp.engine_build.tensorrt_build import convert_fp16, psnr

    out, meta = build
    fp16 = convert_fp16(out / "animator.onnx", tmp_path / "animator.onnx", "onnxconverter-common")
    rewritten = rewrite.rewrite_attention(onnx.load(str(fp16.path)))
    onnx.checker.check_model(rewritten)
    assert len(rewrite.plugin_nodes(rewritten)) == 1
    # A real avatar of 2 photos and a real driving frame (random avatar rows make the flow
    # warp's coordinates ill-conditioned in FP16: tests/test_flow_warp.py), against the FP32
    # graph without the rewrite.
    from test_tensorrt import _real_feeds

    feeds = _real_feeds(meta, 2)
    ref = _session(onnx.load(str(out / "animator.onnx"))).run(None, feeds)[0]
    got = _session(rewrite.expand_plugin_nodes(rewritten)).run(None, feeds)[0]
    assert psnr(got, ref) > 40.0


def _mixed_precision_animator(original, v_dtype):
    """The exported animator with the Attention's V input cast to `v_dtype` (ONNX Attention
    allows V a type of its own), as a mixed-precision converter may leave it."""
    from onnx import helper

    model = onnx.ModelProto.FromString(original.SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    cast_out = node.input[2] + "_mixed"
    to = helper.np_dtype_to_tensor_dtype(np.dtype(v_dtype))
    cast = helper.make_node("Cast", [node.input[2]], [cast_out], to=to, name="test/v_Cast")
    node.input[2] = cast_out
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index, cast)
    return model


def test_rewrite_casts_mixed_precision_inputs_to_one_dtype(build):
    """q, k and v of the plugin node share one dtype (the attention output's) when the graph
    gave V another type; the result still matches the mixed graph."""
    out, meta = build
    mixed = _mixed_precision_animator(onnx.load(str(out / "animator.onnx")), np.float16)
    onnx.checker.check_model(mixed)
    rewritten = rewrite.rewrite_attention(mixed)
    onnx.checker.check_model(rewritten)
    inferred = onnx.shape_inference.infer_shapes(rewritten)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    node = rewrite.plugin_nodes(rewritten)[0]
    q, k, v, mask = (types.get(name) for name in node.input)
    assert q == k == v == onnx.TensorProto.FLOAT, (q, k, v)
    assert mask == onnx.TensorProto.FLOAT
    assert any(n.op_type == "Cast" and n.output[0] == node.input[2] for n in rewritten.graph.node)
    # ONNX Runtime cannot run the mixed graph itself (its Attention wants one type): compare
    # with the float32 graph; the only difference is V rounded to float16 and back.
    from iwarp.engine_build.tensorrt_build import psnr

    feeds = _feeds(meta, 1, 2, seed=4)
    ref = _session(onnx.load(str(out / "animator.onnx"))).run(None, feeds)[0]
    got = _session(rewrite.expand_plugin_nodes(rewritten)).run(None, feeds)[0]
    assert psnr(got, ref) > 50.0


def test_rewrite_same_dtype_inputs_get_no_cast(build):
    out, _ = build
    rewritten = rewrite.rewrite_attention(onnx.load(str(out / "animator.onnx")))
    node = rewrite.plugin_nodes(rewritten)[0]
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    assert all(
        producers.get(name) is None or producers[name].op_type != "Cast" for name in node.input[:3]
    )


def test_no_attention_is_a_clear_error():
    from onnx import TensorProto, helper

    from iwarp.errors import CheckpointError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(CheckpointError, match="no attention subgraph"):
        rewrite.rewrite_attention(helper.make_model(graph))


def test_reference_handles_masks_and_empty_keys():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 4))
    k = rng.standard_normal((2, 5, 4))
    v = rng.standard_normal((2, 5, 6))
    mask = np.ones((2, 5), bool)
    mask[1] = False
    out = rewrite.attention_reference(q, k, v, mask)
    assert np.all(out[1] == 0)
    logits = q[0] @ k[0].T / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0], (p / p.sum(-1, keepdims=True)) @ v[0], atol=1e-12)
    assert rewrite.attention_reference(q, k[:, :0], v[:, :0]).shape == (2, 3, 6)
