"""Convolutional building blocks shared by the sub-networks.

BatchNorm everywhere (it folds into the convolutions on export, so it is free at inference),
ReLU (the cheapest activation on every backend), nearest upsampling (a plain ONNX Resize).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class UpBlock(nn.Module):
    """2x nearest upsampling followed by a 3x3 convolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Hourglass with skip connections (FOMM style).

    `channels[0]` is the width at the input resolution; each further entry halves the
    resolution. The output has `channels[0]` channels at the input resolution.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = ConvBNReLU(in_channels, channels[0])
        self.down = nn.ModuleList(
            ConvBNReLU(channels[i], channels[i + 1], stride=2) for i in range(len(channels) - 1)
        )
        self.up = nn.ModuleList(
            UpBlock(channels[i + 1] if i == len(channels) - 2 else channels[i + 1] * 2, channels[i])
            for i in reversed(range(len(channels) - 1))
        )
        self.out_channels = channels[0] * 2
        self.bottleneck_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features at the input resolution, bottleneck features)."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        bottleneck = skips.pop()
        y = bottleneck
        for up in self.up:
            y = torch.cat([up(y), skips.pop()], dim=1)
        return y, bottleneck


def make_coordinate_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(H, W, 2) grid of (x, y) in [-1, 1], pixel centres (align_corners=False convention)."""
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
