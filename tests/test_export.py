"""ONNX export and the ONNX Runtime backend: real exports, real ORT sessions, no mocks of either.

One build (exported through `iwarp export`) of a random-init tiny checkpoint at 256 px is
shared by the module; exporting is the slow part (~30 s on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import iwarp
from iwarp.checkpoint import file_sha256, load_network, save_checkpoint
from iwarp.cli import main
from iwarp.config import get_config
from iwarp.engine_build import ATTENTION_NODE, ATTENTION_SCOPE, check_build, load_metadata
from iwarp.engine_build.export import example_inputs, graph_path, ort_session
from iwarp.errors import CheckpointError
from iwarp.graphs import graph_specs
from iwarp.media import make_test_clip, read_image, read_video
from iwarp.model import ImplicitWarpingNetwork, Keypoints, SourceSet
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime import Animator, create_backend
from iwarp.runtime.backends.ort_backend import OrtBackend

SIZE = 256


def _write_checkpoint(path: Path, seed: int, image_size: int = SIZE) -> Path:
    torch.manual_seed(seed)
    config = get_config("tiny_flow", image_size=image_size)
    net = ImplicitWarpingNetwork(config.model)
    # Non-trivial BatchNorm statistics, so folding them into the convolutions is exercised.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return save_checkpoint(path, config, net)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def build(ckpt, tmp_path_factory) -> tuple[Path, str]:
    """(build dir, stdout) of `iwarp export --checkpoint CK --out DIR`."""
    out = tmp_path_factory.mktemp("build") / "onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def net(ckpt):
    return load_network(ckpt)[0]


def test_cli_export_writes_the_build(build):
    out, stdout = build
    for name in ("keypoints.onnx", "source_encoder.onnx", "animator.onnx", "metadata.json"):
        assert (out / name).is_file(), name
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["opset"] == 23
    assert set(summary["max_abs_error"]) == {"keypoints", "source_encoder", "animator"}
    for errors in summary["max_abs_error"].values():
        assert 0 <= errors["random"] < 1e-3 and 0 <= errors["real"] < 1e-3


def _torch_graph(net, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if graph == "keypoints":
            kp = net.detect(t["image"])
            return [kp.points.numpy(), kp.strength.numpy()]
        if graph == "source_encoder":
            kp = Keypoints(t["keypoints"], t["strength"])
            s = net.encode_with_keypoints(t["image"], kp, t["image"].shape[0], 1)
            return [s.keys.numpy(), s.values.numpy(), s.pixels.numpy()]
        kp = Keypoints(t["keypoints"], t["strength"])
        sources = t["keys"].shape[1] // net.config.tokens_per_source  # the flow warp needs N
        source = SourceSet(kp, t["keys"], t["values"], t["pixels"], t["key_mask"], sources, SIZE)
        return [net.animate(source, kp).numpy()]


@pytest.mark.parametrize("batch", [1, 2])
def test_graphs_match_pytorch_with_1_and_3_sources(build, net, batch):
    out, _ = build
    config = get_config("tiny_flow", image_size=SIZE)
    cases = [("keypoints", 1), ("source_encoder", 1), ("animator", 1), ("animator", 3)]
    for graph, sources in cases:
        feeds = example_inputs(config, graph, batch, sources, seed=batch * 10 + sources)
        assert list(feeds) == list(graph_specs(config.model)[graph].input_names)
        got = ort_session(graph_path(out, graph), threads=2).run(None, feeds)
        ref = _torch_graph(net, graph, feeds)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            err = float(np.abs(g - r).max())
            assert err < 1e-3, f"{graph} with {sources} source(s), batch {batch}: {err}"


def test_avatar_of_3_sources_matches_pytorch_end_to_end(build, net, ckpt):
    """Backend API: detect -> encode each source -> join -> animate, ORT against torch."""
    out, _ = build
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    ort_backend = OrtBackend.from_checkpoint(ckpt, out, threads=2, show_progress=False)
    torch_backend = create_backend("torch", ckpt, device="cpu")
    frames = []
    for backend in (torch_backend, ort_backend):
        avatar = backend.encode_avatar(images)
        assert avatar.num_sources == 3
        pose = backend.detect(images[1:2])
        assert pose.expression is None  # a network without an expression
        frames.append(backend.animate(avatar, pose))
    assert frames[1].shape == (1, 3, SIZE, SIZE)
    assert float(np.abs(frames[0] - frames[1]).max()) < 1e-3


def test_attention_is_one_named_onnx_attention_node(build):
    out, _ = build
    model = onnx.load(str(graph_path(out, "animator")))
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert [n.name for n in attention] == [ATTENTION_NODE]
    node = attention[0]
    # No decomposed attention beside it: the only Softmax-like work is inside the node.
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    # Q, K, V and the mask; the mask is the key_mask (plus extra tokens) expanded over queries.
    assert len(node.input) == 4
    producers = {o: n for n in model.graph.node for o in n.output}
    mask = producers[node.input[3]]
    assert mask.op_type == "Expand" and mask.name.startswith(ATTENTION_SCOPE + "/")
    scoped = {n.name for n in model.graph.node if n.name.startswith(ATTENTION_SCOPE + "/")}
    assert scoped == {ATTENTION_NODE, f"{ATTENTION_SCOPE}/Expand"}
    # The graph runs in ONNX Runtime on the CPU as it is (no fallback to a decomposition).
    sess = ort_session(graph_path(out, "animator"), threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_metadata(build, ckpt):
    out, _ = build
    meta = load_metadata(out)
    config = get_config("tiny_flow", image_size=SIZE)
    assert meta["iwarp_version"] == iwarp.__version__
    assert meta["checkpoint_sha256"] == file_sha256(ckpt)
    assert meta["config"] == json.loads(json.dumps(config.to_dict()))
    assert meta["opset"] == 23
    assert meta["torch_version"] == torch.__version__
    assert meta["onnx_version"] == onnx.__version__
    assert meta["attention"]["fused"] is True
    t = config.model.tokens_per_source
    assert meta["tokens_per_source"] == t
    graphs = meta["graphs"]
    assert set(graphs) == {"keypoints", "source_encoder", "animator"}

    io_sides = ("inputs", "outputs")

    def io(graph: str, side: str) -> dict[str, tuple[str, list]]:
        return {v["name"]: (v["dtype"], v["shape"]) for v in graphs[graph][side]}

    k, d, dv, px = 20, config.model.attn_dim, config.model.value_dim, config.model.pixel_dim
    assert io("keypoints", "inputs") == {"image": ("float32", ["batch", 3, SIZE, SIZE])}
    assert io("keypoints", "outputs") == {
        "keypoints": ("float32", ["batch", k, 2]),
        "strength": ("float32", ["batch", k]),
    }
    assert io("source_encoder", "outputs") == {
        "keys": ("float32", ["batch", t, d]),
        "values": ("float32", ["batch", t, dv]),
        "pixels": ("float32", ["batch", t, px]),
    }
    assert io("animator", "inputs") == {
        "keypoints": ("float32", ["batch", k, 2]),
        "strength": ("float32", ["batch", k]),
        "keys": ("float32", ["batch", "tokens", d]),
        "values": ("float32", ["batch", "tokens", dv]),
        "pixels": ("float32", ["batch", "tokens", px]),
        "key_mask": ("bool", ["batch", "tokens"]),
    }
    assert io("animator", "outputs") == {"image": ("float32", ["batch", 3, SIZE, SIZE])}
    # A network without an expression (E = 0): exactly these tensors, in this order.
    names = {g: {side: [v["name"] for v in graphs[g][side]] for side in io_sides} for g in graphs}
    assert names["keypoints"] == {"inputs": ["image"], "outputs": ["keypoints", "strength"]}
    assert names["source_encoder"]["inputs"] == ["image", "keypoints", "strength"]
    assert names["animator"]["inputs"] == [
        "keypoints",
        "strength",
        "keys",
        "values",
        "pixels",
        "key_mask",
    ]
    # The exported graphs are exactly the contract that every consumer reads (iwarp.graphs).
    for name, spec in graph_specs(config.model).items():
        assert graphs[name]["inputs"] == [t.as_dict() for t in spec.inputs], name
        assert graphs[name]["outputs"] == [t.as_dict() for t in spec.outputs], name
    for info in graphs.values():
        assert set(info["max_abs_error"]) == {"random", "real"}
        assert max(info["max_abs_error"].values()) < 1e-3
    assert check_build(out, file_sha256(ckpt), config) == []


def test_animator_frames_match_torch(build, ckpt, tmp_path):
    out, _ = build
    photo = read_image(DEFAULT_AVATAR)
    clip = make_test_clip(tmp_path / "drive.mp4", frames=5, size=SIZE, image=photo)
    frames = read_video(clip)
    results = []
    for backend in (
        create_backend("torch", ckpt, device="cpu"),
        create_backend("onnxruntime", ckpt, build_dir=out, threads=2, show_progress=False),
    ):
        animator = Animator(backend)
        avatar = animator.add_avatar([photo, photo[:, ::-1]])  # two sources
        stream = animator.stream()
        assert stream.set_reference(frames[0])
        out = []
        for f in frames:
            out.append(stream.animate(avatar, f))
            assert stream.times.animator > 0  # a face was tracked and the network ran
        results.append(out)
    diffs = []
    for a, b in zip(*results, strict=True):
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
        diffs.append(int(np.abs(a.astype(int) - b.astype(int)).max()))
    print("max uint8 difference per frame, torch vs onnxruntime:", diffs)
    assert max(diffs) <= 2


def test_build_from_another_checkpoint_is_refused(build, tmp_path):
    out, _ = build
    other = _write_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(CheckpointError) as info:
        OrtBackend.from_checkpoint(other, out, show_progress=False)
    text = str(info.value)
    assert "\n" not in text
    assert "sha256" in text and "iwarp export --checkpoint" in text and str(out) in text

    smaller = _write_checkpoint(tmp_path / "small.safetensors", seed=0, image_size=128)
    with pytest.raises(CheckpointError, match=r"model\.image_size 256 -> 128"):
        OrtBackend.from_checkpoint(smaller, out, show_progress=False)


def test_default_cache_reuses_a_matching_build(build, ckpt, tmp_path, monkeypatch):
    """The cache folder is keyed by the checkpoint's sha256; a good build there is reused."""
    out, _ = build
    monkeypatch.setenv("IWARP_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "onnx" / file_sha256(ckpt)[:16]
    shutil.copytree(out, cached)
    backend = OrtBackend.from_checkpoint(ckpt, threads=1, show_progress=False)
    assert backend.build_dir == cached
    assert "onnxruntime" in backend.describe()


def test_default_cache_re_exports_a_stale_build(build, tmp_path, monkeypatch):
    """A stale build in the cache is exported again (for real), not refused."""
    out, _ = build
    other = _write_checkpoint(tmp_path / "other.safetensors", seed=2, image_size=128)
    monkeypatch.setenv("IWARP_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "onnx" / file_sha256(other)[:16]
    shutil.copytree(out, cached)  # graphs of another checkpoint where `other`'s belong
    backend = OrtBackend.from_checkpoint(other, threads=1, show_progress=False)
    assert backend.build_dir == cached
    meta = json.loads((cached / "metadata.json").read_text())
    assert meta["checkpoint_sha256"] == file_sha256(other)
    assert backend.image_size == 128


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    rc = main(
        ["export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    assert not (tmp_path / "metadata.json").exists()
