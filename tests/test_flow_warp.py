"""The flow warp (ModelConfig.flow_warp): attention mass and expected coordinates become a
sub-pixel flow that resamples the full-resolution photos; plus the training-recipe pieces
(cosine schedule, EMA, loading the weights of an ablation) and the seam/flicker metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model import SIZE, small_config

from iwarp.checkpoint import load_network
from iwarp.config import TrainConfig, get_config
from iwarp.errors import ConfigError
from iwarp.evaluation.metrics import blockiness, carry_landmarks, flicker, temporal_error
from iwarp.media import read_image
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.warp import photos_from_pixels, render_flow, source_coordinates
from iwarp.paths import DEFAULT_AVATAR
from iwarp.train.trainer import EmaWeights, learning_rate, load_compatible


def _photo(size: int = SIZE) -> torch.Tensor:
    """The packaged portrait, (1, 3, size, size) in [0, 1]: a real image with edges."""
    image = torch.from_numpy(read_image(DEFAULT_AVATAR)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(size, size), mode="area")


def test_source_coordinates_are_block_diagonal_cell_centres() -> None:
    coords = source_coordinates(2, 4, torch.zeros(1))
    assert coords.shape == (1, 32, 6)
    # Source 0 owns columns 0..2 for its 16 tokens, source 1 columns 3..5.
    assert torch.equal(coords[0, :16, 3:], torch.zeros(16, 3))
    assert torch.equal(coords[0, 16:, :3], torch.zeros(16, 3))
    assert torch.equal(coords[0, :16, 0], torch.ones(16))
    # 4x4 grid: centres at -0.75, -0.25, 0.25, 0.75; x varies fastest (row-major tokens).
    assert coords[0, :4, 1].tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert coords[0, 0:16:4, 2].tolist() == [-0.75, -0.25, 0.25, 0.75]
    # The extra tokens' rows come after the sources' and carry nothing.
    with_extra = source_coordinates(2, 4, torch.zeros(1), extra_rows=20)
    assert with_extra.shape == (1, 52, 6)
    assert torch.equal(with_extra[:, :32], coords) and not with_extra[0, 32:].any()


def test_identity_attention_renders_the_photo() -> None:
    """Attention that puts all mass on each query's own cell reproduces the photo (bilinear
    interpolation of a linear coordinate field is exact away from the outer half-cell)."""
    photo = _photo()
    side = 8
    coords = source_coordinates(1, side, photo)  # one-hot attention = the rows themselves
    warp = render_flow(coords, photo[:, None], side)
    blended, unmatched = warp.blended, warp.unmatched
    border = SIZE // side // 2
    inner = (slice(None), slice(None), slice(border, -border), slice(border, -border))
    assert torch.allclose(blended[inner], photo[inner], atol=1e-4)
    assert float(unmatched.max()) < 1e-6


def test_mass_blends_sources_and_marks_unmatched_queries() -> None:
    a, b = torch.zeros(1, 3, SIZE, SIZE), torch.ones(1, 3, SIZE, SIZE)
    side = 4
    rows = source_coordinates(2, side, a)
    # Every query: 30 % on source a's own cell, 50 % on b's, 20 % on an extra token (zeros).
    sums = 0.3 * rows[:, : side * side] + 0.5 * rows[:, side * side :]
    warp = render_flow(sums, torch.stack([a, b], dim=1), side)
    assert torch.allclose(warp.blended, torch.full_like(warp.blended, 0.5 / 0.8), atol=1e-5)
    assert torch.allclose(warp.unmatched, torch.full_like(warp.unmatched, 0.2), atol=1e-5)
    assert torch.allclose(warp.mass[:, 0], torch.full_like(warp.mass[:, 0], 0.3), atol=1e-5)


def test_flow_network_split_api_and_gradients() -> None:
    torch.manual_seed(0)
    cfg = small_config(flow_warp=True, position_scale=3.0)
    net = ImplicitWarpingNetwork(cfg)
    for n in (1, 2, 3):
        sources = torch.rand(2, n, 3, SIZE, SIZE)
        out, _, source = net(sources, torch.rand(2, 3, SIZE, SIZE), source_dropout=0.2)
        assert out.shape == (2, 3, SIZE, SIZE)
        # The photos travel as the pixel rows (token layout), losslessly.
        assert torch.equal(photos_from_pixels(source.pixels, SIZE // 8), sources)
    out.mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("size", [128, 96])
def test_untrained_flow_network_starts_as_the_identity_warp(size: int) -> None:
    """The identity start: queries and keys begin as the positional code alone, so each
    query's expected source coordinate is its own position and the warp copies the photo.
    Exact away from the border; in the outer cell the attention's truncated neighbourhood
    pulls the coordinate inward by a fraction of a cell. A 128-px network given 96-px photos
    (training crops smaller than the config's) warps on a 12x12 grid, not its own 16x16."""
    torch.manual_seed(0)
    net = ImplicitWarpingNetwork(get_config("tiny_flow", image_size=128).model).eval()
    photo = _photo(size)
    with torch.no_grad():
        source = net.encode_sources(photo[:, None])
        image, warp = net.animate_with_warp(source, net.detect(photo))
    blended, unmatched = warp.blended, warp.unmatched

    def psnr(x: torch.Tensor, border: int) -> float:
        inner = (..., slice(border, -border), slice(border, -border))
        return float(-10 * torch.log10(((x[inner] - photo[inner]) ** 2).mean()))

    assert psnr(blended, 16) > 45.0
    assert psnr(blended, 1) > 20.0
    assert float(unmatched.max()) < 1e-3
    assert psnr(image, 16) > 30.0  # the generator starts by showing the warp


def test_attention_filter_outputs_are_what_is_rendered() -> None:
    """`animate_with_warp(..., attention_filter=f)` renders f's outputs: an unchanged pass is
    the plain animation, and another frame's attention outputs render that frame."""
    net, _ = load_network()
    photo = _photo(net.config.image_size)
    with torch.no_grad():
        source = net.encode_sources(photo[:, None])
        kp_photo, kp_mirror = net.detect(photo), net.detect(photo.flip(-1))
        seen = []
        mirror, _ = net.animate_with_warp(
            source, kp_mirror, attention_filter=lambda a: seen.append(a) or a
        )
        assert torch.equal(mirror, net.animate(source, kp_mirror))
        swapped, _ = net.animate_with_warp(source, kp_photo, attention_filter=lambda a: seen[0])
        plain = net.animate(source, kp_photo)
    assert len(seen) == 1 and len(seen[0]) == 3
    assert torch.allclose(swapped, mirror, atol=1e-6)
    assert float((plain - mirror).abs().mean()) > 0.01


def test_load_compatible_into_an_ablation_without_extra_tokens() -> None:
    """The flow ablations start from trained weights with a part removed: no extra tokens
    means empty extra rows, left as they are; everything else is copied."""
    trained = ImplicitWarpingNetwork(get_config("tiny_flow").model)
    config = get_config("tiny_flow")
    config.model.extra_tokens = 0
    ablated = ImplicitWarpingNetwork(config.model)
    adapted = load_compatible(ablated, trained.state_dict())
    assert sorted(adapted) == sorted(
        f"warp.{n} (shape (32, {w}): left new)"
        for n, w in (("extra_keys", 64), ("extra_values", 64), ("extra_pixels", 3))
    )
    assert ablated.warp.extra_pixels.shape == (0, 3)
    assert torch.equal(ablated.generator.out.weight, trained.generator.out.weight)


def test_cosine_schedule_and_ema() -> None:
    tc = dataclasses.replace(TrainConfig(), lr=1.0, lr_schedule="cosine", lr_min_ratio=0.1)
    assert learning_rate(tc, 0, 101) == pytest.approx(1.0)
    assert learning_rate(tc, 50, 101) == pytest.approx(0.55)
    assert learning_rate(tc, 100, 101) == pytest.approx(0.1)
    assert learning_rate(dataclasses.replace(tc, lr_schedule="constant"), 70, 101) == 1.0
    # An unknown schedule is a config error, found by TrainConfig.validate before a run starts.
    with pytest.raises(ConfigError, match="lr_schedule 'linear'"):
        dataclasses.replace(tc, lr_schedule="linear").validate()
    with pytest.raises(ConfigError, match="lr_schedule 'linear'"):
        learning_rate(dataclasses.replace(tc, lr_schedule="linear"), 0, 101)

    net = torch.nn.Linear(2, 2)
    ema = EmaWeights(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update(net, step=1000)
    assert torch.allclose(ema.module.weight, start + 1.0)
    # Warm-up: at step 0 the average moves 90 % of the way (decay 1/10), not 50 %.
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10**6) == 0.5
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update(net, step=0)
    assert torch.allclose(ema.module.weight, start + 1.0 + 0.9 * 3.0)


def test_blockiness_sees_grid_seams_at_any_phase() -> None:
    # Slightly blurred so its JPEG grid (the packaged photo is a JPEG) does not count.
    photo = F.avg_pool2d(_photo(136), 3, stride=1, padding=1, count_include_pad=False)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(1, 3, 17, 17, generator=g).repeat_interleave(8, -1).repeat_interleave(8, -2)
    blocky = photo + (blocks - 0.5) * 0.15
    natural = blockiness(photo[..., :128, :128])
    assert natural < 1.2  # a real photo: about as sharp on the grid lines as off them
    assert blockiness(blocky[..., :128, :128]) > natural + 0.2
    # The grid 3 rows and 5 columns off the image's origin is found as well.
    assert blockiness(blocky[..., 3:131, 5:133]) > natural + 0.2


def test_flicker_is_relative_to_the_driving_video() -> None:
    driving = torch.rand(5, 3, 16, 16)
    assert flicker(driving, driving) == pytest.approx(1.0)
    assert flicker(driving[:1].expand(5, -1, -1, -1), driving) == 0.0
    assert flicker(driving * 2, driving) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        flicker(driving[:1], driving[:1])


def test_temporal_error_tells_jitter_from_followed_motion() -> None:
    """Following the video is 0, a still output is 1; jitter on top of followed motion scores
    above 0 while flicker calls the jittery and the faithful output nearly the same."""
    driving = torch.cumsum(torch.rand(6, 3, 16, 16) * 0.05, dim=0)  # steady drift
    still = driving[:1].expand(6, -1, -1, -1)
    assert temporal_error(driving, driving) == pytest.approx(0.0, abs=1e-6)
    assert temporal_error(still, driving) == pytest.approx(1.0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]).view(6, 1, 1, 1)
    jittery = driving + 0.01 * sign
    assert temporal_error(jittery, driving) > 0.5
    with pytest.raises(ValueError):
        temporal_error(driving[:1], driving[:1])


def test_carry_landmarks_follows_a_shift() -> None:
    """A backward flow that reads the source 6 px to the right moves features 6 px left."""
    h = w = 32
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    flow = torch.stack([(xs + 6) * 2 / w - 1, ys * 2 / h - 1])
    points = np.array([[20.0, 10.0], [12.0, 25.0]])
    carried = carry_landmarks(flow, points)  # pixel-index coordinates, as dlib gives them
    assert np.allclose(carried, points - [6, 0])


def test_flow_smoothness_frees_affine_motion_and_catches_folds() -> None:
    from iwarp.train.losses import flow_smoothness_loss

    h = w = 64
    theta = torch.tensor([[[1.1, 0.1, 0.05], [-0.1, 0.95, 0.0]]])  # zoom, turn, shift
    affine = F.affine_grid(theta, [1, 3, h, w], align_corners=False).permute(0, 3, 1, 2)[:, None]
    mass, flat = torch.ones(1, 1, 1, h, w), torch.zeros(1, 3, h, w)
    assert float(flow_smoothness_loss(affine, mass, flat, 8)) < 1e-4
    folded = affine.clone()
    folded[..., 24:40] += 0.1 * torch.sin(torch.linspace(0, 6.28, 16))
    bent = float(flow_smoothness_loss(folded, mass, flat, 8))
    assert bent > 0.5
    # Unused by the attention (no mass): free; across a strong image edge: cheaper.
    assert float(flow_smoothness_loss(folded, mass * 0, flat, 8)) == 0.0
    edge = flat.clone()
    edge[..., 32:] = 1.0
    assert float(flow_smoothness_loss(folded, mass, edge, 8)) < bent


def test_selection_split_holds_out_whole_train_identities(tmp_path) -> None:
    from iwarp.train.data import find_clips

    rows = ["path,split,identity,frames"]
    for i in range(20):
        rows.append(f"c{i}.mp4,train,person{i % 10},100")
    rows.append("v.mp4,val,visitor,100")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    train = find_clips(tmp_path, "train")
    select = find_clips(tmp_path, "select")
    held = {c.identity for c in select}
    assert 1 <= len(held) < 10 and not held & {c.identity for c in train}
    assert len(train) + len(select) == 20
    assert len(select) >= 2  # 10 % of 2000 frames: at least one whole identity (2 clips)
    assert [c.identity for c in find_clips(tmp_path, "val")] == ["visitor"]


def test_driving_motion_moves_the_frame_and_keeps_its_range() -> None:
    from iwarp.train.data import move_frames

    frame = torch.from_numpy(read_image(DEFAULT_AVATAR)[:128, :128].copy()).permute(2, 0, 1)
    frame = frame.float() / 255
    moved = [move_frames(frame, np.random.default_rng(seed))[0] for seed in range(4)]
    assert all(m.shape == frame.shape and 0 <= float(m.min()) <= float(m.max()) <= 1 for m in moved)
    assert all(float((m - frame).abs().mean()) > 0.005 for m in moved)


# ------------------------------------------------------------------ the flow warp's graphs


@pytest.fixture(scope="module")
def flow_build(tmp_path_factory):
    """A tiny_flow network at 128 px (random, identity start) exported by `export_onnx`,
    whose parity check (1-3 sources, random and real inputs) must pass to return."""
    from iwarp.checkpoint import save_checkpoint
    from iwarp.engine_build.export import export_onnx

    torch.manual_seed(0)
    config = get_config("tiny_flow", image_size=128)
    net = ImplicitWarpingNetwork(config.model)
    for encoder in (net.query_encoder, net.key_encoder):  # leave the identity start: real motion
        torch.nn.init.normal_(encoder.out.weight, std=0.05)
    folder = tmp_path_factory.mktemp("flow")
    ckpt = save_checkpoint(folder / "flow.safetensors", config, net)
    meta = export_onnx(ckpt, folder / "onnx", show_progress=False)
    return folder / "onnx", meta, config


def test_flow_graphs_keep_the_avatar_rows_contract(flow_build) -> None:
    """The animator takes the same inputs as the pixel skip's: the photos travel as the pixel
    rows, the number of sources is tokens / T inside the graph."""
    from iwarp.graphs import ANIMATOR_GRAPH, graph_specs

    _, meta, config = flow_build
    animator = meta["graphs"][ANIMATOR_GRAPH]
    names = graph_specs(config.model)[ANIMATOR_GRAPH].input_names
    assert [i["name"] for i in animator["inputs"]] == list(names)
    pixels = next(i for i in animator["inputs"] if i["name"] == "pixels")
    assert pixels["shape"][-1] == 3 * config.model.attn_stride**2
    assert max(animator["max_abs_error"].values()) < 1e-3


def test_flow_graph_plugin_rewrite_matches_with_1_and_3_sources(flow_build) -> None:
    import onnx
    import onnxruntime as ort

    from iwarp.engine_build import rewrite
    from iwarp.engine_build.export import example_inputs

    out, _, config = flow_build
    original = onnx.load(str(out / "animator.onnx"))
    rewritten = rewrite.rewrite_attention(original)
    assert len(rewrite.plugin_nodes(rewritten)) == 1

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    ref, expanded = session(original), session(rewrite.expand_plugin_nodes(rewritten))
    for sources in (1, 3):
        feeds = example_inputs(config, "animator", 1, sources, seed=sources)
        np.testing.assert_allclose(
            expanded.run(None, feeds)[0], ref.run(None, feeds)[0], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("method", ["onnxconverter-common", "modelopt-autocast"])
def test_flow_graph_converts_to_fp16(flow_build, tmp_path, method) -> None:
    """FP16 copies run with any number of sources. On random avatar rows the flow warp is more
    sensitive to FP16 than the pixel skip (near-uniform attention over random keys: a query's
    expected coordinate moves with every rounding of its logits): 35-41 dB from FP32, where
    the trained 128 px flow weights on a real avatar and driving frame give 62.5 dB. A
    conversion that broke the coordinates or the photo rows falls far below 30."""
    import onnxruntime as ort

    from iwarp.engine_build import fp16
    from iwarp.engine_build.export import example_inputs
    from iwarp.metrics import psnr

    if method == "modelopt-autocast" and not fp16.modelopt_available():
        pytest.skip("nvidia-modelopt (its ONNX AutoCast) is not installed")
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common not installed")
    out, _, config = flow_build
    result = fp16.convert_fp16(out / "animator.onnx", tmp_path / "animator.onnx", method)
    half = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(out / "animator.onnx"), providers=["CPUExecutionProvider"])
    for sources in (1, 3):
        feeds = example_inputs(config, "animator", 1, sources, seed=sources)
        got, ref = half.run(None, feeds)[0], full.run(None, feeds)[0]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        assert psnr(got, ref) > 30.0


def test_stills_become_pairs_with_synthetic_motion(tmp_path) -> None:
    """Portrait stills: face-cropped like the clips (a photo without a face is skipped with a
    warning), then each sample moves one still into sources and a driving frame."""
    import cv2

    from iwarp.media import make_test_clip
    from iwarp.train.data import ClipDataset, load_stills

    photos = tmp_path / "photos"
    photos.mkdir()
    portrait = read_image(DEFAULT_AVATAR)
    cv2.imwrite(str(photos / "portrait.png"), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(photos / "wall.png"), np.full((200, 200, 3), 128, np.uint8))
    with pytest.warns(UserWarning, match="wall.png: no face"):
        stills = load_stills(photos, 64, cache_dir=tmp_path / "cache", show_progress=False)
    assert stills.shape == (1, 64, 64, 3) and stills.dtype == np.uint8
    assert np.array_equal(load_stills(photos, 64, tmp_path / "cache", False), stills)  # cached

    clips = tmp_path / "clips"
    clips.mkdir()
    make_test_clip(clips / "a.mp4", frames=6, size=128, image=portrait)
    data = ClipDataset(clips, 64, split=None, cache_dir=tmp_path / "cache", show_progress=False)
    data.add_stills(stills, share=1.0)
    sources, driving, landmarks, source_landmarks = data.sample(np.random.default_rng(0), 2)
    assert sources.shape == (2, 3, 64, 64) and driving.shape == (3, 64, 64)
    assert np.isnan(landmarks).all()  # a still: no landmarks to guide with
    assert source_landmarks.shape == (2, 68, 2) and np.isnan(source_landmarks).all()
    assert float((sources[0] - driving).abs().mean()) > 0.005  # moved apart


# ------------------------------------------------------------------ temporal pairs and loss


def _clip_dataset(clips: list[np.ndarray]):
    """A ClipDataset over frames already in memory, as the GPU check builds one."""
    from iwarp.train.data import ClipDataset

    data = ClipDataset.__new__(ClipDataset)
    data.clips, data.size = clips, clips[0].shape[1]
    weights = np.sqrt([len(c) for c in clips])
    data.clip_weights = weights / weights.sum()
    return data


def test_temporal_pairs_share_sources_and_neighbour_in_one_clip() -> None:
    """Frames carry their clip and index in their pixels: a pair's two driving frames come
    from one clip, 1..gap frames apart, and both samples of a pair have the same sources."""
    clips = [
        np.stack([np.full((16, 16, 3), (c, i, 0), np.uint8) for i in range(n)])
        for c, n in ((10, 40), (20, 2), (30, 25))
    ]
    data = _clip_dataset(clips)
    sources, driving, landmarks, source_landmarks = data.batch_with_landmarks(
        0, 7, 8, 2, augment=False, temporal_gap=2
    )
    assert sources.shape == (8, 2, 3, 16, 16) and driving.shape == (8, 3, 16, 16)
    assert landmarks.shape == (8, 68, 2) and torch.isnan(landmarks).all()
    assert source_landmarks.shape == (8, 2, 68, 2) and torch.isnan(source_landmarks).all()
    code = (driving[:, :2, 0, 0] * 255).round().long()  # (clip, index) of each frame
    gaps = []
    for a in range(0, 8, 2):
        assert torch.equal(sources[a], sources[a + 1])
        assert code[a, 0] == code[a + 1, 0] != 20  # one clip, never the 2-frame one (no gap-2 pair)
        gaps.append(int(code[a + 1, 1] - code[a, 1]))
    assert set(gaps) <= {1, 2} and len(set(gaps)) >= 1
    with pytest.raises(ValueError, match="even batch"):
        data.batch_with_landmarks(0, 0, 3, 1, temporal_gap=2)


def test_temporal_pairs_get_one_augmentation() -> None:
    """A clip of one repeated photo: whatever flip, colour change and driving-frame move a pair
    gets, its two driving frames must come out equal, or the loss would price the augmentation."""
    photo = read_image(DEFAULT_AVATAR)[:96, :96]
    data = _clip_dataset([np.stack([photo] * 6)])
    moved = 0
    for step in range(12):
        _, driving, _, _ = data.batch_with_landmarks(0, step, 2, 1, temporal_gap=2)
        torch.testing.assert_close(driving[0], driving[1], atol=0, rtol=0)
        unmoved = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
        moved += float((driving[0].mean(0) - unmoved.mean(0)).abs().mean()) > 0.02
    assert moved > 0  # some pairs were moved or recoloured, and still match


def test_temporal_loss_prices_only_error_that_changes() -> None:
    from iwarp.train.losses import temporal_loss

    torch.manual_seed(0)
    driving = torch.rand(4, 3, 8, 8)
    steady_error = torch.rand(2, 1, 3, 8, 8).expand(2, 2, 3, 8, 8).flatten(0, 1) * 0.3
    assert float(temporal_loss(driving + steady_error, driving)) < 1e-6
    jitter = torch.zeros(4, 3, 8, 8)
    jitter[1::2] = 0.1  # the second frame of each pair is off by 0.1 everywhere
    assert float(temporal_loss(driving + jitter, driving)) == pytest.approx(0.1, abs=1e-6)
    still = driving[::2].repeat_interleave(2, dim=0)  # output stuck at the first frame
    change = (driving[1::2] - driving[::2]).abs().mean()
    assert float(temporal_loss(still, driving)) == pytest.approx(float(change), rel=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        temporal_loss(driving[:3], driving[:3])


def test_stillness_loss_prices_change_only_where_the_video_is_still() -> None:
    from iwarp.train.losses import stillness_loss

    torch.manual_seed(0)
    frame = torch.rand(1, 3, 32, 32)
    moved = frame.clone()
    moved[..., :, 16:] = torch.rand(1, 3, 32, 16)  # the right half changes, the left stays
    driving = torch.cat([frame, moved])
    assert float(stillness_loss(driving, driving)) < 1e-6  # following the video costs nothing
    frozen = frame.expand(2, 3, 32, 32)  # not following the moving half costs nothing either
    assert float(stillness_loss(frozen, driving)) < 1e-6
    wobble = driving.clone()
    wobble[1, :, :, :4] += 0.2  # the still left edge changes by 0.2 in the second frame
    assert float(stillness_loss(wobble, driving)) == pytest.approx(0.2 * 4 * 32 / 1024, rel=1e-5)
    right_only = driving.clone()
    right_only[1, :, :, 24:] += 0.2  # change inside the moving half: not priced
    assert float(stillness_loss(right_only, driving)) < 1e-6
    with pytest.raises(ValueError, match="pairs"):
        stillness_loss(driving[:1], driving[:1])


def test_temporal_split_adds_up_to_flicker_and_temporal_error() -> None:
    from iwarp.evaluation.metrics import temporal_split

    torch.manual_seed(0)
    driving = torch.rand(1, 3, 32, 32).repeat(5, 1, 1, 1)
    driving[:, :, :, 16:] = torch.rand(5, 3, 32, 16)  # the right half moves, the left is still
    output = driving + 0.05 * torch.randn_like(driving)  # follows, with jitter everywhere
    parts = temporal_split(output, driving)
    for name, total in (("flicker", flicker), ("temporal_error", temporal_error)):
        whole = parts[f"{name}_still"] + parts[f"{name}_moving"]
        assert whole == pytest.approx(total(output, driving), rel=1e-5)
    # The still left half, less the 4-px band the 9x9 window blurs the moving half into: 3/8
    # of the pixels (a few more at the corners, where the window reaches over the border).
    assert parts["still_share"] == pytest.approx(12 / 32, abs=0.005)
    assert parts["flicker_still"] > 0  # jitter where the video is still shows up there
    assert temporal_split(driving, driving)["temporal_error_still"] == 0.0
    with pytest.raises(ValueError, match="same number"):
        temporal_split(output[:1], driving[:1])
