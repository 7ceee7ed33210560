"""A network with an expression (`expression_dim` E = 4) on every inference path: its ONNX
export, the ONNX Runtime and OpenVINO backends against the torch one, the driving stream's
relative motion and smoothing, and calibration's graph inputs. Real exports, real sessions.

The network is the shipped weights in the `tiny_expression` layout at 128 px (the layout the
fine-tune starts from, `train.trainer.load_compatible`), with the zero-initialised expression
weights of the query and key encoders set to small random values, so that the expression
changes the picture. One export (with its parity check) is shared by the module (~25 s).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from iwarp import graphs
from iwarp.checkpoint import Checkpoint, save_checkpoint
from iwarp.config import get_config
from iwarp.engine_build.export import export_onnx, graph_path, ort_session, packaged_face_images
from iwarp.media import read_image, synthetic_driving_frames
from iwarp.model import ImplicitWarpingNetwork
from iwarp.motion import relative_expression
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime import Animator, create_backend
from iwarp.runtime.backends import openvino_backend
from iwarp.runtime.backends.ort_backend import OrtBackend
from iwarp.train.trainer import load_compatible

SIZE = 128
E = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    config = get_config("tiny_expression", image_size=SIZE)
    assert config.model.expression_dim == E
    net = ImplicitWarpingNetwork(config.model)
    adapted = load_compatible(net, Checkpoint(None).state_dict())  # the shipped weights
    assert any(a.startswith("query_encoder.unet.stem.0.weight") for a in adapted)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for encoder in (net.query_encoder, net.key_encoder):
            weight = encoder.unet.stem[0].weight
            weight[:, -E:] = 0.05 * torch.randn(weight[:, -E:].shape, generator=g)
        # The new encoder's head at init gives nearly the same numbers for every face: scaled,
        # the faces' expressions differ (by ~1e-3), which relative motion must carry.
        for layer in (net.expression_encoder.head[1], net.expression_encoder.head[3]):
            layer.weight.mul_(10.0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "e4.safetensors", config, net.eval())


@pytest.fixture(scope="module")
def build(ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "onnx"
    return out, export_onnx(ckpt, out, show_progress=False)  # raises when parity fails


@pytest.fixture(scope="module")
def torch_backend(ckpt):
    return create_backend("torch", ckpt, device="cpu")


@pytest.fixture(scope="module")
def ort_backend(ckpt, build):
    return OrtBackend.from_checkpoint(ckpt, build[0], threads=2, show_progress=False)


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray]:
    """A face crop (1, 3, S, S) and 3 moved copies (3, 3, S, S), float32 in [0, 1]."""
    return packaged_face_images(SIZE)


def test_export_has_the_expression_in_and_out(build):
    out, meta = build
    spec = graphs.graph_specs(get_config("tiny_expression", image_size=SIZE).model)
    for name in graphs.GRAPHS:
        info = meta["graphs"][name]
        assert info["inputs"] == [t.as_dict() for t in spec[name].inputs], name
        assert info["outputs"] == [t.as_dict() for t in spec[name].outputs], name
        assert max(info["max_abs_error"].values()) < 1e-3, name  # checked with the expression
    expression = {"name": graphs.EXPRESSION, "dtype": "float32", "shape": [graphs.BATCH, E]}
    assert meta["graphs"][graphs.KEYPOINTS_GRAPH]["outputs"][-1] == expression
    assert expression in meta["graphs"][graphs.SOURCE_ENCODER_GRAPH]["inputs"]
    assert meta["graphs"][graphs.ANIMATOR_GRAPH]["inputs"][2] == expression
    assert meta["attention"]["fused"] is True
    names = [n["name"] for n in meta["attention"]["nodes"]]
    assert names.count("iwarp/attention/Attention") == 1
    # ONNX Runtime refuses the animator without the driving expression.
    session = ort_session(graph_path(out, graphs.ANIMATOR_GRAPH), threads=1)
    assert [i.name for i in session.get_inputs()][:3] == [
        graphs.KEYPOINTS,
        graphs.STRENGTH,
        graphs.EXPRESSION,
    ]


def test_tensorrt_profiles_and_fp16_inputs_cover_the_expression(build):
    """What TensorRT builds from (no GPU needed): a (batch, E) profile for the expression
    input of both graphs that take it, and FP16 reference inputs that include it."""
    from iwarp.engine_build import tensorrt_build
    from iwarp.engine_build.fp16 import reference_inputs

    out, meta = build
    profiles = tensorrt_build.profiles_for_export(meta, max_sources=4, max_batch=2)
    for graph in (graphs.SOURCE_ENCODER_GRAPH, graphs.ANIMATOR_GRAPH):
        assert profiles[graph][graphs.EXPRESSION] == [[1, E], [1, E], [2, E]]
    assert graphs.EXPRESSION not in profiles[graphs.KEYPOINTS_GRAPH]  # an output there
    feeds = reference_inputs(graph_path(out, graphs.ANIMATOR_GRAPH))
    assert feeds[graphs.EXPRESSION].shape == (1, E)
    ort_session(graph_path(out, graphs.ANIMATOR_GRAPH), threads=1).run(None, feeds)


def _run(backend, faces):
    crop, sources = faces
    avatar = backend.encode_avatar(sources[:2])
    pose = backend.detect(crop)
    return avatar, pose, backend.animate(avatar, pose)


def test_onnxruntime_matches_torch_with_the_expression(torch_backend, ort_backend, faces):
    (a_t, p_t, out_t), (a_o, p_o, out_o) = (_run(b, faces) for b in (torch_backend, ort_backend))
    for avatar, pose in ((a_t, p_t), (a_o, p_o)):
        assert pose.expression.shape == (1, E) and pose.expression.dtype == np.float32
        assert avatar.expression.shape == (2, E) and avatar.num_sources == 2
    np.testing.assert_allclose(p_o.expression, p_t.expression, atol=1e-4)
    np.testing.assert_allclose(a_o.expression, a_t.expression, atol=1e-4)
    assert float(np.abs(out_o - out_t).max()) < 1e-3
    # Each source's own expression went into its keys: another one changes the avatar.
    shifted = replace(p_t, expression=p_t.expression + 1.0)
    source = faces[1][:1]
    rows = [b.encode_source(source, p) for b in (torch_backend,) for p in (p_t, shifted)]
    assert float((rows[0]["keys"] - rows[1]["keys"]).abs().max()) > 1e-3


def test_the_driving_expression_changes_the_frame(torch_backend, ort_backend, faces):
    outputs = []
    for backend in (torch_backend, ort_backend):
        avatar, pose, out = _run(backend, faces)
        other = backend.animate(avatar, replace(pose, expression=pose.expression + 1.0))
        again = backend.animate(avatar, pose)
        np.testing.assert_array_equal(again, out)  # the same pose, the same frame
        assert float(np.abs(other - out).max()) > 0.05  # another expression, another frame
        outputs.append(other)
    assert float(np.abs(outputs[0] - outputs[1]).max()) < 1e-3


@pytest.mark.skipif(not openvino_backend.available(), reason="openvino is not installed")
def test_openvino_matches_onnxruntime_with_the_expression(ckpt, build, ort_backend, faces):
    backend = create_backend("openvino", ckpt, build_dir=build[0], threads=2, precision="fp32")
    (a_v, p_v, out_v), (a_o, p_o, out_o) = (_run(b, faces) for b in (backend, ort_backend))
    np.testing.assert_allclose(p_v.expression, p_o.expression, atol=1e-4)
    np.testing.assert_allclose(a_v.expression, a_o.expression, atol=1e-4)
    mse = float(np.mean((out_v.astype(np.float64) - out_o) ** 2))
    assert 10 * np.log10(1.0 / max(mse, 1e-20)) > 80.0  # test_cpu_engines' fp32 gate


def test_relative_mode_moves_the_avatars_expression(ort_backend):
    portrait = read_image(DEFAULT_AVATAR)
    frames = synthetic_driving_frames(portrait, frames=8, size=256)
    animator = Animator(ort_backend, smoothing=True)
    avatar = animator.get(animator.add_avatar([portrait, frames[5]]))
    source = avatar.features.pose.select(0)
    assert avatar.features.expression.shape == (2, E)
    stream = animator.stream()
    assert stream.set_reference(frames[0])
    assert stream.reference.expression.shape == (1, E)
    # At the reference the avatar keeps its own expression, not the driver's.
    at_rest = stream._relative(avatar, stream.driving_pose(frames[0]))
    np.testing.assert_allclose(at_rest.expression, source.expression, atol=1e-6)
    assert float(np.abs(stream.reference.expression - source.expression).max()) > 1e-4
    # Through the whole frame path (smoothing on: its first sample passes as it is).
    stream.animate(avatar.record.avatar_id, frames[0])
    np.testing.assert_allclose(stream.last_pose.expression, source.expression, atol=1e-6)
    # Another frame moves it by the driver's change from the reference, by the one rule.
    moved = stream.driving_pose(frames[3])
    expected = relative_expression(source.expression, moved.expression, stream.reference.expression)
    np.testing.assert_allclose(stream._relative(avatar, moved).expression, expected, atol=1e-6)
    stream.animate(avatar.record.avatar_id, frames[3])
    assert stream.last_pose.expression.dtype == np.float32
    # Smoothed: between where it was and where the driver went.
    last = stream.last_pose.expression
    assert np.all(np.abs(last - expected) <= np.abs(source.expression - expected) + 1e-7)
    state = stream.motion_state()
    assert state["expression_filter"] is stream.expression_filter
    # Absolute mode: the driver's own expression.
    stream.clear_reference()
    assert stream._relative(avatar, moved) is moved


def test_calibration_records_and_feeds_the_expression(ort_backend, tmp_path):
    from iwarp.calibration import evaluate as ev
    from iwarp.calibration.data import CalibrationData, FrameSet, load_cache, save_cache

    portrait = read_image(DEFAULT_AVATAR)
    frames = synthetic_driving_frames(portrait, frames=6, size=SIZE)
    fs = FrameSet(
        driving=np.stack(frames[2:6]),
        driving_index=np.arange(2, 6, dtype=np.int32),
        avatar=np.zeros(4, np.int32),
        sources=np.stack(frames[:2])[None],
        source_index=np.arange(2, dtype=np.int32)[None],
        clips=["synthetic"],
    )
    ev.annotate(fs, ort_backend, show_progress=False)
    assert fs.expression.shape == (4, E) and fs.source_expression.shape == (1, 2, E)
    sessions = ort_backend.sessions
    for graph, feeds in (
        (graphs.KEYPOINTS_GRAPH, fs.keypoint_feeds()),
        (graphs.SOURCE_ENCODER_GRAPH, fs.source_feeds()),
        (graphs.ANIMATOR_GRAPH, fs.animator_feeds()),
    ):
        for feed in feeds:  # every recorded input set is exactly what the graph takes
            assert set(feed) == {i.name for i in sessions[graph].get_inputs()}
            sessions[graph].run(None, feed)
    # The graphs fed the recorded poses give what the backend gives.
    ref = ev.reference_outputs(ort_backend, fs)
    pose = ort_backend.detect(graphs.image_to_tensor(fs.driving[1]))
    np.testing.assert_allclose(pose.expression, fs.expression[1:2], atol=1e-6)
    metrics = ev.graph_metrics(
        graphs.KEYPOINTS_GRAPH, ev.run_graph(graphs.KEYPOINTS_GRAPH, ort_backend, fs), ref, SIZE
    )
    assert metrics["expression_mae"] < 1e-6
    # The cache keeps them.
    path = save_cache(
        tmp_path / "cache.npz", CalibrationData({"format": "iwarp-calibration-cache/1"}, fs, fs)
    )
    again = load_cache(path).calib
    np.testing.assert_array_equal(again.expression, fs.expression)
    np.testing.assert_array_equal(again.source_expression, fs.source_expression)


def test_film_network_exports_and_runs_on_onnxruntime(ckpt, faces, tmp_path):
    """`expression_film` adds no graph input: the gains read the expression from the planes.
    The export's own parity check passes, and ONNX Runtime follows torch when the driving
    expression changes."""
    plain = Checkpoint(ckpt)
    config = plain.config
    config.model.expression_film = True
    net = ImplicitWarpingNetwork(config.model)
    load_compatible(net, plain.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (net.query_encoder, net.key_encoder, net.generator):
            weight = module.film.to_gain_shift.weight
            weight.copy_(0.3 * torch.randn(weight.shape, generator=g))
    film = save_checkpoint(tmp_path / "film.safetensors", config, net.eval())
    out = tmp_path / "onnx"
    meta = export_onnx(film, out, show_progress=False)  # raises when parity fails
    spec = graphs.graph_specs(config.model)
    for name in graphs.GRAPHS:
        assert meta["graphs"][name]["inputs"] == [t.as_dict() for t in spec[name].inputs]
    torch_b = create_backend("torch", film, device="cpu")
    ort_b = OrtBackend.from_checkpoint(film, out, threads=2, show_progress=False)
    frames = []
    for backend in (torch_b, ort_b):
        avatar, pose, _ = _run(backend, faces)
        frames.append(backend.animate(avatar, replace(pose, expression=pose.expression + 1.0)))
    assert float(np.abs(frames[0] - frames[1]).max()) < 1e-3
    # The gains changed the picture: the plain network gives another frame.
    plain_b = create_backend("torch", ckpt, device="cpu")
    avatar, pose, _ = _run(plain_b, faces)
    plain_frame = plain_b.animate(avatar, replace(pose, expression=pose.expression + 1.0))
    assert float(np.abs(plain_frame - frames[0]).max()) > 0.01
