"""The processing track: animates the newest incoming frame, never a queue of old ones.

aiortc hands decoded frames to whoever awaits `recv()` on the remote track, and queues them
without bound when nobody keeps up (DESIGN.md: latency grew to 8 s in 20 s). Here a reader task
drains the remote track continuously into a one-frame slot (a newer frame replaces an
unprocessed one, which counts as dropped), and `recv()`, called by aiortc's sender whenever it
is ready for the next frame, takes whatever is newest and runs the model on it in an executor,
off the event loop. The output keeps the input frame's pts/time_base, so the sender's RTP
timestamps follow the camera's clock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

log = logging.getLogger("iwarp.streaming")

FrameProcessor = Callable[[np.ndarray], np.ndarray]


@dataclass
class TrackStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # input frames replaced by a newer one before the model got to them
    errors: int = 0
    last_input: float = 0.0  # time.monotonic() of the newest input frame
    # (arrival -> output ready, model time) in seconds, for the last few hundred frames
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=300))
    out_times: deque[float] = field(default_factory=lambda: deque(maxlen=120))

    def fps(self, window: float = 2.0) -> float:
        now = time.monotonic()
        times = [t for t in self.out_times if now - t <= window]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6)


class NewestFrameTrack(MediaStreamTrack):
    """Video track: `process(rgb) -> rgb` applied to the newest frame of `source`.

    `on_frame(latency_s, model_s)` is called on the event loop after each output frame. If
    `process` raises, the error is logged and the previous output (or black) is sent: the
    camera image is never passed through, since the user asked for it to be hidden.
    """

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        process: FrameProcessor,
        executor: Executor,
        on_frame: Callable[[float, float], None] | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.stats = TrackStats()
        self._process = process
        self._executor = executor
        self._on_frame = on_frame
        self._latest: tuple[VideoFrame, float] | None = None  # (frame, arrival time)
        self._slot_lock = threading.Lock()  # the slot is emptied by a worker thread
        self._ready = asyncio.Event()
        self._source_ended = False
        self._last_output: np.ndarray | None = None
        self._inflight: Future | None = None  # the model call in the executor, if any
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.source.recv()
                now = time.monotonic()
                with self._slot_lock:
                    replaced, self._latest = self._latest, (frame, now)
                if replaced is not None:
                    self.stats.dropped += 1
                self.stats.frames_in += 1
                self.stats.last_input = now
                self._ready.set()
        except MediaStreamError:
            pass  # the remote track ended
        finally:
            self._source_ended = True
            self._ready.set()

    async def recv(self) -> VideoFrame:
        while self._latest is None:
            if self._source_ended or self.readyState != "live":
                self.stop()
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        # The worker takes the slot's frame when it starts, not now: with several sessions
        # sharing the pool, a job may wait for a free worker, and newer frames keep coming.
        self._inflight = self._executor.submit(self._run_newest)
        done = await asyncio.wrap_future(self._inflight)
        if done is None:  # the slot was emptied meanwhile (only after a cancelled recv)
            return await self.recv()
        frame, arrived, output, model_s = done
        output.pts = frame.pts
        output.time_base = frame.time_base
        now = time.monotonic()
        self.stats.frames_out += 1
        self.stats.out_times.append(now)
        self.stats.recent.append((now - arrived, model_s))
        if self._on_frame is not None:
            self._on_frame(now - arrived, model_s)
        return output

    def _run_newest(self) -> tuple[VideoFrame, float, VideoFrame, float] | None:
        """Worker thread: take the newest frame, animate it. -> (input, arrival, output, s)."""
        with self._slot_lock:
            taken, self._latest = self._latest, None
        if taken is None:
            return None
        frame, arrived = taken
        return (frame, arrived, *self._run(frame))

    def _run(self, frame: VideoFrame) -> tuple[VideoFrame, float]:
        """Decode to RGB, animate, wrap as a frame."""
        t0 = time.perf_counter()
        try:
            out = self._process(frame.to_ndarray(format="rgb24"))
            self._last_output = out
        except Exception:
            self.stats.errors += 1
            if self.stats.errors <= 3:  # a broken model would otherwise flood the log
                log.exception("frame processing failed; sending the previous frame")
            out = self._last_output
            if out is None:
                out = np.zeros((frame.height, frame.width, 3), np.uint8)
        model_s = time.perf_counter() - t0
        return VideoFrame.from_ndarray(np.ascontiguousarray(out), format="rgb24"), model_s

    def stop(self) -> None:
        super().stop()
        if not self._reader.done():
            self._reader.cancel()

    async def wait_closed(self) -> None:
        """After `stop()`: waits for the reader task and for a model call still running (the
        thread finishes its frame even when the sender that wanted it is gone)."""
        if not self._reader.done():
            await asyncio.gather(self._reader, return_exceptions=True)
        while self._inflight is not None and not self._inflight.done():
            await asyncio.sleep(0.01)
