"""Sessions: one RTCPeerConnection per client stream, and the registry that bounds them.

A session owns its peer connection, its `DrivingStream` (face tracker, neutral pose,
smoothing) and the `NewestFrameTrack` that animates its camera with its avatar. It ends, and
frees its slot at once, when the connection fails or closes, the camera track ends, no video
arrives for `idle_timeout` seconds (a peer that vanished without a word: ICE consent checks
would take ~30 s to notice), its peer has not connected within `ice_timeout` (an offer that
never connects holds no slot for long), or no first frame arrives within `connect_timeout`.
One address may hold `max_per_address` sessions (client ids are the client's choice, its
address is not), and an offer may list `max_remote_candidates` ICE candidates: the server
sends STUN checks to each, so an unbounded list would make it a UDP scanner.

Threading: `process` runs in the model executor, one call at a time per session (the track
never has two frames in flight), so the `DrivingStream` is only ever touched by one thread at a
time. Requests from the event loop (neutral pose) are handed over under a lock and applied to
the next frame.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import secrets
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription, sdp
from aiortc.mediastreams import MediaStreamError

from iwarp.errors import InputError
from iwarp.metrics import percentile, percentile_ms
from iwarp.runtime.animator import Animator
from iwarp.streaming import frameid, rtcguard
from iwarp.streaming.engine import Engine, LocalEngine, ReplicaStats
from iwarp.streaming.httperrors import ApiError
from iwarp.streaming.metrics import Registry
from iwarp.streaming.rtc import rtc_configuration
from iwarp.streaming.tracks import NewestFrameTrack, TrackStats

log = logging.getLogger("iwarp.streaming")


@dataclass
class SessionLimits:
    max_sessions: int = 4
    # One client (owner key) may not hold every slot; 2 lets a reloaded page start its new
    # session while the old one is still being noticed as gone.
    max_per_client: int = 2
    idle_timeout: float = 10.0  # seconds without a video frame, once video has flowed
    connect_timeout: float = 30.0  # seconds from the offer to the first video frame
    ice_timeout: float = 10.0  # seconds from the offer to a connected peer (ICE + DTLS)
    # Remote addresses (IPv6: their /64): 2 of the default 4 slots, so one machine rotating
    # client ids cannot take every slot.
    max_per_address: int = 2
    max_remote_candidates: int = 32  # distinct ICE candidates in an offer: STUN targets
    close_timeout: float = 5.0  # seconds pc.close() may take before its parts are stopped


_OFFER_HINT = "send the offer from RTCPeerConnection.createOffer() unchanged"
# aiortc's parser asserts on a bad m= line without saying which: check their shape first.
_MEDIA_LINE = re.compile(r"m=\S+ \d+(/\d+)? \S+( \S+)+")


def parse_offer(text: str, max_candidates: int = 32) -> sdp.SessionDescription:
    """The offer parsed and checked as aiortc will (ICE credentials, a video section, at most
    `max_candidates` ICE candidates), or ApiError 400 saying what is wrong. Runs before a
    session slot is taken, so malformed offers never hold one."""
    if not text.lstrip().startswith("v=0"):
        raise ApiError("malformed SDP offer: it does not start with 'v=0'", _OFFER_HINT, 400)
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("m=") and not _MEDIA_LINE.fullmatch(line.strip()):
            raise ApiError(f"malformed SDP offer: bad media line {line[:80]!r}", _OFFER_HINT, 400)
    try:
        description = sdp.SessionDescription.parse(text)
    except Exception as exc:  # the parser raises assorted types (ValueError, AssertionError...)
        reason = str(exc) or f"{type(exc).__name__} in the SDP parser"
        raise ApiError(f"malformed SDP offer: {reason}", _OFFER_HINT, 400) from exc
    if not any(m.kind == "video" for m in description.media):
        raise ApiError(
            "the offer has no video track",
            "add the camera track (sendrecv) to the peer connection before createOffer()",
            400,
        )
    for media in description.media:
        if not media.ice.usernameFragment or not media.ice.password:
            raise ApiError(
                f"malformed SDP offer: the {media.kind} section has no ICE username fragment "
                "or password",
                _OFFER_HINT,
                400,
            )
    candidates = rtcguard.remote_candidates(description)
    if candidates > max_candidates:
        raise ApiError(
            f"the offer lists {candidates} ICE candidates, more than the {max_candidates} "
            "this server checks",
            "send the offer from createOffer() unchanged, or start iwarp serve with a higher "
            "--max-remote-candidates",
            400,
        )
    return description


class Session:
    def __init__(
        self,
        registry: SessionRegistry,
        owner: str,
        avatar_id: str,
        echo_id: bool,
        address: str = "",
    ):
        self.registry = registry
        self.id = secrets.token_hex(8)
        self.owner = owner
        self.address = address  # the client's address (limits.address_key)
        self.avatar_id = avatar_id
        self.echo_id = echo_id
        self.stream = registry.engine.stream()
        self.created = time.monotonic()
        self.pc: RTCPeerConnection | None = None
        self.track: NewestFrameTrack | None = None
        self.closed = False
        self.connected = False  # the peer connection reached "connected" once
        self.close_reason = ""
        self.neutral = False
        self._tasks: set[asyncio.Task] = set()
        self._lock = threading.Lock()
        self._pending_neutral: tuple[bool, asyncio.Future[bool]] | None = None
        self._loop = asyncio.get_running_loop()

    # -- setup ------------------------------------------------------------------------------
    async def start(
        self, offer: RTCSessionDescription, description: sdp.SessionDescription
    ) -> RTCSessionDescription:
        """Answers `offer` (`description`: the same, parsed by `parse_offer`)."""
        self.pc = pc = RTCPeerConnection(rtc_configuration())
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)
        try:
            await pc.setRemoteDescription(offer)
        except Exception as exc:  # aiortc's SDP parser raises assorted types on bad input
            reason = str(exc) or type(exc).__name__
            raise ApiError(f"malformed SDP offer: {reason}", _OFFER_HINT, 400) from exc
        rtcguard.accept_only_offered_ssrcs(pc, description)
        if self.track is None:
            raise ApiError(
                "the offer has no video track",
                "add the camera track (sendrecv) to the peer connection before createOffer()",
                400,
            )
        await pc.setLocalDescription(await pc.createAnswer())
        self._spawn(self._watch())
        return pc.localDescription

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self.track is None and self.pc is not None:
            self.track = NewestFrameTrack(
                track, self.process, self.registry.executor, self.registry.observe_frame
            )
            self.pc.addTrack(self.track)
            track.on("ended", lambda: self._spawn(self.close("the camera track ended")))
        else:
            # Audio or a second video: read and discard, or aiortc queues it without bound.
            self._spawn(_drain(track))

    async def _on_state(self) -> None:
        if self.pc is None:
            return
        if self.pc.connectionState == "connected":
            self.connected = True
        elif self.pc.connectionState in ("failed", "closed"):
            await self.close(f"connection {self.pc.connectionState}")

    async def _watch(self) -> None:
        limits = self.registry.limits
        while not self.closed:
            await asyncio.sleep(min(0.5, limits.idle_timeout / 4))
            stats = self.stats
            now = time.monotonic()
            if stats.frames_in:
                if now - stats.last_input > limits.idle_timeout:
                    await self.close(f"no video for {limits.idle_timeout:g} s")
            elif not self.connected and now - self.created > limits.ice_timeout:
                await self.close(f"the peer did not connect within {limits.ice_timeout:g} s")
            elif now - self.created > limits.connect_timeout:
                await self.close(f"no video within {limits.connect_timeout:g} s of the offer")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.closed:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- per frame (model thread) -------------------------------------------------------------
    def process(self, rgb: np.ndarray) -> np.ndarray:
        with self._lock:
            pending, self._pending_neutral = self._pending_neutral, None
        if pending is not None:
            on, future = pending
            if on:
                ok = self.stream.set_reference(rgb)
            else:
                self.stream.clear_reference()
                ok = True
            self.neutral = self.stream.reference is not None
            self._loop.call_soon_threadsafe(_resolve, future, ok)
        avatar_id = self.avatar_id
        try:
            out = self.stream.animate(avatar_id, rgb)
        except InputError:
            default = self.registry.default_avatar
            if avatar_id == default:
                raise
            # The avatar was deleted while in use: carry on with the default one.
            self.avatar_id = default
            out = self.stream.animate(default, rgb)
        if self.echo_id:
            frameid.copy_band(rgb, out)
        return out

    # -- control (event loop) ---------------------------------------------------------------
    def switch_avatar(self, avatar_id: str) -> None:
        self.avatar_id = avatar_id  # read once per frame by `process`

    async def set_neutral(self, on: bool = True, timeout: float = 3.0) -> bool:
        """Uses the next frame's pose as the neutral one (or clears it); False when that
        frame shows no face."""
        future: asyncio.Future[bool] = self._loop.create_future()
        with self._lock:
            old, self._pending_neutral = self._pending_neutral, (on, future)
        if old is not None:
            _resolve(old[1], False)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ApiError(
                "no video frame arrived to take the neutral pose from",
                "start the camera stream first",
                409,
            ) from None

    @property
    def stats(self) -> TrackStats:
        return self.track.stats if self.track is not None else TrackStats()

    def info(self) -> dict[str, Any]:
        stats = self.stats
        recent = list(stats.recent)
        return {
            "session_id": self.id,
            "avatar_id": self.avatar_id,
            "neutral": self.neutral,
            "state": self.pc.connectionState if self.pc else "new",
            "age_s": round(time.monotonic() - self.created, 1),
            "frames_in": stats.frames_in,
            "frames_out": stats.frames_out,
            "frames_dropped": stats.dropped,
            "errors": stats.errors,
            "fps_out": round(stats.fps(), 2),
            "server_latency_ms": {
                "p50": percentile_ms([r[0] for r in recent], 50) or 0.0,
                "p95": percentile_ms([r[0] for r in recent], 95) or 0.0,
            },
            "model_ms": {"p50": percentile_ms([r[1] for r in recent], 50) or 0.0},
        }

    # -- teardown ---------------------------------------------------------------------------
    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.registry.forget(self)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        try:
            if self.track is not None:
                self.track.stop()
            if self.pc is not None:
                timeout = self.registry.limits.close_timeout
                if not await rtcguard.close_peer(self.pc, timeout):
                    log.warning(
                        "session %s: the peer connection took over %g s to close; its "
                        "transports were stopped one by one",
                        self.id,
                        timeout,
                    )
            if self.track is not None:
                await self.track.wait_closed()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # Whatever failed above, the neutral-pose waiter and the native graphs are freed.
            with self._lock:
                pending, self._pending_neutral = self._pending_neutral, None
            if pending is not None:
                _resolve(pending[1], False)
            self.stream.close()  # the tracker's MediaPipe graphs: native memory, freed now
        log.info("session %s closed: %s", self.id, reason)
        # aiortc's peer connection, transceivers and codecs form reference cycles: their native
        # encoder/decoder threads and buffers go only when the cyclic collector runs, which in
        # a long-running server with a big heap is rarely (measured: +2 threads and ~5 MB per
        # session until then). A full collection takes milliseconds once create_app has frozen
        # the start-up heap; a second from now, when nothing refers to this session any more.
        self._loop.call_later(1.0, gc.collect)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


async def _drain(track: MediaStreamTrack) -> None:
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


class SessionRegistry:
    """All live sessions, the shared model executor, and the server's metrics."""

    def __init__(
        self,
        animator: Animator,
        default_avatar: str,
        limits: SessionLimits | None = None,
        workers: int = 1,
        engine: Engine | None = None,
    ) -> None:
        self.animator = animator
        # What animates the sessions' frames: this process's Animator unless told otherwise.
        self.engine = engine or LocalEngine(animator)
        self.default_avatar = default_avatar
        self.limits = limits or SessionLimits()
        # One shared pool: every session has at most one frame in flight, so `workers` bounds
        # how many frames the model runs at once (more than the cores only adds contention).
        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="iwarp-model")
        self.sessions: dict[str, Session] = {}
        self._closed_totals = TrackStats()
        self.metrics = self._build_metrics()

    def _build_metrics(self) -> Registry:
        m = Registry()
        m.gauge("iwarp_sessions_active", "Sessions with a live peer connection", lambda: self.count)
        m.gauge("iwarp_sessions_max", "Session limit (--max-sessions)", self._max)
        self.started = m.counter("iwarp_sessions_started_total", "Sessions started")
        self.rejected = m.counter("iwarp_sessions_rejected_total", "Offers refused: server full")
        m.counter_fn(
            "iwarp_frames_in_total", "Camera frames received", lambda: self._total("frames_in")
        )
        m.counter_fn(
            "iwarp_frames_out_total", "Animated frames sent", lambda: self._total("frames_out")
        )
        m.counter_fn(
            "iwarp_frames_dropped_total",
            "Camera frames skipped because a newer one arrived before the model was free",
            lambda: self._total("dropped"),
        )
        m.counter_fn(
            "iwarp_frame_errors_total", "Frames the model failed on", lambda: self._total("errors")
        )
        m.gauge(
            "iwarp_output_fps",
            "Animated frames per second, summed over sessions (last 2 s)",
            lambda: sum(s.stats.fps() for s in self.sessions.values()),
        )
        m.gauge("iwarp_avatars", "Avatars registered", lambda: len(self.animator.avatars()))
        self.latency = m.histogram(
            "iwarp_frame_latency_seconds",
            "Server-side latency: camera frame decoded -> animated frame handed to the encoder",
        )
        self.model_time = m.histogram(
            "iwarp_model_seconds", "Model time per frame (face tracking + network + conversions)"
        )
        m.labelled(
            "iwarp_engine_frames_total",
            "Frames each engine replica animated (--engine ray)",
            "counter",
            lambda: [("", {"replica": r}, s.frames) for r, s in self._replicas()],
        )
        m.labelled(
            "iwarp_engine_latency_seconds",
            "Engine call time per frame, by replica (last 300 frames): network hop + replica",
            "summary",
            self._replica_latency,
        )
        return m

    def _replicas(self) -> list[tuple[str, ReplicaStats]]:
        return sorted(self.engine.replica_stats().items())

    def _replica_latency(self) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = []
        for replica, stats in self._replicas():
            recent = list(stats.recent)
            for q in (0.5, 0.95):
                value = percentile(recent, q * 100) or 0.0
                out.append(("", {"replica": replica, "quantile": str(q)}, value))
            out.append(("_sum", {"replica": replica}, stats.seconds))
            out.append(("_count", {"replica": replica}, float(stats.frames)))
        return out

    def _max(self) -> float:
        return self.limits.max_sessions

    def _total(self, name: str) -> float:
        live = sum(getattr(s.stats, name) for s in self.sessions.values())
        return live + getattr(self._closed_totals, name)

    def observe_frame(self, latency_s: float, model_s: float) -> None:
        self.latency.observe(latency_s)
        self.model_time.observe(model_s)

    @property
    def count(self) -> int:
        return len(self.sessions)

    async def create(
        self,
        offer: RTCSessionDescription,
        avatar_id: str,
        owner: str,
        echo_id: bool = False,
        address: str = "",
    ) -> tuple[Session, RTCSessionDescription]:
        """A new session answering `offer`; ApiError 400 for a malformed offer (checked
        before a slot is taken), 429 when this owner holds `max_per_client` sessions or this
        address `max_per_address`, 503 when all slots are taken."""
        description = parse_offer(offer.sdp, self.limits.max_remote_candidates)
        mine = sum(1 for s in self.sessions.values() if s.owner == owner)
        if mine >= self.limits.max_per_client:
            raise ApiError(
                f"you already have {mine} sessions, the most one client may hold",
                "close one (DELETE /sessions/{id}, or the other tab) and try again",
                429,
            )
        from_address = sum(1 for s in self.sessions.values() if s.address == address)
        if address and from_address >= self.limits.max_per_address:
            raise ApiError(
                f"your address already has {from_address} sessions, the most one address may hold",
                "close one and try again, or start iwarp serve with a higher "
                "--max-sessions-per-address",
                429,
            )
        if self.count >= self.limits.max_sessions:
            self.rejected.inc()
            raise ApiError(
                f"server full: {self.count} of {self.limits.max_sessions} sessions in use",
                "try again later (the page retries by itself) or raise --max-sessions",
                503,
            )
        # Registered before the first await, so concurrent offers cannot overshoot the limit.
        session = Session(self, owner, avatar_id, echo_id, address)
        self.sessions[session.id] = session
        try:
            answer = await session.start(offer, description)
        except BaseException:
            await asyncio.shield(session.close("setup failed"))
            raise
        self.started.inc()
        log.info("session %s started (avatar %s)", session.id, avatar_id)
        return session, answer

    def forget(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            for name in ("frames_in", "frames_out", "dropped", "errors"):
                total = getattr(self._closed_totals, name) + getattr(session.stats, name)
                setattr(self._closed_totals, name, total)

    def get(self, session_id: str, owner: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            # Someone else's session is reported as missing: ids are not for guessing.
            raise ApiError(f"no session {session_id!r}", "start a stream first", 404)
        return session

    async def close_all(self, reason: str = "server shutting down") -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values())))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
