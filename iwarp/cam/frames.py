"""What flows between the cam's stages: camera frames, the newest-frame slot, engine errors.

Engines (`local.LocalEngine`, `remote.RemoteEngine`) take camera frames from a `NewestFrame`
slot (a slow model skips frames instead of queueing them), hand each avatar frame to
`on_output(image, camera_frame)`, switch avatars and set the neutral pose.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iwarp.errors import IwarpError


@dataclass
class CameraFrame:
    number: int
    captured: float  # time.monotonic() when it left the camera
    image: np.ndarray  # RGB uint8


class NewestFrame:
    """A one-frame slot: `put` replaces what has not been taken yet; `get` waits for a frame."""

    def __init__(self) -> None:
        self._frame: CameraFrame | None = None
        self._event = asyncio.Event()

    def put(self, frame: CameraFrame) -> None:
        self._frame = frame
        self._event.set()

    async def get(self) -> CameraFrame:
        while self._frame is None:
            self._event.clear()
            await self._event.wait()
        frame, self._frame = self._frame, None
        return frame


OutputCallback = Callable[[np.ndarray, CameraFrame | None], None]


class EngineError(IwarpError):
    """The engine cannot start (server unreachable or full, bad avatar photos)."""


def log(message: str) -> None:
    print(f"iwarp cam: {message}", file=sys.stderr, flush=True)
