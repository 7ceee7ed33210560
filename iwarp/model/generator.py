"""Generator: warped features on the attention grid -> output image."""

from __future__ import annotations

import torch
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import ConvBNReLU, ResBlock, UpBlock
from iwarp.model.expression import ExpressionFiLM


class Generator(nn.Module):
    """Residual blocks at the grid resolution, then 2x upsampling steps to full size.

    With the flow warp, the last layer also sees the warped photos (and where nothing matched)
    and predicts a mask that blends them with its own colours: where the warp is right the
    output keeps the source's full-resolution detail, elsewhere (mouth interior,
    disocclusions) the decoder paints.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.generator_channels
        self.flow_warp = config.flow_warp
        self.stem = ConvBNReLU(config.value_dim + config.expression_dim, c)
        self.expression_dim = config.expression_dim
        # Where the stem's channels see an eye or a mouth, the expression scales them: the
        # painting of a lid or a mouth's inside can be local (`ModelConfig.expression_film`).
        self.film = ExpressionFiLM(config.expression_dim, c) if config.expression_film else None
        self.res = nn.Sequential(*(ResBlock(c) for _ in range(config.generator_res_blocks)))
        ups: list[nn.Module] = []
        for cout in config.generator_up_channels:
            ups.append(UpBlock(c, cout))
            c = cout
        self.up = nn.Sequential(*ups)
        if self.flow_warp:
            # Sees the warped photo and the extra tokens' share (where to paint).
            self.out = nn.Conv2d(c + 4, 4, 3, padding=1)
            with torch.no_grad():
                self.out.bias[3].fill_(4.0)  # start by showing the warped source (98%)
        else:
            self.out = nn.Conv2d(c, 3, 3, padding=1)

    def decode(self, warped: torch.Tensor) -> torch.Tensor:
        """(B, dv [+ E], g, g) -> the last upsampling's features (B, c, H, W)."""
        features = self.stem(warped)
        if self.film is not None:
            features = self.film(features, warped[:, -self.expression_dim :])
        return self.up(self.res(features))

    def blend_parts(
        self, features: torch.Tensor, flow: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow warp's two halves: the painted colours (B, 3, H, W) and how much of the
        warped photo is kept (B, 1, H, W), from `features` and the flow's (B, 4, H, W)."""
        if flow is None:
            raise ValueError("this generator blends the flow warp's photo: pass it")
        out = self.out(torch.cat([features, flow], dim=1))
        return torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3:4])

    def forward(self, warped: torch.Tensor, flow: torch.Tensor | None = None) -> torch.Tensor:
        """(B, dv [+ E], g, g) features [and the driving expression's planes] [+ (B, 4, H, W)
        the flow warp's blended photo and unmatched share] -> (B, 3, H, W) in [0, 1]."""
        features = self.decode(warped)
        if not self.flow_warp:
            return torch.sigmoid(self.out(features))
        colours, keep = self.blend_parts(features, flow)
        return keep * flow[:, :3] + (1 - keep) * colours
