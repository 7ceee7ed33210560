"""The local engine: the embedded runtime (`Animator`) animates on this machine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iwarp.cam.frames import NewestFrame, OutputCallback
from iwarp.runtime.options import EngineOptions


class LocalEngine:
    """The embedded runtime (`Animator`) on this machine."""

    name = "local"

    def __init__(
        self,
        avatars: Sequence[Sequence[str | Path]],
        engine: EngineOptions | None = None,
    ) -> None:
        from iwarp.paths import DEFAULT_AVATAR

        self.animator = (engine or EngineOptions()).animator()
        self.avatar_ids = [self.animator.add_avatar(list(a)) for a in avatars or [[DEFAULT_AVATAR]]]
        self.avatar_index = 0
        self.stream = self.animator.stream(auto_reference=True)
        self.reconnects = 0
        self.frames_per_call: list[int] = []  # remote only

    @property
    def avatar_count(self) -> int:
        return len(self.avatar_ids)

    def still(self) -> np.ndarray:
        """The current avatar's face crop: what to show before the first frame is animated."""
        return self.animator.get(self.avatar_ids[self.avatar_index]).crops[0]

    async def run(self, slot: NewestFrame, on_output: OutputCallback, paused: Callable[[], bool]):
        while True:
            frame = await slot.get()
            if paused():
                continue
            avatar_id = self.avatar_ids[self.avatar_index]
            image = await asyncio.to_thread(self.stream.animate, avatar_id, frame.image)
            on_output(image, frame)

    async def set_avatar(self, index: int) -> None:
        self.avatar_index = index

    async def set_neutral(self, on: bool = True) -> bool:
        if not on:
            self.stream.clear_reference()
            return True
        return self.stream.set_reference()  # the last pose seen

    async def close(self) -> None:
        return None
