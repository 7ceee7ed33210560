"""The remote engine: an `iwarp serve` server animates; the camera travels over WebRTC.

Each sent frame carries its number in a band along its bottom edge and the server copies it
onto the avatar frame made from it (`echo_id`), so every returned frame is matched to its
camera frame: that is how the latency is known. The band is painted over (the row above it
repeated) before the frame reaches the sink. When the server goes away the engine reconnects
by itself (re-uploading the avatars if the server forgot them) while the app keeps feeding
the sink the last frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from PIL import Image

from iwarp.cam.frames import CameraFrame, EngineError, NewestFrame, OutputCallback, log
from iwarp.streaming import frameid, rtc
from iwarp.streaming.client import OfferRefused, PeerCall, ServerApi, video_frame


class ServerUnavailable(Exception):
    """The server cannot take the call now (unreachable, full, gone): try again later."""


class RemoteEngine:
    """An `iwarp serve` server: the camera goes up as a WebRTC track, the avatar comes back."""

    name = "remote"

    def __init__(
        self,
        url: str,
        avatars: Sequence[Sequence[str | Path]],
        token: str | None = None,
        connect_timeout: float = 15.0,
        stall_timeout: float = 3.0,
    ) -> None:
        self.api = ServerApi(url, token)
        self.url = self.api.url
        self.avatar_photos = [list(a) for a in avatars]
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.avatar_ids: list[str] = []
        self.avatar_index = 0
        self.session_id: str | None = None
        self.reconnects = 0
        self._had_call = False
        self.frames_per_call: list[int] = []  # avatar frames received in each call
        self.connected = asyncio.Event()
        self._still: np.ndarray | None = None

    @property
    def avatar_count(self) -> int:
        return max(1, len(self.avatar_photos))

    def still(self) -> np.ndarray | None:
        return self._still

    # -- HTTP ----------------------------------------------------------------------------------
    async def _check_server(self) -> dict[str, Any]:
        try:
            status, body = await self.api.request(
                "GET", "/healthz", timeout=aiohttp.ClientTimeout(5)
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ServerUnavailable(
                f"server {self.url} unreachable ({exc or type(exc).__name__})"
            ) from exc
        if status == 401:
            raise EngineError(f"server {self.url} refused the token (401)", "pass --token T")
        if status != 200:
            raise ServerUnavailable(f"server {self.url} answered {status}")
        if body["sessions"] >= body["max_sessions"]:
            raise ServerUnavailable(
                f"server full ({body['sessions']}/{body['max_sessions']} sessions)"
            )
        return body

    async def _ensure_avatars(self, health: dict[str, Any]) -> None:
        """Upload the avatars unless the server still has them (it forgets on restart)."""
        if not self.avatar_photos:
            self.avatar_ids = [health["default_avatar"]]
            return
        status, body = await self.api.request("GET", "/avatars")
        known = {a["avatar_id"] for a in body.get("avatars", [])} if status == 200 else set()
        if self.avatar_ids and all(a in known for a in self.avatar_ids):
            return
        self.avatar_ids = [await self.api.upload_avatar(photos) for photos in self.avatar_photos]

    async def _fetch_still(self) -> None:
        """The avatar's first face crop, shown until the first avatar frame arrives."""
        status, body = await self.api.request(
            "GET", f"/avatars/{self.avatar_ids[self.avatar_index]}/preview"
        )
        if status == 200 and isinstance(body, bytes):
            with contextlib.suppress(OSError):
                image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
                self._still = image[:, : image.shape[0]]  # the preview tiles the crops

    # -- the call --------------------------------------------------------------------------------
    async def run(self, slot: NewestFrame, on_output: OutputCallback, paused: Callable[[], bool]):
        """Connects, streams, and reconnects until cancelled. The first connection must succeed
        within `connect_timeout` seconds, or the engine fails with the reason."""
        first_deadline = time.monotonic() + self.connect_timeout
        delay = 0.5
        async with self.api:
            while True:
                try:
                    health = await self._check_server()
                    await self._ensure_avatars(health)
                    await self._fetch_still()
                    await self._call(slot, on_output, paused)
                    delay = 0.5
                    reason = "connection lost"
                except ServerUnavailable as exc:
                    reason = str(exc)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    reason = f"server {self.url} went away ({exc or type(exc).__name__})"
                self.connected.clear()
                if not self.reconnects and time.monotonic() > first_deadline:
                    raise EngineError(
                        f"could not start a call with {self.url}: {reason}",
                        "check that `iwarp serve` runs there and has a free session",
                    )
                if self._had_call:
                    log(f"{reason}; reconnecting in {delay:.1f} s (the sink keeps the last frame)")
                else:
                    log(f"{reason}; retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _call(self, slot: NewestFrame, on_output: OutputCallback, paused: Callable[[], bool]):
        # A server on this machine: offer only loopback candidates (ICE settles at once).
        rtc.configure(loopback_only=rtc.is_loopback(urlparse(self.url).hostname or ""))
        track = CameraTrack(slot, paused)
        last_output = time.monotonic()

        def on_frame(rgb: np.ndarray, _received_at: float) -> None:
            nonlocal last_output
            wrapped = frameid.read_id(rgb)
            source = track.resolve(wrapped) if wrapped is not None else None
            frameid.hide_band(rgb)
            last_output = time.monotonic()
            if not self.connected.is_set():
                self.connected.set()
                self.frames_per_call.append(0)
                if self._had_call:
                    self.reconnects += 1
                    log(f"reconnected to {self.url}")
                self._had_call = True
            self.frames_per_call[-1] += 1
            on_output(rgb, source)

        call = PeerCall(track, on_frame)
        try:
            try:
                self.session_id = await call.start(
                    self.api, echo_id=True, avatar_id=self.avatar_ids[self.avatar_index]
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise ServerUnavailable(f"offer failed ({exc})") from exc
            except OfferRefused as exc:
                if exc.status == 503:
                    raise ServerUnavailable("server full (503)") from exc
                raise EngineError(
                    f"the server refused the call ({exc.status}): {exc.body}", "see its log"
                ) from exc
            # Wait for the end: the peer closes, or no avatar frame for a while (a server that
            # vanished without a word; ICE consent would take ~30 s to notice).
            while not call.ended.is_set():
                await asyncio.sleep(0.25)
                limit = self.stall_timeout if self.connected.is_set() else 10.0
                if not paused() and time.monotonic() - last_output > limit:
                    break
        finally:
            self.session_id = None
            await call.close()

    async def _post_session(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.session_id is None:
            return 409, {"error": "not connected"}
        return await self.api.request("POST", f"/sessions/{self.session_id}", json=body)

    async def set_avatar(self, index: int) -> None:
        self.avatar_index = index
        if index < len(self.avatar_ids):
            await self._post_session({"avatar_id": self.avatar_ids[index]})
            with contextlib.suppress(Exception):
                await self._fetch_still()

    async def set_neutral(self, on: bool = True) -> bool:
        status, _ = await self._post_session({"neutral": on})
        return status == 200

    async def close(self) -> None:
        if self.session_id is not None and self.api.http is not None:
            with contextlib.suppress(Exception):
                await self.api.request("DELETE", f"/sessions/{self.session_id}")


class CameraTrack(MediaStreamTrack):
    """The camera as an aiortc video track: the newest frame, stamped with its number."""

    kind = "video"
    remembered = 256  # sent frames kept for matching; older ones were dropped by the server

    def __init__(self, slot: NewestFrame, paused: Callable[[], bool]) -> None:
        super().__init__()
        self.slot = slot
        self.paused = paused
        self.sent: dict[int, CameraFrame] = {}
        self._t0: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.slot.get()
        while self.paused():
            frame = await self.slot.get()
        rgb = np.array(frame.image, copy=True)
        wrapped = frame.number % frameid.ID_MODULO
        frameid.stamp_id(rgb, wrapped)
        self.sent[wrapped] = frame
        while len(self.sent) > self.remembered:
            del self.sent[next(iter(self.sent))]
        if self._t0 is None:
            self._t0 = frame.captured
        return video_frame(rgb, frame.captured - self._t0)

    def resolve(self, wrapped: int) -> CameraFrame | None:
        return self.sent.pop(wrapped, None)
