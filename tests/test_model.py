"""Tests for iwarp.model: shapes, the split API, attention masking, ablations, configs, FLOPs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from iwarp.config import SHIPPED_CONFIG, Config, ModelConfig, get_config
from iwarp.errors import CheckpointError, ConfigError
from iwarp.model import ImplicitWarpingNetwork, SourceSet
from iwarp.model.keypoints import keypoint_maps
from iwarp.model.warp import attention
from iwarp.train.losses import equivariance_loss

SIZE = 64


def small_config(**overrides) -> ModelConfig:
    """A 64 px network with narrow layers: the paper's layout at a fraction of the cost of
    `paper` (`flow_warp=True`: the shipped `tiny_flow` design)."""
    base = dict(
        image_size=SIZE,
        num_keypoints=6,
        kp_channels=(8, 16, 16),
        query_channels=(8, 16, 16),
        key_channels=(8, 16, 16),
        attn_dim=16,
        value_channels=(8, 8, 16),
        value_dim=16,
        extra_tokens=4,
        residual_hidden=16,
        generator_channels=16,
        generator_res_blocks=1,
        generator_up_channels=(16, 8, 8),
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_net(seed: int = 0, **overrides) -> ImplicitWarpingNetwork:
    torch.manual_seed(seed)
    return ImplicitWarpingNetwork(small_config(**overrides))


def calibrated(net: ImplicitWarpingNetwork, sources: int = 2) -> ImplicitWarpingNetwork:
    """The net in eval mode with BatchNorm statistics of one random batch.

    At initialisation the running statistics are (0, 1), which squashes every activation so much
    that the eval-mode output barely depends on its inputs; real statistics make it sensitive.
    """
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    src, drv = images(4, sources, net.config.image_size, seed=99)
    with torch.no_grad():
        net.train()(src, drv)
    return net.eval()


def images(batch: int, sources: int, size: int = SIZE, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(batch, sources, 3, size, size, generator=g)
    drv = torch.rand(batch, 3, size, size, generator=g)
    return src, drv


def clone_source(s: SourceSet) -> SourceSet:
    return dataclasses.replace(
        s,
        keys=s.keys.clone(),
        values=s.values.clone(),
        pixels=s.pixels.clone(),
        mask=s.mask.clone(),
    )


# ------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("num_sources", [1, 2, 3])
def test_output_shapes(num_sources: int) -> None:
    cfg = small_config()
    net = make_net().eval()
    src, drv = images(2, num_sources)
    with torch.no_grad():
        out, kp, source = net(src, drv)
    assert out.shape == (2, 3, SIZE, SIZE)
    assert out.min() >= 0 and out.max() <= 1  # sigmoid output
    assert kp.points.shape == (2, cfg.num_keypoints, 2)
    assert kp.strength.shape == (2, cfg.num_keypoints)
    assert kp.points.abs().max() <= 1
    tokens = num_sources * cfg.tokens_per_source
    assert source.keys.shape == (2, tokens, cfg.attn_dim)
    assert source.values.shape == (2, tokens, cfg.value_dim)
    assert source.pixels.shape == (2, tokens, cfg.pixel_dim)
    assert source.mask.shape == (2, tokens) and bool(source.mask.all())
    assert source.keypoints.points.shape == (2, num_sources, cfg.num_keypoints, 2)
    assert source.tokens_per_source == cfg.grid_size**2


def test_shipped_config_shapes_at_256() -> None:
    cfg = get_config(SHIPPED_CONFIG).model
    assert cfg.image_size == 256
    torch.manual_seed(0)
    net = ImplicitWarpingNetwork(cfg).eval()
    src, drv = images(1, 1, size=256)
    with torch.no_grad():
        out, kp, source = net(src, drv)
    assert out.shape == (1, 3, 256, 256)
    assert kp.points.shape == (1, 20, 2)
    assert source.keys.shape == (1, 32 * 32, cfg.attn_dim)
    assert torch.isfinite(out).all()


def test_split_api_equals_forward() -> None:
    net = calibrated(make_net())
    src, drv = images(2, 3)
    with torch.no_grad():
        whole = net(src, drv)[0]
        split = net.animate(net.encode_sources(src), net.detect(drv))
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)


def test_sources_in_other_batch_rows_do_not_leak() -> None:
    # Row 0's output must not change when row 1's sources change (tokens are per batch row).
    net = calibrated(make_net())
    src, drv = images(2, 2)
    src2 = src.clone()
    src2[1] = torch.rand_like(src2[1])
    with torch.no_grad():
        a, b = net(src, drv)[0], net(src2, drv)[0]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-4


# ------------------------------------------------------------------------- masking and tokens


def test_fully_masked_sources_hand_all_attention_to_extra_tokens() -> None:
    net = calibrated(make_net())
    src, drv = images(2, 2)
    with torch.no_grad():
        source = net.encode_sources(src)
        kp = net.detect(drv)
        source.mask[:] = False
        masked = net.animate(source, kp)

        # Anything on the source side may change: nothing is attended to.
        other = clone_source(source)
        other.keys.normal_()
        other.values.normal_()
        other.pixels.uniform_()
        torch.testing.assert_close(net.animate(other, kp), masked, rtol=0, atol=1e-6)
        # ... whereas with the mask open the same change moves the output.
        open_a, open_b = clone_source(source), clone_source(other)
        open_a.mask[:] = True
        open_b.mask[:] = True
        assert (net.animate(open_a, kp) - net.animate(open_b, kp)).abs().max() > 1e-3

        # The attention weights, written out: zero on sources, all mass on the extra tokens.
        warp = net.warp
        maps = keypoint_maps(kp, net.config.kp_size, net.config.kp_variance)
        q = warp.project_queries(net.query_encoder(maps))
        b, e = q.shape[0], warp.extra_keys.shape[0]
        keys = torch.cat([source.keys, warp.extra_keys.expand(b, e, -1)], dim=1)
        mask = torch.cat([source.mask, source.mask.new_ones(b, e)], dim=1)
        logits = q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
        weights = torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
        n_src = source.keys.shape[1]
        assert torch.all(weights[..., :n_src] == 0)
        torch.testing.assert_close(
            weights[..., n_src:].sum(-1), torch.ones(weights.shape[:2]), rtol=0, atol=1e-6
        )
        # The network's attention() computes exactly these weights times the values.
        values = torch.cat([source.values, warp.extra_values.expand(b, e, -1)], dim=1)
        torch.testing.assert_close(
            attention(q, keys, values, mask), weights @ values, rtol=1e-5, atol=1e-5
        )


def test_attention_mask_semantics_partial() -> None:
    # True = may be attended to: masking one key equals deleting it.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 2] = False
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(
        attention(q, k, v, mask),
        attention(q, k[:, keep], v[:, keep], mask[:, keep]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_source_dropout_masks_tokens_and_stays_finite() -> None:
    net = make_net().train()
    src, drv = images(2, 2)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = net(src, drv, source_dropout=0.0)[0]
        torch.manual_seed(3)
        dropped = net(src, drv, source_dropout=0.5)[0]
        assert (plain - dropped).abs().max() > 1e-4

        torch.manual_seed(3)
        all_dropped = net(src, drv, source_dropout=1.0)[0]
        assert torch.isfinite(all_dropped).all()
        # p = 1 drops every source token: the same as masking them all by hand.
        source = net.encode_sources(src)
        source.mask[:] = False
        by_hand = net.animate(source, net.detect(drv))
    torch.testing.assert_close(all_dropped, by_hand, rtol=0, atol=1e-6)


def test_source_dropout_with_gradients_is_finite() -> None:
    net = make_net().train()
    src, drv = images(2, 3)
    out = net(src, drv, source_dropout=1.0)[0]
    (out - drv).abs().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------- gradients


def test_gradients_reach_every_subnetwork() -> None:
    net = make_net().train()
    src, drv = images(2, 2)
    torch.manual_seed(0)
    out, kp, _ = net(src, drv, source_dropout=0.2)
    loss = (out - drv).abs().mean()
    loss = loss + equivariance_loss(net.keypoint_detector, drv, kp.points)
    loss.backward()

    for sub in (
        "keypoint_detector",
        "query_encoder",
        "key_encoder",
        "value_encoder",
        "warp",
        "generator",
    ):
        params = list(getattr(net, sub).named_parameters())
        nonzero = [n for n, p in params if p.grad is not None and p.grad.abs().sum() > 0]
        assert len(nonzero) >= 0.9 * len(params), (sub, sorted({n for n, _ in params} - {*nonzero}))
    warp = net.warp
    must = {
        "extra_keys": warp.extra_keys,
        "extra_values": warp.extra_values,
        "extra_pixels": warp.extra_pixels,
        "query_proj": warp.query_proj.weight,
        "key_proj": warp.key_proj.weight,
        "strength head": net.keypoint_detector.strength.weight,
        "heatmap head": net.keypoint_detector.heatmap.weight,
        **{f"residual.{n}": p for n, p in warp.residual.named_parameters()},
    }
    for name, p in must.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------- ablations


@pytest.mark.parametrize(
    "overrides",
    [{"residual_branch": False}, {"extra_tokens": 0}, {"multi_source_mode": "average"}],
    ids=["no-residual", "no-extra", "average"],
)
@pytest.mark.parametrize("num_sources", [1, 3])
def test_ablations_build_and_run(overrides: dict, num_sources: int) -> None:
    net = make_net(**overrides).train()
    src, drv = images(2, num_sources)
    out = net(src, drv, source_dropout=0.2)[0]
    assert out.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(out).all()
    (out - drv).abs().mean().backward()
    if not overrides.get("residual_branch", True):
        assert not hasattr(net.warp, "residual")


def test_average_mode_matches_attention_for_one_source() -> None:
    attn = calibrated(make_net())
    avg = ImplicitWarpingNetwork(small_config(multi_source_mode="average")).eval()
    avg.load_state_dict(attn.state_dict())  # the mode adds no parameters
    src, drv = images(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(avg(src, drv)[0], attn(src, drv)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flow_warp", [False, True], ids=["paper-layout", "flow-warp"])
def test_average_mode_averages_per_source_warps(flow_warp: bool) -> None:
    # Three copies of one source: averaging three identical warps equals the single warp, while
    # one joint softmax over three copies shifts mass away from the extra tokens. The flow warp
    # is what `iwarp eval`'s averaging baseline runs (the shipped weights).
    attn = calibrated(make_net(flow_warp=flow_warp))
    avg = ImplicitWarpingNetwork(small_config(multi_source_mode="average", flow_warp=flow_warp))
    avg.eval()
    avg.load_state_dict(attn.state_dict())
    src, drv = images(2, 1)
    triple = src.expand(-1, 3, -1, -1, -1)
    with torch.no_grad():
        single = attn(src, drv)[0]
        torch.testing.assert_close(avg(triple, drv)[0], single, rtol=1e-5, atol=1e-5)
        assert (attn(triple, drv)[0] - single).abs().max() > 1e-5


def test_spatial_reduction_reduces_key_tokens() -> None:
    full = calibrated(make_net())
    reduced = ImplicitWarpingNetwork(small_config(spatial_reduction=2)).eval()
    reduced.load_state_dict(full.state_dict())
    src, drv = images(2, 2)
    with torch.no_grad():
        s_full = full.encode_sources(src)
        s_red = reduced.encode_sources(src)
        out = reduced.animate(s_red, reduced.detect(drv))
    assert s_full.keys.shape[1] == 4 * s_red.keys.shape[1]
    assert s_red.values.shape[1] == s_red.pixels.shape[1] == s_red.keys.shape[1]
    assert s_red.tokens_per_source == reduced.config.tokens_per_source
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()
    # Pooled pixels are the 2x2 means of the full-resolution pixel tokens.
    g = full.config.grid_size
    p = full.config.pixel_dim
    pix = s_full.pixels[:, : g * g].reshape(2, g, g, p).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(pix, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(s_red.pixels[:, : (g // 2) ** 2], pooled, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny_flow", "paper", "paper512"])
def test_config_json_round_trip(name: str) -> None:
    c = get_config(name)
    back = Config.from_json(c.to_json())
    assert back == c
    assert isinstance(back.model.kp_channels, tuple)
    assert isinstance(back.train.betas, tuple)
    assert isinstance(back.train.loss, type(c.train.loss))


def test_config_round_trip_keeps_changes() -> None:
    c = get_config("tiny_flow", image_size=128)
    c.model.extra_tokens = 0
    c.model.multi_source_mode = "average"
    c.train.loss.gan = 0.5
    back = Config.from_json(c.to_json())
    assert back == c
    assert back.model.grid_size == 16


def test_unknown_config_keys_raise() -> None:
    data = get_config("tiny_flow").to_dict()
    data["surprise"] = 1
    with pytest.raises(CheckpointError, match="surprise"):
        Config.from_dict(data)
    data = get_config("tiny_flow").to_dict()
    data["model"]["attn_heads"] = 4
    with pytest.raises(CheckpointError, match="attn_heads"):
        Config.from_json(json.dumps(data))


def test_unknown_preset_raises() -> None:
    with pytest.raises(ConfigError, match="nope"):
        get_config("nope")


def test_retired_pixel_skip_is_read_only_when_off() -> None:
    """Checkpoints written before the pixel skip was retired carry `pixel_skip` (the shipped
    weights: False, read as before); pixel-skip weights are refused with what to do."""
    data = get_config("tiny_flow").to_dict()
    data["model"]["pixel_skip"] = False
    assert Config.from_dict(data) == get_config("tiny_flow")
    data["model"]["pixel_skip"] = True
    with pytest.raises(CheckpointError, match="pixel_skip = True is retired"):
        Config.from_dict(data)


def test_commands_default_to_the_shipped_config() -> None:
    from iwarp.checkpoint import Checkpoint
    from iwarp.model.stats import InfoOptions
    from iwarp.paths import DEFAULT_CHECKPOINT
    from iwarp.train.trainer import TrainOptions

    assert Checkpoint(DEFAULT_CHECKPOINT).config.name == SHIPPED_CONFIG
    assert InfoOptions().config == SHIPPED_CONFIG
    assert TrainOptions(data="", out="").config == SHIPPED_CONFIG


def test_invalid_model_config_rejected() -> None:
    with pytest.raises(ValueError):
        ImplicitWarpingNetwork(small_config(image_size=60))
    with pytest.raises(ValueError):
        ImplicitWarpingNetwork(small_config(generator_up_channels=(8, 8)))


# -------------------------------------------------------------------------------- FLOP budget


def test_shipped_flop_budget() -> None:
    from iwarp.model.stats import model_stats

    stats = model_stats(SHIPPED_CONFIG)
    assert stats["size"] == 256
    assert 0.1 < stats["gflop_per_frame"] <= 3.0
    assert stats["gflop_per_source"] > 0
    assert stats["parameters"] == sum(stats["parameters_by_module"].values())
    assert stats["query_tokens"] == 32 * 32
    assert stats["key_tokens"] == 32 * 32 + get_config(SHIPPED_CONFIG).model.extra_tokens


def test_paper_configs_follow_the_paper() -> None:
    paper, paper512 = get_config("paper").model, get_config("paper512").model
    assert paper.attn_dim == 256 and paper512.attn_dim == 256
    assert (paper.image_size, paper.grid_size) == (256, 32)
    assert (paper512.image_size, paper512.grid_size) == (512, 64)
    assert paper.num_keypoints == 20
