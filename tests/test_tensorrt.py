"""TensorRT builds: what runs on the CPU (FP16 graph quality, engine metadata, profiles, CLI
errors) and, where TensorRT and a CUDA GPU are present, real engine builds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iwarp.engine_build import tensorrt_build as tb
from iwarp.errors import CheckpointError


def _has_tensorrt_and_gpu() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install 'iwarp[tensorrt]' on a GPU machine)"
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to PyTorch"
    return True, ""


HAS_TRT, NO_TRT_REASON = _has_tensorrt_and_gpu()
needs_trt = pytest.mark.skipif(not HAS_TRT, reason=NO_TRT_REASON)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from test_rewrite import exported_graphs

    from iwarp.engine_build.export import load_metadata

    out = exported_graphs(tmp_path_factory)
    return out, load_metadata(out)


# --------------------------------------------------------------------------- FP16 on the CPU


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _real_feeds(meta, sources):
    """Animator inputs from the packaged face: real keys/values, not random numbers."""
    import torch

    from iwarp.checkpoint import load_network
    from iwarp.engine_build.export import packaged_face_images

    net, _ = load_network(None)
    crop, avatar = packaged_face_images(net.config.image_size)
    with torch.no_grad():
        kp = net.detect(torch.from_numpy(avatar[:sources]))
        s = net.encode_with_keypoints(torch.from_numpy(avatar[:sources]), kp, 1, sources)
        drive = net.detect(torch.from_numpy(crop))
    return {
        "keypoints": drive.points.numpy(),
        "strength": drive.strength.numpy(),
        "keys": s.keys.numpy(),
        "values": s.values.numpy(),
        "pixels": s.pixels.numpy(),
        "key_mask": np.ones(s.keys.shape[:2], dtype=bool),
    }


@pytest.mark.parametrize("method", ["onnxconverter-common", "modelopt-autocast"])
def test_fp16_graph_psnr(exported, tmp_path, method):
    """The FP16 animator graph stays within FP16_MIN_PSNR_DB of the FP32 one (ORT, CPU)."""
    if method == "modelopt-autocast" and not tb.modelopt_available():
        pytest.skip("nvidia-modelopt (its ONNX AutoCast) is not installed")
    if method == "onnxconverter-common":
        pytest.importorskip("onnxconverter_common", reason="onnxconverter-common not installed")
    from iwarp.config import Config
    from iwarp.engine_build.export import example_inputs

    out, meta = exported
    result = tb.convert_fp16(out / "animator.onnx", tmp_path / "animator.onnx", method)
    assert result.method == method
    fp32, fp16 = _ort(out / "animator.onnx"), _ort(result.path)
    config = Config.from_dict(meta["config"])
    # Real avatars and driving frames: the gate. Random avatar rows (near-uniform attention
    # over random keys) move the flow warp's coordinates with every rounding of the logits:
    # 35-41 dB there (tests/test_flow_warp.py), so they only check that nothing broke.
    cases = [
        (_real_feeds(meta, 1), tb.FP16_MIN_PSNR_DB),
        (_real_feeds(meta, 3), tb.FP16_MIN_PSNR_DB),
        (example_inputs(config, "animator", 2, 2), 30.0),
    ]
    for feeds, limit in cases:
        ref, got = fp32.run(None, feeds)[0], fp16.run(None, feeds)[0]
        assert got.dtype == np.float32  # keep_io_types
        assert tb.psnr(got, ref) >= limit, f"{tb.psnr(got, ref):.1f} dB"

    for graph in ("keypoints", "source_encoder"):
        res = tb.convert_fp16(out / f"{graph}.onnx", tmp_path / f"{graph}.onnx", method)
        feeds = example_inputs(config, graph, 1)
        for a, b in zip(
            _ort(res.path).run(None, feeds),
            _ort(out / f"{graph}.onnx").run(None, feeds),
            strict=True,
        ):
            assert np.abs(a - b).max() < 0.05


# --------------------------------------------------------------------------- metadata


def _meta(onnx_path, **over):
    base = dict(
        graph="animator",
        precision="fp16",
        onnx_path=onnx_path,
        tensorrt_version="11.4.0.106",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        profile={"keys": [[1, 1024, 64], [1, 1024, 64], [1, 4096, 64]]},
    )
    base.update(over)
    return tb.engine_metadata(**base)


def test_engine_metadata_mismatch_detection(tmp_path):
    onnx_file = tmp_path / "animator.onnx"
    onnx_file.write_bytes(b"graph v1")
    engine = tmp_path / "engines" / "animator.fp16.engine"
    assert tb.check_engine(engine, _meta(onnx_file)) == [f"{engine.name} does not exist"]
    engine.parent.mkdir()
    engine.write_bytes(b"\0" * 128)
    assert "missing" in tb.check_engine(engine, _meta(onnx_file))[0]

    built = _meta(onnx_file)
    tb.write_sidecar(engine, built)
    side = json.loads(tb.sidecar_path(engine).read_text())
    assert side["engine_bytes"] == 128 and side["format"] == tb.ENGINE_FORMAT
    assert tb.check_engine(engine, _meta(onnx_file)) == []
    tb.require_engine(engine, _meta(onnx_file))  # no error

    changes = {
        "tensorrt_version": "11.5.0",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "precision": "fp32",
        "profile": {"keys": [[1, 1024, 64], [1, 1024, 64], [1, 8192, 64]]},
    }
    for key, value in changes.items():
        problems = tb.check_engine(engine, _meta(onnx_file, **{key: value}))
        assert len(problems) == 1 and problems[0].startswith(key), problems

    onnx_file.write_bytes(b"graph v2")  # the graph was re-exported
    problems = tb.check_engine(engine, _meta(onnx_file))
    assert len(problems) == 1 and problems[0].startswith("onnx_sha256")
    with pytest.raises(CheckpointError, match=r"does not match.*onnx_sha256"):
        tb.require_engine(engine, _meta(onnx_file))

    lib = tmp_path / "libiwarp_attention_plugin.so"
    lib.write_bytes(b"plugin")
    problems = tb.check_engine(engine, _meta(onnx_file, plugin_library=lib))
    assert {p.split(":")[0] for p in problems} == {"plugin", "plugin_sha256", "onnx_sha256"}

    engine.write_bytes(b"\0" * 64)  # truncated
    assert any("changed size" in p for p in tb.check_engine(engine, side))
    tb.sidecar_path(engine).write_text("{not json")
    assert "unreadable" in tb.check_engine(engine, side)[0]


def test_profiles_follow_the_exported_graphs(exported):
    """Every profile shape has the rank and fixed dims of the exported ONNX input it is for
    (the shipped weights' `pixels` input is 192 wide: 3 x 8 x 8 patches, not 3), and the
    symbolic dims cover 1..max_batch and 1..max_sources sources."""
    import onnx

    out, meta = exported
    t = meta["tokens_per_source"]
    prof = tb.profiles_for_export(meta, max_sources=4, max_batch=2, opt_sources=2)
    assert set(prof) == set(tb.STAGES)
    for graph in tb.STAGES:
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        assert set(prof[graph]) == {i.name for i in model.graph.input}
        for inp in model.graph.input:
            dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
            lo, mid, hi = prof[graph][inp.name]
            assert len(lo) == len(mid) == len(hi) == len(dims), inp.name
            for i, dim in enumerate(dims):
                if isinstance(dim, int):
                    assert lo[i] == mid[i] == hi[i] == dim, (graph, inp.name, i)
                elif dim == "batch":
                    assert (lo[i], mid[i], hi[i]) == (1, 1, 2)
                else:
                    assert dim == "tokens" and (lo[i], mid[i], hi[i]) == (t, 2 * t, 4 * t)
    from iwarp.config import Config

    pixel_dim = Config.from_dict(meta["config"]).model.pixel_dim
    assert prof["animator"]["pixels"][2] == [2, 4 * t, pixel_dim] and pixel_dim == 192
    assert prof["animator"]["key_mask"] == [[1, t], [1, 2 * t], [2, 4 * t]]


def test_profiles_refuse_an_unknown_dim(exported):
    _, meta = exported
    bad = json.loads(json.dumps(meta))
    bad["graphs"]["animator"]["inputs"][2]["shape"][1] = "sequence"
    with pytest.raises(CheckpointError, match="sequence"):
        tb.profiles_for_export(bad, max_sources=2, max_batch=1)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the error path is not taken")
def test_build_without_tensorrt_is_a_clear_error(capsys):
    from iwarp.cli import main

    assert main(["build", "--precision", "fp16"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_plugin_library_search_order(tmp_path, monkeypatch):
    from iwarp.engine_build import plugin

    monkeypatch.setenv("IWARP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IWARP_PLUGIN_PATH", raising=False)
    monkeypatch.setattr(plugin, "installed_library", lambda: tmp_path / "pkg" / "lib" / "x.so")
    assert plugin.find_plugin_library() is None
    cached = plugin.plugin_build_dir() / plugin.LIBRARY_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"so")
    assert plugin.find_plugin_library() == cached
    explicit = tmp_path / "elsewhere" / plugin.LIBRARY_NAME
    explicit.parent.mkdir()
    explicit.write_bytes(b"so")
    monkeypatch.setenv("IWARP_PLUGIN_PATH", str(explicit.parent))
    assert plugin.find_plugin_library() == explicit
    monkeypatch.setenv("IWARP_PLUGIN_PATH", str(tmp_path / "nope.so"))
    with pytest.raises(plugin.PluginError, match="IWARP_PLUGIN_PATH"):
        plugin.find_plugin_library()


# --------------------------------------------------------------------------- on a GPU


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnxruntime(tmp_path, precision):
    """Builds the three engines (with the plugin when its library is found) and compares the
    TensorRT backend with the ONNX Runtime graphs on one avatar and a few frames."""
    from iwarp.runtime.backends.ort_backend import OrtBackend
    from iwarp.runtime.backends.trt_backend import TensorRTBackend

    trt_backend = TensorRTBackend.from_checkpoint(
        None, tmp_path / "trt", show_progress=False, precision=precision, max_sources=3
    )
    ort_backend = OrtBackend.from_checkpoint(None, tmp_path / "trt" / "onnx", show_progress=False)
    from iwarp.engine_build.export import packaged_face_images

    images = packaged_face_images(trt_backend.image_size)[1][:2]  # two real photos: the flow's gate
    a_trt = trt_backend.encode_avatar(images)
    a_ort = ort_backend.encode_avatar(images)
    for i in range(3):
        pose = ort_backend.detect(images[i % 2 : i % 2 + 1])
        ref = ort_backend.animate(a_ort, pose)
        got = trt_backend.animate(a_trt, pose)  # 2nd+ call: CUDA graph replay
        limit = 45.0 if precision == "fp32" else tb.FP16_MIN_PSNR_DB - 5.0
        assert tb.psnr(got, ref) >= limit
