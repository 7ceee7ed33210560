"""INT8 calibration (`iwarp calibrate`): real ORT sessions and quantizers, no mocks.

A random-init tiny checkpoint at 128 px and a clip of the packaged astronaut photo (a real
face, moved) stand in for a trained model and real footage. One full run (exclusion search
included) is shared by the module; the other tests reuse its FP32 graphs and its cache.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from iwarp.calibration import (
    CalibrationConfig,
    CalibrationGateError,
    GateThresholds,
    cache_problems,
    calibrate,
    choose_quantizer,
    load_cache,
    modelopt_status,
    save_cache,
)
from iwarp.calibration.data import cache_spec, frame_problems
from iwarp.checkpoint import file_sha256, save_checkpoint
from iwarp.cli import main
from iwarp.config import get_config
from iwarp.engine_build.export import check_build
from iwarp.errors import CheckpointError, InputError, IwarpError, NoFaceError
from iwarp.media import make_test_clip, read_image
from iwarp.model import ImplicitWarpingNetwork
from iwarp.paths import DEFAULT_AVATAR

SIZE = 128
GRAPHS = ("keypoints", "source_encoder", "animator")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = get_config("tiny_flow", image_size=SIZE)
    return save_checkpoint(path, config, ImplicitWarpingNetwork(config.model))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calib")
    _checkpoint(root / "ck.safetensors", seed=0)
    (root / "clips").mkdir()
    image = read_image(DEFAULT_AVATAR)
    make_test_clip(root / "clips" / "astronaut.mp4", frames=40, size=256, image=image)
    return root


def _config(work: Path, out: Path, **kw) -> CalibrationConfig:
    base = {
        "data": work / "clips",
        "out": out,
        "checkpoint": work / "ck.safetensors",
        "frames": 20,
        "eval_frames": 6,
        "search_frames": 10,
        "threads": 1,
        "timing_runs": 3,
        "clip_cache": work / "clip_cache",
        "grid_frames": 3,
        "show_progress": False,
    }
    return CalibrationConfig(**{**base, **kw})


def _config_on_run(work: Path, run: tuple[Path, dict], out: Path, **kw) -> CalibrationConfig:
    """A config that reuses the shared run's FP32 graphs and calibration cache, without the
    FP16 comparison (what each variant of the shared run changes is in `kw`)."""
    build = run[0]
    base = {"onnx_dir": build / "onnx", "cache": build / "calibration_cache.npz", "fp16": False}
    return _config(work, out, **{**base, **kw})


@pytest.fixture(scope="module")
def run(work) -> tuple[Path, dict]:
    """The shared full run: exports the FP32 graphs, searches exclusions, quantizes."""
    out = work / "build"
    return out, calibrate(_config(work, out))


def test_calibration_writes_graphs_report_and_grid(work, run):
    out, _ = run
    sha = file_sha256(work / "ck.safetensors")
    for graph in GRAPHS:
        model = onnx.load(str(out / "int8" / f"{graph}.onnx"))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, graph
    meta = json.loads((out / "int8" / "metadata.json").read_text())
    assert meta["precision"] == "int8" and meta["gate"]["passed"]
    assert check_build(out / "int8", sha, get_config("tiny_flow", image_size=SIZE)) == []

    saved = json.loads((out / "calibration.json").read_text())
    assert saved["gate"]["passed"] and saved["mode"] == "int8"
    assert saved["quantizer"]["name"] == ("modelopt" if modelopt_status()[0] else "ort")
    assert saved["data"]["frames"] == 20 and saved["data"]["eval_frames"] == 6
    assert "held-out" in saved["data"]["eval_source"]  # no manifest: no val split
    for graph in GRAPHS:
        assert saved["graphs"][graph]["bytes"] > 0
        assert set(saved["latency"]["ms"][graph]) == {"fp32", "int8"}
    assert saved["accuracy"]["animator"]["psnr_db"] >= 30.0
    # the search measured every candidate group of every graph
    assert set(saved["exclusions"]["trials"]) == set(GRAPHS)
    assert all(len(t) >= 2 for t in saved["exclusions"]["trials"].values())
    md = (out / "calibration.md").read_text()
    assert "## Gate" in md and "PASSED" in md and "calibration_grid.png" in md
    from PIL import Image

    with Image.open(out / "calibration_grid.png") as grid:
        columns = 5 if saved["fp16"]["available"] else 4
        assert grid.width > columns * SIZE and grid.height > 3 * SIZE


def test_ort_backend_runs_the_int8_graphs(work, run):
    from iwarp.runtime.backends.ort_backend import OrtBackend

    out, _ = run
    backend = OrtBackend.from_checkpoint(
        work / "ck.safetensors", out, threads=1, show_progress=False, precision="int8"
    )
    assert backend.build_dir == out / "int8" and "int8" in backend.describe()
    rng = np.random.default_rng(0)
    avatar = backend.encode_avatar(rng.uniform(0, 1, (2, 3, SIZE, SIZE)).astype(np.float32))
    pose = backend.detect(rng.uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32))
    frame = backend.animate(avatar, pose)
    assert frame.shape == (1, 3, SIZE, SIZE) and np.isfinite(frame).all()
    with pytest.raises(CheckpointError, match="int8"):
        OrtBackend.from_checkpoint(
            work / "ck.safetensors", work / "nowhere", threads=1, precision="int8"
        )


def test_gate_fails_below_its_thresholds_and_still_reports(work, run, tmp_path):
    out, _ = run
    args = ["calibrate", "--data", str(work / "clips"), "--out", str(tmp_path),
            "--checkpoint", str(work / "ck.safetensors"), "--onnx", str(out / "onnx"),
            "--cache", str(out / "calibration_cache.npz"), "--frames", "20", "--eval-frames",
            "6", "--exclude", "none", "--threads", "1", "--timing-runs", "0", "--no-fp16",
            "--min-animator-psnr", "200", "--json"]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 2
    assert "accuracy gate" in err.getvalue() and "200" in err.getvalue()
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert not report["gate"]["passed"]
    failed = [c for c in report["gate"]["checks"] if not c["passed"]]
    assert [c["threshold"] for c in failed] == [200.0]
    assert "FAIL" in (tmp_path / "calibration.md").read_text()
    # rejected graphs are kept for inspection, where no backend loads them
    assert not (tmp_path / "int8").exists()
    assert (tmp_path / "int8.rejected" / "metadata.rejected.json").is_file()
    assert not (tmp_path / "int8.rejected" / "metadata.json").exists()


def test_gate_error_from_the_api(work, run, tmp_path):
    config = _config_on_run(
        work,
        run,
        tmp_path,
        exclusions="none",
        timing_runs=0,
        gate=GateThresholds(max_keypoint_error_px=0.0),
    )
    with pytest.raises(CalibrationGateError, match="keypoints"):
        calibrate(config)


def test_cache_round_trips_and_a_new_checkpoint_invalidates_it(work, run, tmp_path):
    out, _ = run
    cached = load_cache(out / "calibration_cache.npz")
    path = save_cache(tmp_path / "copy.npz", cached)
    again = load_cache(path)
    for name in ("calib", "eval"):
        a, b = getattr(cached, name), getattr(again, name)
        assert a.clips == b.clips
        for field in ("driving", "avatar", "sources", "points", "strength", "keys", "values"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert {k: v for k, v in again.meta.items() if k != "saved"} == {
        k: v for k, v in cached.meta.items() if k != "saved"
    }
    assert again.calib.keys.shape == (1, 3 * (SIZE // 8) ** 2, 64)  # 1 avatar of 3 sources
    spec = cache_spec(work / "clips", None, "val", 20, 6, 3, SIZE, 0)
    sha = file_sha256(work / "ck.safetensors")
    assert cache_problems(again, spec, sha) == []
    other = _checkpoint(tmp_path / "other.safetensors", seed=1)
    problems = cache_problems(again, spec, file_sha256(other))
    assert len(problems) == 1 and "checkpoint" in problems[0]
    assert frame_problems(again, spec) == []  # frames stay usable, graph inputs do not
    assert frame_problems(again, {**spec, "frames": 64})  # other frames: collected again


def test_graphs_of_another_checkpoint_are_refused(work, run, tmp_path):
    out, _ = run
    other = _checkpoint(tmp_path / "other.safetensors", seed=1)
    config = _config(work, tmp_path, checkpoint=other, onnx_dir=out / "onnx")
    with pytest.raises(CheckpointError, match="do not match"):
        calibrate(config)


def test_too_few_frames_is_a_clear_error(work, run, tmp_path):
    with pytest.raises(InputError, match="at least 16"):
        calibrate(_config(work, tmp_path, frames=8))
    short = tmp_path / "short"
    short.mkdir()
    make_test_clip(short / "s.mp4", frames=12, size=256, image=read_image(DEFAULT_AVATAR))
    with pytest.raises(InputError, match="only 9 usable frames"):
        calibrate(_config(work, tmp_path / "o", data=short, onnx_dir=run[0] / "onnx"))


def test_clips_without_faces_are_a_clear_error(work, run, tmp_path):
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    make_test_clip(faceless / "pattern.mp4", frames=20, size=128)  # generated pattern, no face
    config = _config(work, tmp_path / "o", data=faceless, onnx_dir=run[0] / "onnx")
    with pytest.raises(NoFaceError, match="no face found in any clip"):
        calibrate(config)


def test_onnxruntime_fallback_quantizer(work, run, tmp_path):
    config = _config_on_run(
        work,
        run,
        tmp_path,
        quantizer="ort",
        exclusions="keypoints:softargmax",
        timing_runs=0,
        # MinMax ranges on a random-init net: looser than ModelOpt's (this tests the path)
        gate=GateThresholds(
            min_animator_psnr_db=20.0, max_keypoint_error_px=10.0, min_source_psnr_db=20.0
        ),
    )
    report = calibrate(config)
    assert report["quantizer"]["name"] == "ort" and report["quantizer"]["method"] == "minmax"
    assert report["exclusions"]["chosen"]["keypoints"] == ["softargmax"]
    model = onnx.load(str(tmp_path / "int8" / "keypoints.onnx"))
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert softmax and producers[softmax[0].input[0]] != "DequantizeLinear"  # kept FP32


def test_fp8_needs_modelopt():
    with pytest.raises(IwarpError, match="ModelOpt"):
        choose_quantizer("ort", "fp8")
    if not modelopt_status()[0]:
        with pytest.raises(IwarpError, match="pip install nvidia-modelopt"):
            choose_quantizer("auto", "fp8")
    else:
        assert choose_quantizer("auto", "fp8")[0] == "modelopt"


@pytest.mark.skipif(not modelopt_status()[0], reason="FP8 needs NVIDIA ModelOpt")
def test_fp8_graphs_are_written_and_gated(work, run, tmp_path):
    config = _config_on_run(
        work,
        run,
        tmp_path,
        mode="fp8",
        exclusions="none",
        gate=GateThresholds(
            min_animator_psnr_db=20.0, max_keypoint_error_px=2.0, min_source_psnr_db=20.0
        ),
    )
    report = calibrate(config)
    model = onnx.load(str(tmp_path / "fp8" / "animator.onnx"))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and report["latency"]["ms"] == {}  # FP8 is emulated on the CPU: no timing
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q if len(n.input) > 2 and n.input[2] in inits]
    assert any(z.data_type == onnx.TensorProto.FLOAT8E4M3FN for z in zero_points)


def test_every_exclusion_names_a_module_of_the_shipped_network():
    """The exclusion groups name modules by path; a renamed or retired module would leave its
    group matching nothing (calibration would then quietly quantize it). Fails on that."""
    from iwarp.calibration.quantize import GROUPS
    from iwarp.checkpoint import load_network
    from iwarp.paths import DEFAULT_CHECKPOINT

    net, _ = load_network(DEFAULT_CHECKPOINT)
    exported = {"net"} | {f"net.{name}" for name, _ in net.named_modules() if name}
    named = {path for groups in GROUPS.values() for g in groups for path in g.module_paths()}
    assert len(named) > 10, named  # the groups name real modules, not none
    assert not named - exported, sorted(named - exported)
