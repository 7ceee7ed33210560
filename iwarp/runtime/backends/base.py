"""The backend interface: three stages of the network, whatever runs them.

Backends see float32 NCHW arrays in [0, 1] and return numpy; the avatar's source rows stay in
the backend's own memory (a torch tensor, an ORT value, a CUDA buffer), so nothing on the
source side is copied per frame. Pre- and post-processing live in the Animator, once.

A face's keypoints, strength and (for a network with one) expression travel as one
`motion.Pose` of numpy arrays: `detect` gives it, `encode_source` and `animate` take it.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from iwarp.config import ModelConfig
from iwarp.motion import Pose
from iwarp.runtime.backends.denormals import flush_denormals_here

# The stages that run an engine: each runs with subnormals flushed on the calling thread.
_ENGINE_STAGES = ("detect", "encode_source", "animate")


@dataclass
class AvatarFeatures:
    """An avatar's cached source side, in the backend's own memory.

    `rows` holds keys (1, N*T, d), values (1, N*T, dv), pixels (1, N*T, p) and mask (1, N*T)
    as backend-native arrays; each source's `points` (N, K, 2), `strength` (N, K) and
    `expression` (N, E; None for a network without one) stay in numpy for relative motion.
    """

    rows: dict[str, Any]
    points: np.ndarray
    strength: np.ndarray
    num_sources: int
    expression: np.ndarray | None = None

    @property
    def pose(self) -> Pose:
        """The sources' poses (N faces)."""
        return Pose(self.points, self.strength, self.expression)


def _flushing(stage: Callable[..., Any]) -> Callable[..., Any]:
    name = stage.__name__

    @functools.wraps(stage)
    def run(self: Backend, *args: Any, **kwargs: Any) -> Any:
        self.flush_denormals()
        t0 = time.perf_counter()
        out = stage(self, *args, **kwargs)
        # The engine's own time for the last call, so that benchmarks can tell the graphs'
        # time from the pipeline's (per backend, last call wins: for single-stream use).
        self.__dict__.setdefault("stage_ms", {})[name] = (time.perf_counter() - t0) * 1e3
        return out

    return run


def _with_choice(describe: Callable[[Backend], str]) -> Callable[[Backend], str]:
    @functools.wraps(describe)
    def run(self: Backend) -> str:
        text = describe(self)
        return f"{text}; {self.chosen_by}" if self.chosen_by else text

    return run


class Backend(ABC):
    name: str = "base"
    # How this engine was picked, for describe(): e.g. "auto: fastest that passes ..." or "".
    chosen_by: str = ""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.stage_ms: dict[str, float] = {}  # engine time of the last detect/animate/...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every engine stage flushes subnormals on the thread that calls it (the engines' own
        # pools are set by their options): the caller runs a share of the work, and servers
        # call from worker threads that the engine never saw (see backends/denormals.py).
        super().__init_subclass__(**kwargs)
        for name in _ENGINE_STAGES:
            if name in cls.__dict__:
                setattr(cls, name, _flushing(cls.__dict__[name]))
        if "describe" in cls.__dict__:
            cls.describe = _with_choice(cls.__dict__["describe"])

    def flush_denormals(self) -> bool:
        """FTZ + DAZ for this engine's work from the calling thread (once per thread)."""
        return flush_denormals_here()

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @abstractmethod
    def detect(self, images: np.ndarray) -> Pose:
        """(B, 3, S, S) -> their pose: keypoints (B, K, 2) in [-1, 1], strength (B, K) and
        expression (B, E), None without one."""

    @abstractmethod
    def encode_source(self, image: np.ndarray, pose: Pose) -> dict:
        """One source (1, 3, S, S) and its pose (`detect`'s) -> {keys, values, pixels} rows."""

    @abstractmethod
    def join_sources(self, rows: list[dict]) -> dict[str, Any]:
        """Concatenates the rows of N sources along the token axis and adds the mask."""

    @abstractmethod
    def animate(self, avatar: AvatarFeatures, pose: Pose) -> np.ndarray:
        """The driving pose (B = 1: keypoints (1, K, 2), strength (1, K)[, expression (1, E)])
        -> image (1, 3, S, S) in [0, 1]."""

    def encode_avatar(self, images: np.ndarray) -> AvatarFeatures:
        """Sources (N, 3, S, S) -> the cached avatar: detect, then encode each source."""
        pose = self.detect(images)
        rows = [self.encode_source(images[i : i + 1], pose.select(i)) for i in range(len(images))]
        return AvatarFeatures(
            self.join_sources(rows), pose.points, pose.strength, images.shape[0], pose.expression
        )

    def describe(self) -> str:
        return self.name

    def label(self) -> str:
        """The engine in two or three words for people ("OpenVINO BF16"); `describe` has the
        versions and settings."""
        return self.name
