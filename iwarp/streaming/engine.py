"""The animation engine behind the server's sessions, as one small interface.

A session asks its engine for a `FrameStream` and feeds it camera frames. `LocalEngine` is the
runtime's `Animator` in this process (`iwarp serve --engine local`, the default);
`iwarp.cluster.RayEngine` (`--engine ray`) keeps face tracking here and runs the networks on
Ray Serve replicas. The streaming package knows only this interface, so it never imports an
engine's dependencies (Ray).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from iwarp.runtime.animator import Animator


class FrameStream(Protocol):
    """One driving video: `iwarp.runtime.DrivingStream`'s per-frame interface."""

    reference: Any  # the neutral pose, None when the motion is absolute

    def animate(self, avatar_id: str, frame: np.ndarray) -> np.ndarray: ...

    def set_reference(self, frame: np.ndarray | None = None) -> bool: ...

    def clear_reference(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class ReplicaStats:
    """Frames one replica animated, and the engine call's time for the last few hundred."""

    frames: int = 0
    seconds: float = 0.0  # summed over all frames
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=300))  # seconds

    def observe(self, seconds: float) -> None:
        self.frames += 1
        self.seconds += seconds
        self.recent.append(seconds)


class Engine(Protocol):
    name: str

    def stream(self) -> FrameStream: ...

    def health(self) -> dict[str, Any]:
        """For /healthz: the engine's name and how many replicas are up (may block briefly)."""
        ...

    def replica_stats(self) -> dict[str, ReplicaStats]:
        """Per replica id, for /metrics (empty when the engine has no replicas)."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """The Animator in this process: the frame never leaves the server."""

    name = "local"

    def __init__(self, animator: Animator) -> None:
        self.animator = animator

    def stream(self) -> FrameStream:
        return self.animator.stream(auto_reference=True)

    def health(self) -> dict[str, Any]:
        return {"engine": self.name, "replicas_up": 0, "backend": self.animator.backend.describe()}

    def replica_stats(self) -> dict[str, ReplicaStats]:
        return {}

    def close(self) -> None:
        pass
