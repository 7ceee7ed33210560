"""Where avatar frames go: a virtual camera, a preview window or a video file.

`steady` sinks are fed at a fixed rate by the app, repeating the last frame when no new one
came (a call app must never see its camera stall or vanish); a file sink records each avatar
frame once unless asked to be steady too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from iwarp.errors import IwarpError
from iwarp.media import VideoWriter


class SinkError(IwarpError):
    """The sink cannot be opened."""


VIRTUALCAM_HELP = {
    "linux": (
        "load the v4l2loopback kernel module: sudo apt install v4l2loopback-dkms && "
        "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=iwarp "
        "(then pick 'iwarp' as the camera in the call app)"
    ),
    "darwin": "install OBS Studio and start its Virtual Camera once (OBS > Start Virtual Camera)",
    "win32": "install OBS Studio and start its Virtual Camera once (OBS > Start Virtual Camera)",
}
MEANWHILE = "meanwhile use --sink window (a preview) or --sink avatar.mp4 (a recording)"


class FileSink:
    name = "file"

    def __init__(self, path: str | Path, fps: float, steady: bool = False) -> None:
        self.path = Path(path)
        self.steady = steady
        self.frames = 0
        self.writer = VideoWriter(self.path, fps=fps)

    def write(self, frame: np.ndarray) -> int | None:
        self.writer.write(frame)
        self.frames += 1
        return None

    def close(self) -> None:
        self.writer.close()


class WindowSink:
    """An OpenCV preview window; `write` returns the key pressed (or None)."""

    name = "window"
    steady = True

    def __init__(self, title: str = "iwarp cam") -> None:
        if sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        ):
            raise SinkError(
                "no display for --sink window (DISPLAY is not set)",
                "run it in a desktop session, or use --sink virtualcam / --sink avatar.mp4",
            )
        import cv2

        self._cv2 = cv2
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            raise SinkError(
                f"cannot open a preview window ({exc})",
                "this OpenCV build may have no GUI; use --sink virtualcam or a file",
            ) from exc
        self.frames = 0

    def write(self, frame: np.ndarray) -> int | None:
        cv2 = self._cv2
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames += 1
        key = cv2.waitKey(1)
        return None if key < 0 else key & 0xFF

    def set_status(self, text: str) -> None:
        self._cv2.setWindowTitle(self.title, f"{self.title}: {text}")

    def close(self) -> None:
        self._cv2.destroyWindow(self.title)


class VirtualCamSink:
    """pyvirtualcam: v4l2loopback on Linux, OBS Virtual Camera on Windows and macOS."""

    name = "virtualcam"
    steady = True

    def __init__(self, size: int, fps: float) -> None:
        hint = f"{VIRTUALCAM_HELP.get(sys.platform, VIRTUALCAM_HELP['linux'])}; {MEANWHILE}"
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise SinkError(
                "the virtual camera needs pyvirtualcam", f"pip install 'iwarp[cam]'; {MEANWHILE}"
            ) from exc
        try:
            self.camera = pyvirtualcam.Camera(
                width=size, height=size, fps=fps, fmt=pyvirtualcam.PixelFormat.RGB
            )
        except RuntimeError as exc:
            raise SinkError(f"no virtual camera device ({exc})", hint) from exc
        self.device = self.camera.device
        self.frames = 0

    def write(self, frame: np.ndarray) -> int | None:
        self.camera.send(np.ascontiguousarray(frame))
        self.frames += 1
        return None

    def close(self) -> None:
        self.camera.close()


Sink = FileSink | WindowSink | VirtualCamSink


def open_sink(spec: str, size: int, fps: float, steady_file: bool = False) -> Sink:
    """`virtualcam`, `window` or a file path (.mp4, .mkv, .webm, ...)."""
    if spec == "virtualcam":
        return VirtualCamSink(size, fps)
    if spec == "window":
        return WindowSink()
    path = Path(spec)
    if not path.suffix:
        raise SinkError(
            f"unknown sink {spec!r}", "use virtualcam, window, or a video file such as out.mp4"
        )
    if not path.parent.exists():
        raise SinkError(f"folder {path.parent} does not exist", "create it or choose another path")
    return FileSink(path, fps, steady=steady_file)
