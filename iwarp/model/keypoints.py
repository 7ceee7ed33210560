"""Unsupervised keypoint detector with per-keypoint strength, and Gaussian keypoint maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.blocks import UNet, make_coordinate_grid


@dataclass
class Keypoints:
    """`points` (B, K, 2) as (x, y) in [-1, 1]; `strength` (B, K) in (0, 1); `expression`
    (B, E), the face's openness (`model.expression`), or None when the network has none."""

    points: torch.Tensor
    strength: torch.Tensor
    expression: torch.Tensor | None = None

    def select(self, index: slice) -> Keypoints:
        """The same keypoints for a slice of the batch."""
        expression = None if self.expression is None else self.expression[index]
        return Keypoints(self.points[index], self.strength[index], expression)

    @staticmethod
    def cat(parts: list[Keypoints]) -> Keypoints:
        """Batches joined along the batch axis."""
        expression = (
            None if parts[0].expression is None else torch.cat([k.expression for k in parts])
        )
        return Keypoints(
            torch.cat([k.points for k in parts]), torch.cat([k.strength for k in parts]), expression
        )


class KeypointDetector(nn.Module):
    """UNet on a downsampled frame -> K heatmaps -> spatial softmax -> soft-argmax.

    Strength is a sigmoid head on the pooled bottleneck: it learns how visible or how active
    each keypoint is (the hidden side of a turned head, an open mouth).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.downsample = config.kp_downsample
        self.temperature = config.kp_temperature
        self.unet = UNet(3, config.kp_channels)
        self.heatmap = nn.Conv2d(self.unet.out_channels, config.num_keypoints, 3, padding=1)
        self.strength = nn.Linear(self.unet.bottleneck_channels, config.num_keypoints)

    def forward(self, image: torch.Tensor) -> Keypoints:
        x = F.avg_pool2d(image, self.downsample) if self.downsample > 1 else image
        features, bottleneck = self.unet(x)
        heat = self.heatmap(features)
        h, w = heat.shape[-2:]
        prob = torch.softmax(heat.flatten(2) / self.temperature, dim=-1)  # (B, K, H*W)
        grid = make_coordinate_grid(h, w, heat.device, heat.dtype).reshape(1, 1, h * w, 2)
        points = (prob.unsqueeze(-1) * grid).sum(dim=2)
        strength = torch.sigmoid(self.strength(bottleneck.mean(dim=(2, 3))))
        return Keypoints(points, strength)


def keypoint_maps(kp: Keypoints, size: int, variance: float) -> torch.Tensor:
    """One Gaussian channel per keypoint, scaled by its strength: (B, K, size, size)."""
    grid = make_coordinate_grid(size, size, kp.points.device, kp.points.dtype)  # (S, S, 2)
    diff = grid.reshape(1, 1, size, size, 2) - kp.points.reshape(*kp.points.shape[:2], 1, 1, 2)
    gauss = torch.exp(-0.5 * (diff * diff).sum(-1) / variance)
    return gauss * kp.strength.unsqueeze(-1).unsqueeze(-1)
