"""`iwarp cam`: camera in, avatar frames out to a virtual camera, a window or a file.

    camera thread -> NewestFrame -> engine (local runtime | remote server) -> on_output
        -> [pause / overlay] -> latest frame -> sink (each new frame, or a steady pump)

Controls come from keys in the preview window and from a small HTTP endpoint on 127.0.0.1
(`controls.CamControls`), and both end in the same methods of `CamApp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from iwarp.cam.capture import Camera
from iwarp.cam.frames import CameraFrame, NewestFrame, log
from iwarp.cam.sinks import Sink, WindowSink, open_sink
from iwarp.metrics import latency_summary_ms, percentile_ms
from iwarp.options import comma_list, option
from iwarp.runtime import FaceCropper
from iwarp.runtime.options import EngineOptions


@dataclass
class CamSettings:
    """`iwarp cam`'s settings; each field is its command-line option (iwarp.options)."""

    avatars: list[list[str]] = option(  # each: the photos of one avatar
        default_factory=list,
        flag="--avatar",
        parse=comma_list(str),
        metavar="PHOTO[,PHOTO...]",
        help="one avatar (several photos of one face, comma-separated); repeat for avatars 1-9",
    )
    camera: str = option("0", help="camera index, /dev/videoN, or a video file")
    server: str | None = option(
        None, help="animate on an `iwarp serve` at this URL (default: locally)"
    )
    token: str | None = option(
        None, env="IWARP_TOKEN", help="the server's token (default $IWARP_TOKEN)"
    )
    sink: str = option("virtualcam", help="virtualcam, window, or FILE.mp4")
    size: int = option(256, choices=(256, 512), help="output side")
    fps: float = option(30.0, help="camera and virtual camera rate")
    engine: EngineOptions = option(default_factory=EngineOptions)  # animating locally
    control_port: int = option(8765, help="local control endpoint (0: off)")
    stats: bool = option(False, help="fps and latency on stderr every second")
    stats_json: str | None = option(
        None, help="write a summary (frames, fps, latency) here at exit"
    )
    lossless: bool = option(  # wait for each avatar frame before reading the next camera frame
        False,
        help="a file camera waits for each avatar frame (no frame skipped; for tests/renders)",
    )
    steady_file: bool = option(False, flag="--steady", help="a file sink recorded at --fps")
    loop: bool = option(False, help="a file camera starts over at its end")
    seconds: float | None = option(None, help="stop after this many seconds")
    connect_timeout: float = option(15.0, help="remote: seconds to get a first call")


class Stats:
    """Frames in/out and camera-to-sink latency over a sliding window."""

    def __init__(self, window: int = 120) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.frames_written = 0
        self.latency: deque[float] = deque(maxlen=window)
        self.out_times: deque[float] = deque(maxlen=window)
        self.all_latency: list[float] = []
        self.started = time.monotonic()

    def output(self, latency: float | None) -> None:
        self.frames_out += 1
        self.out_times.append(time.monotonic())
        if latency is not None:
            self.latency.append(latency)
            self.all_latency.append(latency)

    def fps(self) -> float:
        t = self.out_times
        if len(t) < 2 or time.monotonic() - t[-1] > 1.0:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-6)

    def latency_ms(self, q: float = 50) -> float | None:
        return percentile_ms(self.latency, q)

    def line(self) -> str:
        p50 = self.latency_ms()
        lat = f"{p50:.0f} ms" if p50 is not None else "-- ms"
        return f"{self.fps():.1f} fps, latency {lat}"

    def summary(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "seconds": round(seconds, 2),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_written": self.frames_written,
            "fps_out": round(self.frames_out / max(seconds, 1e-6), 2),
            "latency_ms": latency_summary_ms(self.all_latency),
        }


class CamApp:
    def __init__(self, settings: CamSettings, engine: Any, camera: Camera, sink: Sink) -> None:
        self.settings = settings
        self.engine = engine
        self.camera = camera
        self.sink = sink
        self.stats = Stats()
        self.slot = NewestFrame()
        self.paused = False
        self.overlay = False
        self.neutral = False
        self.latest: np.ndarray | None = None
        self._new_output = asyncio.Event()
        self._done: dict[int, asyncio.Event] = {}
        self._stop = asyncio.Event()
        self._camera_done = asyncio.Event()
        self._overlay_faces: FaceCropper | None = None
        self._key_tasks: set[asyncio.Future] = set()

    # -- data path -------------------------------------------------------------------------------
    async def capture(self) -> None:
        """Camera frames into the newest-frame slot; a lost camera is retried every second."""
        number = 0
        while not self._stop.is_set():
            image = await asyncio.to_thread(self.camera.read)
            if image is None:
                if self.camera.is_file:
                    break
                log(f"{self.camera.label} stopped delivering frames; retrying every second")
                while not self._stop.is_set() and not await asyncio.to_thread(self.camera.reopen):
                    await asyncio.sleep(1.0)
                continue
            frame = CameraFrame(number, time.monotonic(), image)
            self.stats.frames_in += 1
            if self.settings.lossless:
                self._done[number] = asyncio.Event()
            self.slot.put(frame)
            if self.settings.lossless:
                # A frame the server never answers (dropped on the way) must not stall the camera.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done[number].wait(), 5.0)
                self._done.pop(number, None)
            number += 1
        self._camera_done.set()

    def on_output(self, image: np.ndarray, source: CameraFrame | None) -> None:
        """An avatar frame from the engine (in the event loop's thread)."""
        if source is not None and source.number in self._done:
            self._done[source.number].set()
        if self.paused:
            return  # frozen: the sink keeps showing the last frame
        latency = time.monotonic() - source.captured if source is not None else None
        frame = self._fit(image)
        if self.overlay and source is not None:
            frame = self._with_overlay(frame, source.image)
        self.latest = frame
        self.stats.output(latency)
        if not self.sink.steady:
            self._write(frame)
        self._new_output.set()

    def _fit(self, image: np.ndarray) -> np.ndarray:
        size = self.settings.size
        if image.shape[0] != size or image.shape[1] != size:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
        return image

    def _with_overlay(self, frame: np.ndarray, driving: np.ndarray) -> np.ndarray:
        """The driving face, cropped like the avatar, blended over it (to match the pose)."""
        if self._overlay_faces is None:
            self._overlay_faces = FaceCropper()
        face = self._overlay_faces.crop(driving, frame.shape[0])
        return frame if face is None else cv2.addWeighted(frame, 0.6, face, 0.4, 0.0)

    def _write(self, frame: np.ndarray) -> None:
        key = self.sink.write(frame)
        self.stats.frames_written += 1
        if key is not None:
            self._key_tasks.add(task := asyncio.ensure_future(self.handle_key(key)))
            task.add_done_callback(self._key_tasks.discard)

    def _placeholder(self) -> np.ndarray:
        still = self.engine.still()
        if still is not None:
            return self._fit(still)
        frame = np.zeros((self.settings.size, self.settings.size, 3), np.uint8)
        cv2.putText(frame, "iwarp: connecting", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255,) * 3)
        return frame

    async def pump(self) -> None:
        """Steady sinks: a frame every 1/fps, the newest avatar frame or the last one again."""
        period = 1.0 / self.settings.fps
        next_due = time.monotonic()
        while not self._stop.is_set():
            self._write(self.latest if self.latest is not None else self._placeholder())
            next_due += period
            delay = next_due - time.monotonic()
            if delay < -period:
                next_due = time.monotonic()  # the machine stalled: do not burst
            await asyncio.sleep(max(delay, 0.0))

    async def report(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(1.0 if self.settings.stats else 0.5)
            line = self.stats.line()
            if isinstance(self.sink, WindowSink):
                self.sink.set_status(line + (" (paused)" if self.paused else ""))
            if self.settings.stats:
                log(line)

    # -- controls --------------------------------------------------------------------------------
    async def set_avatar(self, index: int) -> bool:
        if not 0 <= index < self.engine.avatar_count:
            return False
        await self.engine.set_avatar(index)
        return True

    async def set_neutral(self, on: bool = True) -> bool:
        ok = await self.engine.set_neutral(on)
        if ok:
            self.neutral = on
        return ok

    def toggle_pause(self, on: bool | None = None) -> bool:
        self.paused = (not self.paused) if on is None else on
        return self.paused

    def toggle_overlay(self, on: bool | None = None) -> bool:
        self.overlay = (not self.overlay) if on is None else on
        return self.overlay

    def stop(self) -> None:
        self._stop.set()

    async def handle_key(self, key: int) -> None:
        """Window keys: n neutral pose, c clear it, 1-9 avatar, p or space pause, o overlay,
        q or Esc quit."""
        char = chr(key) if key < 128 else ""
        if char == "n":
            if not await self.set_neutral(True):
                log("no face in view: look at the camera and press n again")
        elif char == "c":
            await self.set_neutral(False)
        elif char.isdigit() and char != "0":
            await self.set_avatar(int(char) - 1)
        elif char in ("p", " "):
            self.toggle_pause()
        elif char == "o":
            self.toggle_overlay()
        elif char == "q" or key == 27:
            self.stop()

    def state(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "avatar": self.engine.avatar_index + 1,
            "avatars": self.engine.avatar_count,
            "paused": self.paused,
            "overlay": self.overlay,
            "neutral": self.neutral,
            "reconnects": self.engine.reconnects,
            "stats": {**self.stats.summary(), "fps_now": round(self.stats.fps(), 2)},
        }

    # -- the whole run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        tasks = [
            asyncio.ensure_future(self.capture()),
            asyncio.ensure_future(self.engine.run(self.slot, self.on_output, lambda: self.paused)),
            asyncio.ensure_future(self.report()),
        ]
        if self.sink.steady:
            tasks.append(asyncio.ensure_future(self.pump()))
        controls = None
        if self.settings.control_port:
            from iwarp.cam.controls import CamControls

            controls = await CamControls(self).start(self.settings.control_port)
        engine_task = tasks[1]
        waits = [asyncio.ensure_future(self._stop.wait()), engine_task]
        waits.append(asyncio.ensure_future(self._camera_finished()))
        if self.settings.seconds:
            waits.append(asyncio.ensure_future(asyncio.sleep(self.settings.seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if engine_task.done() and engine_task.exception() is not None:
                raise engine_task.exception()  # type: ignore[misc]
        finally:
            self._stop.set()
            for t in [*tasks, *waits]:
                t.cancel()
            await asyncio.gather(*tasks, *waits, return_exceptions=True)
            await self.engine.close()
            if controls is not None:
                await controls.close()
        if self.stats.frames_out == 0 and self._camera_done.is_set():
            log(f"{self.camera.label} ended before the first avatar frame (use --loop?)")
        summary = {
            "engine": self.engine.name,
            "sink": self.sink.name,
            "reconnects": self.engine.reconnects,
            "frames_per_call": self.engine.frames_per_call,
            **self.stats.summary(),
        }
        if self.settings.stats_json:
            Path(self.settings.stats_json).write_text(json.dumps(summary, indent=2))
        return summary

    async def _camera_finished(self) -> None:
        """A file camera ended: wait briefly for its last avatar frames, then stop."""
        await self._camera_done.wait()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            self._new_output.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_output.wait(), 1.0)
                continue
            break


def build_engine(settings: CamSettings) -> Any:
    if settings.server:
        from iwarp.cam.remote import RemoteEngine

        return RemoteEngine(
            settings.server, settings.avatars, settings.token, settings.connect_timeout
        )
    from iwarp.cam.local import LocalEngine

    return LocalEngine(settings.avatars, settings.engine)


async def run_cam_async(settings: CamSettings) -> dict[str, Any]:
    """Opens sink, camera and engine (in that order: the cheapest failures first), runs."""
    sink = open_sink(settings.sink, settings.size, settings.fps, settings.steady_file)
    camera = None
    try:
        camera = Camera(settings.camera, device_fps=settings.fps, loop=settings.loop)
        engine = build_engine(settings)
        app = CamApp(settings, engine, camera, sink)
        return await app.run()
    finally:
        if camera is not None:
            camera.close()
        sink.close()


def run_cam(settings: CamSettings) -> dict[str, Any]:
    return asyncio.run(run_cam_async(settings))


def cam_command(settings: CamSettings) -> int:
    """`iwarp cam`: runs until stopped; with --stats, the summary as one JSON line at the end."""
    summary = run_cam(settings)
    if settings.stats:
        print(json.dumps(summary))
    return 0
