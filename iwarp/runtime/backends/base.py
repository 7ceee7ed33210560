"""The backend interface: three stages of the network, whatever runs them.

Backends see float32 NCHW arrays in [0, 1] and return numpy; the avatar's source rows stay in
the backend's own memory (a torch tensor, an ORT value, a CUDA buffer), so nothing on the
source side is copied per frame. Pre- and post-processing live in the Animator, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from iwarp.config import ModelConfig


@dataclass
class AvatarFeatures:
    """An avatar's cached source side, in the backend's own memory.

    `rows` holds keys (1, N*T, d), values (1, N*T, dv), pixels (1, N*T, p) and mask (1, N*T)
    as backend-native arrays; `points` (N, K, 2) and `strength` (N, K) stay in numpy for
    relative motion.
    """

    rows: dict[str, Any]
    points: np.ndarray
    strength: np.ndarray
    num_sources: int


class Backend(ABC):
    name: str = "base"

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @abstractmethod
    def detect(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) -> keypoints (B, K, 2) in [-1, 1] and strength (B, K)."""

    @abstractmethod
    def encode_source(self, image: np.ndarray, points: np.ndarray, strength: np.ndarray) -> dict:
        """One source (1, 3, S, S) and its keypoints -> {keys, values, pixels} rows."""

    @abstractmethod
    def join_sources(self, rows: list[dict]) -> dict[str, Any]:
        """Concatenates the rows of N sources along the token axis and adds the mask."""

    @abstractmethod
    def animate(
        self, avatar: AvatarFeatures, points: np.ndarray, strength: np.ndarray
    ) -> np.ndarray:
        """Driving keypoints (1, K, 2), (1, K) -> image (1, 3, S, S) in [0, 1]."""

    def encode_avatar(self, images: np.ndarray) -> AvatarFeatures:
        """Sources (N, 3, S, S) -> the cached avatar: detect, then encode each source."""
        points, strength = self.detect(images)
        rows = [
            self.encode_source(images[i : i + 1], points[i : i + 1], strength[i : i + 1])
            for i in range(images.shape[0])
        ]
        return AvatarFeatures(self.join_sources(rows), points, strength, images.shape[0])

    def describe(self) -> str:
        return self.name
