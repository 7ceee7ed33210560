"""The driving camera: a webcam (index or device path) or a video file standing in for one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from iwarp.errors import InputError
from iwarp.media import iter_video_frames, video_info


class CameraError(InputError):
    """The camera cannot be opened or read (unplugged, busy, not a camera)."""


class Camera:
    """Frames as RGB uint8, paced like a camera.

    `spec` is a device index ("0"), a device path ("/dev/video0") or a video file. A file is
    played at its own frame rate, once (`read()` returns None at its end) or in a loop. A device
    that fails mid-stream (unplugged) returns None too; `reopen()` tries again.
    """

    def __init__(
        self,
        spec: str,
        device_fps: float = 30.0,
        loop: bool = False,
        width: int = 640,
        height: int = 480,
    ) -> None:
        self.spec = spec
        self.width, self.height = width, height
        path = Path(spec)
        self.is_file = path.suffix != "" and not spec.startswith("/dev/")
        self.loop = loop
        self._capture = None
        self._frames: Iterator[np.ndarray] | None = None
        if self.is_file:
            info = video_info(path)  # clear errors for a missing, corrupt or truncated file
            self.fps = float(info.fps or 25.0)
            self.frames = info.frames
            self._frames = iter_video_frames(path)
        else:
            self.fps = float(device_fps)
            self.frames = 0
            self._open_device()
        self._next_due: float | None = None

    @property
    def label(self) -> str:
        return f"video file {self.spec}" if self.is_file else f"camera {self.spec}"

    def _open_device(self) -> None:
        import cv2

        device: int | str = int(self.spec) if self.spec.isdigit() else self.spec
        if isinstance(device, str) and not Path(device).exists():
            raise CameraError(
                f"camera {device} does not exist",
                "plug the camera in, or pass --camera 0 / a video file (--camera clip.mp4)",
            )
        capture = cv2.VideoCapture(device)
        if not capture.isOpened():
            capture.release()
            raise CameraError(
                f"camera {self.spec} could not be opened (unplugged, or busy in another app)",
                "close other apps using it, try another --camera index, or use a video file",
            )
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        capture.set(cv2.CAP_PROP_FPS, self.fps)
        self._capture = capture

    def read(self) -> np.ndarray | None:
        """The next frame (blocking, paced for a file); None at the end or on a camera fault."""
        if self._frames is not None:
            now = time.monotonic()
            if self._next_due is None:
                self._next_due = now
            elif self._next_due > now:
                time.sleep(self._next_due - now)
            elif now - self._next_due > 2 / self.fps:
                self._next_due = now  # fell behind: no catch-up burst
            self._next_due += 1.0 / self.fps
            try:
                return next(self._frames)
            except (StopIteration, InputError):  # the end, or a truncated tail
                if not self.loop:
                    return None
                self._frames = iter_video_frames(Path(self.spec))
                return next(self._frames, None)
        import cv2

        if self._capture is None:
            return None
        ok, bgr = self._capture.read()
        if not ok or bgr is None:
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def reopen(self) -> bool:
        """Try to open the device again (after an unplug); False while it is still away."""
        if self.is_file:
            return False
        self.close()
        try:
            self._open_device()
        except CameraError:
            return False
        return True

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
