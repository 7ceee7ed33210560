"""The CPU engines on the packaged model: no subnormal floats in the attention on real frames
(torch, ONNX Runtime, OpenVINO), the OpenVINO backend against ONNX Runtime, and `auto`."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from iwarp import graphs
from iwarp.engine_build.export import ATTENTION_NODE, graph_path
from iwarp.media import DEFAULT_DRIVING_CLIP, read_video
from iwarp.runtime import Animator, create_backend
from iwarp.runtime.backends import denormals, openvino_backend
from iwarp.runtime.backends.onnx_build import prepared_graphs
from iwarp.system import has_bf16_compute

TINY = np.finfo(np.float32).tiny  # the smallest normal float32
PROBABILITIES = "iwarp/attention/probabilities"

needs_openvino = pytest.mark.skipif(
    not openvino_backend.available(), reason="openvino is not installed (pip install openvino)"
)


def subnormal_count(values: np.ndarray) -> int:
    a = np.abs(np.asarray(values, dtype=np.float32))
    return int(np.count_nonzero((a > 0) & (a < TINY)))


@pytest.fixture(scope="module")
def build() -> tuple[Path, dict]:
    """The packaged weights' graphs (exported once into the user cache, reused after)."""
    return prepared_graphs(show_progress=False)


@pytest.fixture(scope="module")
def real_frames(shared_data: Path) -> list[np.ndarray]:
    clip = shared_data / DEFAULT_DRIVING_CLIP
    if not clip.is_file():
        pytest.skip(f"{clip} not found")
    return read_video(clip, max_frames=48)[::8]


@pytest.fixture(scope="module")
def attention_inputs(real_frames: list[np.ndarray]) -> list[tuple]:
    """(queries, keys, mask) of the packaged model's attention, avatars of 1 and 3 sources
    from the clip, driven by its frames through the real pipeline (torch backend)."""
    import iwarp.model.warp as warp

    captured: list[tuple] = []
    original = warp.attention

    def recording(q, k, v, mask):
        captured.append((q.detach().clone(), k.detach().clone(), mask.detach().clone()))
        return original(q, k, v, mask)

    animator = Animator.from_pretrained("torch", show_progress=False)
    warp.attention = recording
    try:
        for sources in (1, 3):
            avatar = animator.add_avatar(real_frames[:sources])
            stream = animator.stream()
            for frame in real_frames[1:]:
                stream.animate(avatar, frame)
    finally:
        warp.attention = original
    assert captured, "the attention never ran"
    return captured


def test_torch_attention_has_no_subnormals_on_real_frames(attention_inputs: list[tuple]) -> None:
    import torch

    create_backend("torch", device="cpu")  # flushes this thread and torch's OpenMP team
    assert denormals.torch_flushes_denormals()
    would_be = 0
    for q, k, mask in attention_inputs:
        logits = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        exact = torch.softmax(logits.double(), -1)
        would_be += int(((exact > 0) & (exact < TINY)).sum())
        probabilities = torch.softmax(logits, -1)
        assert subnormal_count(probabilities.numpy()) == 0
    # Without flushing, these weights make subnormal probabilities on these frames: the
    # test above is not vacuous for them.
    assert would_be > 0


def _graphs_with_probabilities(build: Path, out: Path) -> Path:
    """A copy of the build whose animator also outputs the attention's probabilities."""
    import onnx
    from onnx import helper

    shutil.copytree(build, out, ignore=shutil.ignore_patterns("int8", "fp8", "*.tmp"))
    path = graph_path(out, graphs.ANIMATOR_GRAPH)
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == ATTENTION_NODE)
    for attribute in list(node.attribute):
        if attribute.name == "qk_matmul_output_mode":
            node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute("qk_matmul_output_mode", 3))  # after softmax
    while len(node.output) < 3:
        node.output.append("")
    node.output.append(PROBABILITIES)
    model.graph.output.append(helper.make_empty_tensor_value_info(PROBABILITIES))
    onnx.save(model, str(path))
    meta_path = out / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["graphs"][graphs.ANIMATOR_GRAPH]["bytes"] = path.stat().st_size  # the copy's own
    meta_path.write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def probing_build(build: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _graphs_with_probabilities(build[0], tmp_path_factory.mktemp("probe") / "graphs")


def test_onnxruntime_attention_has_no_subnormals_on_real_frames(
    probing_build: Path, real_frames: list[np.ndarray]
) -> None:
    """The exported animator graph as ONNX Runtime runs it (the backend's session options and
    threads, the calling thread as the backend sets it), on avatars and driving frames of a
    real clip: every attention probability is 0 or a normal float. (OpenVINO does not honour
    the Attention node's probability output; its flushing is checked on a softmax below.)"""
    backend = create_backend("onnxruntime", build_dir=probing_build, show_progress=False)
    animator = Animator(backend)
    checked = 0
    # A fresh thread: what a server worker is to the engine.
    errors: list[BaseException] = []

    def run() -> None:
        nonlocal checked
        try:
            for sources in (1, 3):
                avatar = animator.get(animator.add_avatar(real_frames[:sources]))
                stream = animator.stream()
                for frame in real_frames[1:]:
                    pose = stream.driving_pose(frame)
                    assert pose is not None
                    backend.animate(avatar.features, pose)  # flushes this thread, as served
                    for probabilities in _probabilities(backend, avatar.features, pose):
                        assert subnormal_count(probabilities) == 0
                        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-3)
                        checked += 1
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    assert checked == 2 * (len(real_frames) - 1)


def _probabilities(backend, features, pose) -> list[np.ndarray]:
    feeds = {**features.rows, **graphs.pose_feeds(pose)}
    return backend.sessions[graphs.ANIMATOR_GRAPH].run([PROBABILITIES], feeds)


def _softmax_graph(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    graph = helper.make_graph(
        [node],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    path = tmp_path / "softmax.onnx"
    onnx.save(model, str(path))
    return path


def _peaked(rows: int) -> np.ndarray:
    """Rows whose second probability, exp(-95) ~ 5e-42, is subnormal unless flushed."""
    return np.tile(np.array([[0.0, -95.0]], np.float32), (rows, 1))


def test_ort_flushes_the_calling_thread_and_its_pool(tmp_path: Path) -> None:
    """Through the runtime's ORT session factory: small inputs run on the calling thread,
    large ones on the pool too."""
    from iwarp.engine_build.export import ort_session

    path = _softmax_graph(tmp_path)
    results: list[int] = []

    def run() -> None:
        denormals.flush_denormals_here()  # what every backend stage does first
        session = ort_session(path, threads=2)
        for rows in (4, 1 << 18):
            results.append(subnormal_count(session.run(None, {"x": _peaked(rows)})[0]))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert results == [0, 0]


@needs_openvino
def test_openvino_flushes_with_the_backends_settings(tmp_path: Path) -> None:
    """The same softmax compiled the way the OpenVINO backend compiles its graphs."""
    path = _softmax_graph(tmp_path)
    results: list[int] = []

    def run() -> None:
        denormals.flush_denormals_here()
        for rows in (4, 1 << 18):
            model = openvino_backend.compiled_model(path, "fp32", 2, {"x": (rows, 2)})
            results.append(subnormal_count(model({"x": _peaked(rows)})[0]))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert results == [0, 0]


def test_denormal_flags_are_per_thread_and_set_by_the_backends() -> None:
    assert denormals.flush_denormals_here()
    assert denormals.thread_flushes_denormals()
    seen: list[bool] = []
    worker = threading.Thread(target=lambda: seen.append(denormals.thread_flushes_denormals()))
    worker.start()
    worker.join()
    assert seen == [True]  # threads started later inherit the creator's flags


# --------------------------------------------------------------------------- OpenVINO


@pytest.fixture(scope="module")
def gate_images(build: tuple[Path, dict]) -> tuple[np.ndarray, np.ndarray]:
    from iwarp.runtime.backends.engine_choice import gate_images

    return gate_images(build[1]["config"]["model"]["image_size"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def _end_to_end(backend, avatar_image: np.ndarray, driving: np.ndarray) -> np.ndarray:
    avatar = backend.encode_avatar(avatar_image)
    pose = backend.detect(driving)
    return np.concatenate([backend.animate(avatar, pose.select(i)) for i in range(4)])


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_matches_onnxruntime(
    precision: str, build: tuple[Path, dict], gate_images: tuple[np.ndarray, np.ndarray]
) -> None:
    if precision == "bf16" and not has_bf16_compute():
        pytest.skip("this CPU has neither AMX nor AVX512-BF16")
    import openvino as ov

    folder = build[0]
    reference = _end_to_end(create_backend("onnxruntime", build_dir=folder), *gate_images)
    backend = create_backend("openvino", build_dir=folder, precision=precision, threads=2)
    assert precision in backend.describe() and "openvino" in backend.describe()
    got = _end_to_end(backend, *gate_images)
    # fp32: the same graph, other kernels; bf16: 8-bit mantissas (pixel skip ~45-48 dB; the
    # flow warp 41-46 dB on the AMD EPYC: its sub-pixel motion follows every rounding of the
    # keypoints). Whether auto may use bf16 is engine_choice's 40 dB gate, measured per CPU;
    # this checks that the bf16 engine computes the same picture.
    assert _psnr(got, reference) > (80.0 if precision == "fp32" else 35.0)
    avatar = backend.encode_avatar(gate_images[0])
    assert all(isinstance(t, ov.Tensor) for t in avatar.rows.values())
    # A second backend on the same graphs reuses the compiled models.
    before = len(openvino_backend._compiled)
    again = create_backend("openvino", build_dir=folder, precision=precision, threads=2)
    _end_to_end(again, *gate_images)
    assert len(openvino_backend._compiled) == before


@needs_openvino
def test_openvino_refuses_what_it_cannot_run(build: tuple[Path, dict]) -> None:
    from iwarp.errors import IwarpError

    with pytest.raises(IwarpError, match="precision"):
        create_backend("openvino", build_dir=build[0], precision="fp16")
    with pytest.raises(IwarpError, match="CPU"):
        create_backend("openvino", build_dir=build[0], device="cuda")


def test_auto_measures_once_and_says_what_it_chose(
    build: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iwarp.runtime.backends import engine_choice

    monkeypatch.setenv("IWARP_CACHE", str(tmp_path))
    name, precision, trials = engine_choice.choose(build_dir=build[0], show_progress=False)
    passing = [t for t in trials if t.passed]
    assert (name, precision) in {(t.backend, t.precision) for t in passing}
    chosen = next(t for t in trials if (t.backend, t.precision) == (name, precision))
    assert chosen.ms == min(t.ms for t in passing if t.ms is not None)
    for t in trials:
        if t.psnr_db is not None:
            assert t.passed == (t.psnr_db >= engine_choice.MIN_PSNR_DB)
    cache = tmp_path / engine_choice.CHOICE_FILE
    stamp = cache.stat().st_mtime_ns
    backend = create_backend("auto", build_dir=build[0], show_progress=False)
    assert cache.stat().st_mtime_ns == stamp  # read from the cache, not measured again
    text = backend.describe()
    assert backend.name == name and "auto" in text and precision in text


# --------------------------------------------------------------------------- iwarp bench


@pytest.mark.slow
def test_bench_engines_shows_where_the_time_goes(tmp_path: Path) -> None:
    """Several engines side by side on a random 64 px network: graph times inside the
    pipeline and alone, the overhead as their difference from the frame time, speed against
    torch, PSNR against the torch pipeline, the table and the plot."""
    import torch

    from iwarp.checkpoint import save_checkpoint
    from iwarp.config import get_config
    from iwarp.media import make_test_clip, read_image
    from iwarp.model import ImplicitWarpingNetwork
    from iwarp.paths import DEFAULT_AVATAR
    from iwarp.runtime.benchmark import bench_engines, comparison_table, plot_comparison

    torch.manual_seed(0)
    config = get_config("tiny_flow", image_size=64)
    ckpt = save_checkpoint(
        tmp_path / "tiny64.safetensors", config, ImplicitWarpingNetwork(config.model).eval()
    )
    clip = make_test_clip(
        tmp_path / "clip.mp4", frames=12, size=128, image=read_image(DEFAULT_AVATAR)
    )
    engines = ["torch", "onnxruntime"] + (["openvino:fp32"] if openvino_backend.available() else [])
    results = bench_engines(
        engines,
        [1],
        frames=4,
        clip=clip,
        checkpoint=ckpt,
        threads=1,
        accuracy_frames=3,
        show_progress=False,
    )
    assert [r["backend"] for r in results] == [e.split(":")[0] for e in engines]
    for r in results:
        g, frame = r["graphs_in_pipeline"], r["frame_ms"]
        assert g["keypoints_p50_ms"] > 0 and g["animator_p50_ms"] > 0
        assert r["raw_graphs"]["keypoints_p50_ms"] > 0 and r["raw_graphs"]["animator_p50_ms"] > 0
        # The overhead is what the frame costs beyond the two graphs (never negative).
        assert 0 <= r["overhead_ms"]["p50"] < frame["p99"]
        assert r["vs_torch"] > 0
        assert set(r["isa"]) >= {"avx512_bf16", "amx_bf16", "avx512_vnni"}
        if r["backend"] != "torch":
            # The same fp32 network in another engine: equal to rounding.
            assert r["psnr_vs_torch_db"] > 50.0
    table = comparison_table(results)
    assert table.count("\n") == len(results) + 1 and "PSNR vs FP32 torch" in table
    plot_comparison(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
