"""The driving face's expression at a resolution where eyes and mouth exist.

The keypoint detector works at 64 px: it finds the head, but an eye there is 6 x 2 px and a
blink moves one pixel. This encoder reads the face at `expression_size` (128 px: the eye is
4x larger in area) with stride-2 convolutions, and a small head turns the 8 x 8 map into
`expression_dim` numbers. Training ties them to the dlib landmarks' openness ratios
(`landmarks.EXPRESSION_NAMES`, standardised), so they mean the same for every face, and relative
motion can move an avatar's by the driver's change (`motion.relative_expression`). It costs
0.024 GFLOP per frame (`iwarp info --config tiny_expression`), against 1.83 for the rest of a
frame with one source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import ConvBNReLU


class ExpressionEncoder(nn.Module):
    """Face crop (B, 3, S, S) in [0, 1] -> expression (B, E), standardised openness ratios."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.size = config.expression_size
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(config.expression_channels):
            layers.append(ConvBNReLU(cin, cout, stride=2))
            if i > 0:  # one more 3x3 per stage after the first: the lids are thin
                layers.append(ConvBNReLU(cout, cout))
            cin = cout
        self.body = nn.Sequential(*layers)
        side = config.expression_size // 2 ** len(config.expression_channels)
        # Flattened, not pooled: where on the map a feature sits says which part of the face it
        # is (the crop follows the face), and that is what tells an eye from a mouth.
        squeeze: list[nn.Module] = []
        if config.expression_head_channels:
            # Fewer numbers per place: the wide head had room to learn who, not what.
            squeeze = [nn.Conv2d(cin, config.expression_head_channels, 1), nn.ReLU(inplace=True)]
            cin = config.expression_head_channels
        self.head = nn.Sequential(
            *squeeze,
            nn.Flatten(),
            *([nn.Dropout(0.2)] if squeeze else []),
            nn.Linear(cin * side * side, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, config.expression_dim),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        if size % self.size:
            raise ValueError(f"expression needs a multiple of {self.size} px, got {size}")
        if size > self.size:
            image = F.avg_pool2d(image, size // self.size)
        return self.head(self.body(image))


def expression_planes(expression: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, E) -> (B, E, H, W) constant planes the size of `like` (B, C, H, W), to be stacked
    with an encoder's input; (B, 0, H, W) without an expression."""
    b, _, h, w = like.shape
    if expression is None:
        return like.new_zeros(b, 0, h, w)
    return expression[:, :, None, None].expand(-1, -1, h, w)


class ExpressionFiLM(nn.Module):
    """Features (B, C, H, W) scaled and shifted per channel by the expression:
    `x * (1 + gain(e)) + shift(e)`. Zero-initialised, so it starts as the identity.

    The expression is read back from the constant planes the encoder or generator already
    receives (their mean), so no graph gains an input and the runtime's and export's paths
    stay as they are.
    """

    def __init__(self, expression_dim: int, channels: int) -> None:
        super().__init__()
        self.expression_dim = expression_dim
        self.to_gain_shift = nn.Linear(expression_dim, 2 * channels)
        nn.init.zeros_(self.to_gain_shift.weight)
        nn.init.zeros_(self.to_gain_shift.bias)

    def forward(self, features: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
        """`planes` (B, E, H', W'): the expression planes of `expression_planes`."""
        expression = planes.mean(dim=(2, 3))
        gain, shift = self.to_gain_shift(expression)[:, :, None, None].chunk(2, dim=1)
        return features * (1 + gain) + shift
