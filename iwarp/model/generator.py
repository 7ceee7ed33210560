"""Generator: warped features on the attention grid -> output image."""

from __future__ import annotations

import torch
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import ConvBNReLU, ResBlock, UpBlock


class Generator(nn.Module):
    """Residual blocks at the grid resolution, then 2x upsampling steps to full size."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.generator_channels
        self.stem = ConvBNReLU(config.value_dim, c)
        self.res = nn.Sequential(*(ResBlock(c) for _ in range(config.generator_res_blocks)))
        ups: list[nn.Module] = []
        for cout in config.generator_up_channels:
            ups.append(UpBlock(c, cout))
            c = cout
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, warped: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.up(self.res(self.stem(warped)))))
