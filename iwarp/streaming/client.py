"""A pure-Python WebRTC client of `iwarp serve` (aiortc): the latency benchmark and the tests.

It streams a list of frames at a fixed rate, each stamped with its number in a bottom band
(`frameid`), asks the server to echo that band onto the animated frame (`echo_id` in the
offer), and notes for every returned frame when it arrived and which sent frame it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from iwarp.errors import IwarpError
from iwarp.streaming import frameid
from iwarp.streaming.rtc import rtc_configuration

VIDEO_TIME_BASE = Fraction(1, 90000)


def video_frame(rgb: np.ndarray, seconds: float) -> VideoFrame:
    """An RGB image as a frame to send, stamped `seconds` after the stream's start."""
    frame = VideoFrame.from_ndarray(rgb, format="rgb24")
    frame.pts = round(seconds * 90000)
    frame.time_base = VIDEO_TIME_BASE
    return frame


class ClipTrack(MediaStreamTrack):
    """Frames played in a loop at `fps`, in real time, each stamped with its number."""

    kind = "video"

    def __init__(self, frames: Sequence[np.ndarray], fps: float, stamp: bool = True) -> None:
        super().__init__()
        if not frames:
            raise ValueError("no frames to stream")
        self.frames = frames
        self.fps = float(fps)
        self.stamp = stamp
        self.sent: dict[int, float] = {}  # frame number -> time.monotonic() handed to encoder
        self.count = 0
        self._start: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = self.count
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + n / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 2 / self.fps:
            self._start = now - n / self.fps  # fell behind (busy CPU): no catch-up burst
        rgb = np.array(self.frames[n % len(self.frames)], copy=True)
        if self.stamp:
            frameid.stamp_id(rgb, n)
        frame = video_frame(rgb, n / self.fps)
        self.sent[n] = time.monotonic()
        self.count += 1
        return frame

    def resolve(self, wrapped_id: int) -> int | None:
        """The frame number whose 16-bit id is `wrapped_id` (the newest such one sent)."""
        n = wrapped_id + (self.count - 1 - wrapped_id) // frameid.ID_MODULO * frameid.ID_MODULO
        return n if n in self.sent else None


@dataclass
class Received:
    time: float  # time.monotonic() when the decoded frame came out of the receiver
    frame: int | None  # the sent frame number it was made from, None when the band was unreadable
    latency: float | None  # seconds from send to receive


class ServerApi:
    """The HTTP side of an `iwarp serve`: token, client id (the avatars' owner), answers.

    `async with ServerApi(url) as api` opens the connection pool; `request` returns
    (status, body) with JSON decoded, text as str and anything else as bytes.
    `local_address` sends the requests from that address of this machine (e.g. 127.0.0.5:
    several clients on one machine then count as several for the server's per-address limits).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        client_id: str | None = None,
        local_address: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-Iwarp-Client": client_id or uuid.uuid4().hex}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.local_address = local_address
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        connector = None
        if self.local_address:
            connector = aiohttp.TCPConnector(local_addr=(self.local_address, 0))
        self.http = aiohttp.ClientSession(headers=self.headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        assert self.http is not None, f"use `async with {type(self).__name__}(...)`"
        async with self.http.request(method, self.url + path, **kwargs) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            if response.content_type.startswith("text/"):
                return response.status, await response.text()
            return response.status, await response.read()

    async def upload_avatar(self, photos: Sequence[str | Path]) -> str:
        """Uploads the photos of one avatar; returns its id."""
        form = aiohttp.FormData()
        for p in photos:
            form.add_field("file", Path(p).read_bytes(), filename=Path(p).name)
        status, body = await self.request("POST", "/avatars", data=form)
        if status != 201:
            error = body.get("error", body) if isinstance(body, dict) else body
            hint = body.get("hint", "check the photos") if isinstance(body, dict) else ""
            raise IwarpError(
                f"avatar upload of {list(map(str, photos))} failed ({status}): {error}", hint
            )
        return body["avatar_id"]

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None


class OfferRefused(IwarpError):
    """`iwarp serve` answered the offer with an error status (503: no free session)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"offer refused ({status}): {body}", "see the server's log")
        self.status = status
        self.body = body


class PeerCall:
    """One WebRTC call to `iwarp serve`: `track` goes out, every decoded avatar frame comes back
    to `on_frame(rgb, received_at)`; `ended` is set when the peer stops sending or the
    connection fails. The one peer-connection implementation (StreamingClient, `iwarp cam`)."""

    def __init__(
        self, track: MediaStreamTrack, on_frame: Callable[[np.ndarray, float], None]
    ) -> None:
        self.track = track
        self.on_frame = on_frame
        self.pc = RTCPeerConnection(rtc_configuration())
        self.pc.addTrack(track)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        self.ended = asyncio.Event()
        self.session_id: str | None = None
        self._consumer: asyncio.Task | None = None

    async def start(self, api: ServerApi, timeout: float | None = None, **offer: Any) -> str:
        """Offer (with `offer`'s extra fields: echo_id, avatar_id) / answer; returns the session
        id once the answer is applied. Raises OfferRefused on an error status."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", **offer}
        status, answer = await asyncio.wait_for(api.request("POST", "/offer", json=body), timeout)
        if status != 200:
            raise OfferRefused(status, answer)
        self.session_id = answer["session_id"]
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
        )
        return self.session_id

    async def send_on_unlisted_ssrcs(self, count: int) -> None:
        """One authenticated SRTP packet on each of `count` SSRCs the offer never listed: what
        a misbehaving peer does (the server must drop them; its robustness tests and
        bench/soak.py's hostile client send them)."""
        from aiortc import sdp
        from aiortc.rtp import RtpPacket

        answer = sdp.SessionDescription.parse(self.pc.remoteDescription.sdp)
        payload_type = answer.media[0].rtp.codecs[0].payloadType
        transport = self.pc.getSenders()[0].transport
        for n in range(count):
            packet = RtpPacket(
                payload_type=payload_type,
                sequence_number=n,
                timestamp=90 * n,
                ssrc=0x10000 + n,
                payload=b"\x10" + bytes(20),
            )
            await transport._send_rtp(packet.serialize())

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._consumer is None:
            self._consumer = asyncio.ensure_future(self._consume(track))

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.ended.set()

    async def _consume(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                self.on_frame(frame.to_ndarray(format="rgb24"), now)
        self.ended.set()

    async def close(self) -> None:
        self.track.stop()
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
        await self.pc.close()


class StreamingClient(ServerApi):
    """One session: upload (optional), offer/answer over HTTP, stream, collect results."""

    def __init__(
        self,
        url: str,
        frames: Sequence[np.ndarray],
        fps: float,
        token: str | None = None,
        client_id: str | None = None,
        echo_id: bool = True,
        keep_every: int = 0,
        local_address: str | None = None,
    ) -> None:
        super().__init__(url, token, client_id, local_address)
        self.frames = frames
        self.fps = fps
        self.echo_id = echo_id
        self.keep_every = keep_every  # keep every n-th received image (0: none) for inspection
        self.call: PeerCall | None = None
        self.track: ClipTrack | None = None
        self.session_id: str | None = None
        self.received: list[Received] = []
        self.kept: list[np.ndarray] = []
        self.first_frame = asyncio.Event()

    async def connect(self, avatar_id: str | None = None, timeout: float = 20.0) -> None:
        """Offer/answer; returns once the answer is applied (frames may take a moment)."""
        if self.call is not None:  # a refused or finished call: a new one replaces it
            await self.call.close()
        self.track = ClipTrack(self.frames, self.fps, stamp=self.echo_id)
        self.call = PeerCall(self.track, self._on_frame)
        offer: dict[str, Any] = {"echo_id": self.echo_id}
        if avatar_id:
            offer["avatar_id"] = avatar_id
        self.session_id = await self.call.start(self, timeout, **offer)

    def _on_frame(self, rgb: np.ndarray, now: float) -> None:
        number = latency = None
        if self.echo_id and self.track is not None:
            wrapped = frameid.read_id(rgb)
            number = self.track.resolve(wrapped) if wrapped is not None else None
            if number is not None:
                latency = now - self.track.sent[number]
        self.received.append(Received(now, number, latency))
        if self.keep_every and len(self.received) % self.keep_every == 0:
            self.kept.append(rgb)
        self.first_frame.set()

    async def session_info(self) -> dict[str, Any] | None:
        if self.session_id is None:
            return None
        status, body = await self.request("GET", f"/sessions/{self.session_id}")
        return body if status == 200 else None

    def stop_sending(self) -> None:
        if self.track is not None:
            self.track.stop()

    async def close(self) -> None:
        if self.call is not None:
            await self.call.close()
            self.call = None
        await super().close()
