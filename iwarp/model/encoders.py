"""Query, key and value encoders, and the fixed 2-D positional encoding they share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import ConvBNReLU, UNet
from iwarp.model.expression import ExpressionFiLM


def sincos_position_encoding(size: int, dim: int, reference: int = 32) -> torch.Tensor:
    """Fixed 2-D sin-cos encoding, (size*size, dim): half the channels for x, half for y.

    Positions are measured in cells of a `reference`-sized grid, so the same place in the
    image gets the same code at any resolution (a model trained at 128 px runs at 256 px).
    """
    if dim % 4:
        raise ValueError(f"positional encoding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    pos = (torch.arange(size, dtype=torch.float32) + 0.5) * (reference / size)
    angles = pos[:, None] * freqs[None, :]  # (size, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (size, dim/2)
    return torch.cat(
        [axis.repeat(size, 1), axis.repeat_interleave(size, dim=0)], dim=1
    )  # row-major tokens: x varies fastest


class _GridUNet(nn.Module):
    """UNet at the keypoint resolution, ending on the attention grid with `out_dim` channels."""

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        out_dim: int,
        stride: int,
        film_expression_dim: int = 0,
    ):
        super().__init__()
        self.unet = UNet(in_channels, channels)
        layers: list[nn.Module] = []
        cin = self.unet.out_channels
        for _ in range(int(math.log2(stride))):
            layers.append(ConvBNReLU(cin, cin, stride=2))
        self.to_grid = nn.Sequential(*layers)
        # The input's last `film_expression_dim` channels are the expression planes.
        self.film = ExpressionFiLM(film_expression_dim, cin) if film_expression_dim else None
        self.out = nn.Conv2d(cin, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.unet(x)
        features = self.to_grid(features)
        if self.film is not None:
            features = self.film(features, x[:, -self.film.expression_dim :])
        return self.out(features)


class QueryEncoder(_GridUNet):
    """Driving keypoint maps (B, K, kp, kp) [+ expression planes (B, E, kp, kp)] -> query
    features on the grid (B, d, g, g)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config.num_keypoints + config.expression_dim,
            config.query_channels,
            config.attn_dim,
            config.attn_stride // config.kp_downsample,
            config.expression_dim if config.expression_film else 0,
        )


class KeyEncoder(_GridUNet):
    """Source keypoint maps + source RGB at the keypoint resolution [+ the source's expression
    planes] -> keys (B, d, g, g)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config.num_keypoints + 3 + config.expression_dim,
            config.key_channels,
            config.attn_dim,
            config.attn_stride // config.kp_downsample,
            config.expression_dim if config.expression_film else 0,
        )


class ValueEncoder(nn.Module):
    """Source image -> values on the grid (B, dv, g, g): stride-2 convolutions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in config.value_channels:
            layers += [ConvBNReLU(cin, cout, stride=2), ConvBNReLU(cout, cout)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, config.value_dim, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(image))


def downsample_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """Area downsampling by an integer factor (an AveragePool in ONNX)."""
    factor = image.shape[-1] // size
    return F.avg_pool2d(image, factor) if factor > 1 else image
