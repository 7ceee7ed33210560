"""Generator: warped features on the attention grid -> output image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import ConvBNReLU, ResBlock, UpBlock


class Generator(nn.Module):
    """Residual blocks at the grid resolution, then 2x upsampling steps to full size.

    With the pixel skip, the last layer also sees the warped source patches as an image and
    predicts a mask that blends them with its own colours: where the warp is right the output
    keeps the source's full-resolution detail, elsewhere (mouth interior, disocclusions) the
    decoder paints.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.generator_channels
        self.pixel_skip = config.pixel_skip
        self.flow_warp = config.flow_warp
        self.patch = config.attn_stride
        self.stem = ConvBNReLU(config.value_dim, c)
        self.res = nn.Sequential(*(ResBlock(c) for _ in range(config.generator_res_blocks)))
        ups: list[nn.Module] = []
        for cout in config.generator_up_channels:
            ups.append(UpBlock(c, cout))
            c = cout
        self.up = nn.Sequential(*ups)
        if self.pixel_skip or self.flow_warp:
            # Flow warp: the warped photo and the extra tokens' share (where to paint).
            self.out = nn.Conv2d(c + (4 if self.flow_warp else 3), 4, 3, padding=1)
            with torch.no_grad():
                self.out.bias[3].fill_(4.0)  # start by showing the warped source (98%)
        else:
            self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(
        self, warped: torch.Tensor, warped_pixels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, dv, g, g) features [+ (B, 3*s*s, g, g) warped patches] -> (B, 3, H, W) in [0, 1]."""
        features = self.up(self.res(self.stem(warped)))
        if not (self.pixel_skip or self.flow_warp):
            return torch.sigmoid(self.out(features))
        if warped_pixels is None:
            raise ValueError("this generator blends a warped image: pass the warped pixels")
        if self.flow_warp:
            # (B, 4, H, W): blended warp + unmatched share, already at full resolution.
            out = self.out(torch.cat([features, warped_pixels], dim=1))
            skip = warped_pixels[:, :3]
        else:
            skip = F.pixel_shuffle(warped_pixels, self.patch)
            out = self.out(torch.cat([features, skip], dim=1))
        mask = torch.sigmoid(out[:, 3:4])
        return mask * skip + (1 - mask) * torch.sigmoid(out[:, :3])
