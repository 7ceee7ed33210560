"""WebRTC round-trip latency benchmark: N aiortc clients stream a real clip to `iwarp serve`.

Each client sends the clip at its frame rate, stamped with frame numbers that the server echoes
onto the animated frames (see `frameid`), so every returned frame is matched to its sent frame:
round trip = client encode + network + server decode + model + server encode + network +
client decode. Frames sent during the first `warmup` seconds (connection set-up, model warm-up)
are left out; after `seconds` the clients stop sending and wait `grace` seconds for frames in
flight. A sent frame that never comes back was dropped (the server animates only the newest
frame, so under load it skips frames rather than queueing them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from iwarp.errors import InputError, IwarpError
from iwarp.media import default_driving_clip, iter_video_frames, video_info
from iwarp.metrics import latency_summary_ms, percentile_ms
from iwarp.options import option
from iwarp.streaming import rtc
from iwarp.streaming.client import StreamingClient


def load_frames(
    clip: str | Path, size: int, max_frames: int = 300
) -> tuple[list[np.ndarray], float]:
    """The clip's first frames, centre-cropped square and resized to size x size, and its fps."""
    fps = video_info(clip).fps or 30.0
    frames = []
    for rgb in iter_video_frames(clip, max_frames=max_frames):
        h, w = rgb.shape[:2]
        s = min(h, w)
        sq = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        frames.append(cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA))
    if not frames:
        raise InputError(f"no frames in {clip}", "give another --clip")
    return frames, fps


def summarize(
    clients: Sequence[StreamingClient], t_start: float, t_stop: float, fps_in: float
) -> dict[str, Any]:
    """Results of one run (frames sent in [t_start, t_stop))."""
    window = max(t_stop - t_start, 1e-6)
    all_latency: list[float] = []
    per_client = []
    sent_total = received_total = unreadable_total = 0
    quarters: list[list[float]] = [[] for _ in range(4)]
    for c in clients:
        assert c.track is not None
        sent = {n: t for n, t in c.track.sent.items() if t_start <= t < t_stop}
        got = {}
        unreadable = 0
        for r in c.received:
            if r.frame is None:
                unreadable += int(t_start <= r.time < t_stop)
            elif r.frame in sent and r.latency is not None:
                got[r.frame] = r.latency
        latency = [got[n] for n in sorted(got)]
        for n, lat in got.items():
            q = min(3, int(4 * (sent[n] - t_start) / window))
            quarters[q].append(lat)
        all_latency += latency
        sent_total += len(sent)
        received_total += len(got)
        unreadable_total += unreadable
        per_client.append(
            {
                "frames_sent": len(sent),
                "frames_received": len(got),
                "fps_out": round(len(got) / window, 2),
                "rtt_ms": {"p50": percentile_ms(latency, 50), "p95": percentile_ms(latency, 95)},
            }
        )
    fps = [p["fps_out"] for p in per_client]
    return {
        "clients": len(clients),
        "seconds": round(window, 2),
        "fps_in": round(fps_in, 2),
        "rtt_ms": latency_summary_ms(all_latency),
        # Latency drift under load: p50 of frames sent in the first vs the last quarter.
        "rtt_first_quarter_p50_ms": percentile_ms(quarters[0], 50),
        "rtt_last_quarter_p50_ms": percentile_ms(quarters[3], 50),
        "fps_out": round(float(np.mean(fps)), 2) if fps else 0.0,
        "fps_out_min": round(min(fps), 2) if fps else 0.0,
        "frames_sent": sent_total,
        "frames_received": received_total,
        "frames_dropped": sent_total - received_total,
        "frames_unreadable": unreadable_total,
        "per_client": per_client,
    }


async def run_async(
    url: str,
    frames: Sequence[np.ndarray],
    fps: float,
    clients: int = 1,
    seconds: float = 10.0,
    warmup: float = 2.0,
    grace: float = 1.0,
    token: str | None = None,
    avatar: Sequence[str | Path] | None = None,
    connect_timeout: float = 30.0,
    kill_replica_at: float | None = None,
    ray_address: str = "auto",
) -> dict[str, Any]:
    """One run with `clients` concurrent sessions; returns `summarize`'s dict (+ server view).

    Against `iwarp serve --engine ray` it adds each replica's frames/s and call latency (from
    /metrics); `kill_replica_at` kills the busiest replica that many seconds into the measured
    window and reports the freeze (the longest gap between frames a client received).
    """
    loop = asyncio.get_running_loop()
    owner = uuid.uuid4().hex
    async with contextlib.AsyncExitStack() as stack:
        group = [
            await stack.enter_async_context(
                StreamingClient(url, frames, fps, token=token, client_id=owner)
            )
            for _ in range(clients)
        ]
        avatar_id = await group[0].upload_avatar(avatar) if avatar else None
        await asyncio.gather(*(c.connect(avatar_id) for c in group))
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.first_frame.wait() for c in group)), connect_timeout
            )
        except TimeoutError:
            raise IwarpError(
                f"no video came back within {connect_timeout:g} s", "check the server's log"
            ) from None
        t_start = loop.time() + warmup
        t_stop = t_start + seconds
        await asyncio.sleep(warmup)
        before = await _engine_samples(group[0])
        killed: tuple[str, float] | None = None
        if kill_replica_at is not None:
            await asyncio.sleep(kill_replica_at)
            killed = await _kill_busiest_replica(group[0], before, ray_address)
            await asyncio.sleep(max(0.0, t_stop - loop.time()))
        else:
            await asyncio.sleep(seconds)
        after = await _engine_samples(group[0])
        for c in group:
            c.stop_sending()
        await asyncio.sleep(grace)
        server = [await c.session_info() for c in group]
        if avatar_id:
            await group[0].request("DELETE", f"/avatars/{avatar_id}")
    # loop.time() and time.monotonic() share a clock on Linux/macOS; the clients use the latter.
    result = summarize(group, t_start, t_stop, fps)
    model = [s["model_ms"]["p50"] for s in server if s]
    result["server_model_ms_p50"] = round(float(np.mean(model)), 1) if model else None
    srv = [s["server_latency_ms"]["p50"] for s in server if s]
    result["server_latency_ms_p50"] = round(float(np.mean(srv)), 1) if srv else None
    result["server_frames_dropped"] = sum(s["frames_dropped"] for s in server if s)
    result.update(_engine_summary(before, after, seconds))
    if killed is not None:
        result["kill"] = _freeze(group, *killed)
    return result


_FRAMES = 'iwarp_engine_frames_total{replica="'


async def _engine_samples(client: StreamingClient) -> dict[str, float]:
    from iwarp.streaming.metrics import parse_samples

    status, text = await client.request("GET", "/metrics")
    return parse_samples(text) if status == 200 and isinstance(text, str) else {}


def _replica_frames(samples: dict[str, float]) -> dict[str, float]:
    return {k[len(_FRAMES) : -2]: v for k, v in samples.items() if k.startswith(_FRAMES)}


def _engine_summary(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, Any]:
    """Per replica (--engine ray): frames/s in the window and the engine call's p50/p95."""
    frames0, frames1 = _replica_frames(before), _replica_frames(after)
    if not frames1:
        return {}
    replicas = {}
    for replica, n in sorted(frames1.items()):
        key = f'iwarp_engine_latency_seconds{{replica="{replica}",quantile="'
        replicas[replica] = {
            "fps": round((n - frames0.get(replica, 0.0)) / seconds, 2),
            "call_ms_p50": round(after.get(key + '0.5"}', 0.0) * 1e3, 1),
            "call_ms_p95": round(after.get(key + '0.95"}', 0.0) * 1e3, 1),
        }
    return {"engine_replicas": replicas}


async def _kill_busiest_replica(
    client: StreamingClient, before: dict[str, float], ray_address: str
) -> tuple[str, float]:
    """Kills the replica that animated the most frames since `before`; (its id, when)."""
    from iwarp.cluster.engine import kill_replica  # Ray: only for --kill-replica-at

    now = _replica_frames(await _engine_samples(client))
    if not now:
        raise IwarpError("--kill-replica-at: the server has no replicas", "serve --engine ray")
    base = _replica_frames(before)
    replica = max(now, key=lambda r: now[r] - base.get(r, 0.0))
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await loop.run_in_executor(None, kill_replica, replica, ray_address)
    return replica, killed_at


def _freeze(clients: Sequence[StreamingClient], replica: str, killed_at: float) -> dict[str, Any]:
    """The longest gap between received frames from 0.5 s before the kill to 5 s after, per
    client, against the usual gap (median) before the kill."""
    freezes, usual = [], []
    for c in clients:
        times = [r.time for r in c.received]
        around = [t for t in times if killed_at - 0.5 <= t <= killed_at + 5.0]
        earlier = [t for t in times if t < killed_at - 0.5]
        if len(around) > 1:
            freezes.append(float(np.max(np.diff(around))))
        if len(earlier) > 1:
            usual.append(float(np.median(np.diff(earlier))))
    return {
        "replica": replica,
        "freeze_ms_max": round(max(freezes) * 1e3, 1) if freezes else None,
        "freeze_ms_per_client": [round(f * 1e3, 1) for f in freezes],
        "usual_gap_ms": round(float(np.mean(usual)) * 1e3, 1) if usual else None,
    }


def run(
    url: str,
    clip: str | Path | None = None,
    clients: Sequence[int] = (1,),
    seconds: float = 10.0,
    warmup: float = 2.0,
    size: int = 256,
    token: str | None = None,
    avatar: Sequence[str | Path] | None = None,
    kill_replica_at: float | None = None,
    ray_address: str = "auto",
) -> list[dict[str, Any]]:
    """One run per entry of `clients` (e.g. 1, 2, 4), one after the other."""
    logging.getLogger("aioice").setLevel(logging.WARNING)
    rtc.configure(loopback_only=rtc.is_loopback(_host(url)))
    frames, fps = load_frames(clip or default_driving_clip(), size)
    results = []
    for n in clients:
        r = asyncio.run(
            run_async(
                *(url, frames, fps, n, seconds, warmup),
                token=token,
                avatar=avatar,
                kill_replica_at=kill_replica_at,
                ray_address=ray_address,
            )
        )
        r["clip"] = str(clip or default_driving_clip())
        r["size"] = size
        results.append(r)
    return results


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or ""


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Round-trip percentiles and output fps against the number of clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["clients"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for q in ("p50", "p95", "p99"):
        ax1.plot(xs, [r["rtt_ms"][q] for r in results], marker="o", label=q)
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("round trip (ms)")
    ax1.set_title("WebRTC round-trip latency")
    ax1.legend()
    ax2.plot(xs, [r["fps_out"] for r in results], marker="o", label="mean per client")
    ax2.plot(xs, [r["fps_out_min"] for r in results], marker="x", label="worst client")
    ax2.axhline(15, color="grey", linestyle="--", label="15 fps")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("animated frames per second")
    ax2.set_title("Output rate per client")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_result(r: dict[str, Any]) -> str:
    rtt = r["rtt_ms"]
    return (
        f"{r['clients']} client(s): round trip p50 {rtt['p50']} / p95 {rtt['p95']} / p99 "
        f"{rtt['p99']} ms; {r['fps_out']} fps out per client (worst {r['fps_out_min']}, "
        f"in {r['fps_in']}); {r['frames_received']}/{r['frames_sent']} frames back, "
        f"{r['frames_dropped']} dropped; server model p50 {r['server_model_ms_p50']} ms"
        + "".join(
            f"; replica {name}: {e['fps']} fps, call p50 {e['call_ms_p50']} ms"
            for name, e in r.get("engine_replicas", {}).items()
        )
        + (
            f"; killed {r['kill']['replica']}: freeze {r['kill']['freeze_ms_max']} ms "
            f"(usual gap {r['kill']['usual_gap_ms']} ms)"
            if "kill" in r
            else ""
        )
    )


@dataclass
class WebrtcOptions:
    """`iwarp bench-webrtc`'s options."""

    url: str = option(rtc.DEFAULT_URL, help="the iwarp serve address")
    clip: str | None = option(None, help="driving clip (default: a real one from shared data)")
    avatars: list[str] = option(
        default_factory=list, flag="--avatar", help="avatar photo(s) to upload and use"
    )
    clients: str = option(
        "1", help="concurrent clients; a comma list runs each in turn (e.g. 1,2,4)"
    )
    seconds: float = option(10.0, help="measured seconds per run")
    warmup: float = option(2.0, help="seconds left out at the start")
    size: int = option(256, help="sent frame size (square)")
    token: str | None = option(
        None, env="IWARP_TOKEN", help="the server's token (default: $IWARP_TOKEN)"
    )
    json: bool = option(False, help="one JSON object per run")
    plot: str | None = option(None, help="write a PNG of latency and fps against clients")
    kill_replica_at: float | None = option(
        None,
        help="against serve --engine ray: kill the busiest replica S seconds into each run "
        "and report the freeze",
    )
    ray_address: str = option("auto", help="with --kill-replica-at: the Ray cluster (auto)")


def run_options(o: WebrtcOptions) -> int:
    """Runs one benchmark per --clients entry; prints (or plots) the results."""
    try:
        counts = [int(x) for x in str(o.clients).split(",") if x.strip()]
    except ValueError:
        raise IwarpError(f"bad --clients {o.clients!r}", "e.g. --clients 1,2,4") from None
    if not counts or min(counts) < 1:
        raise IwarpError("--clients needs numbers >= 1", "e.g. --clients 1,2,4")
    results = run(
        o.url,
        o.clip,
        counts,
        o.seconds,
        o.warmup,
        o.size,
        o.token,
        o.avatars or None,
        o.kill_replica_at,
        o.ray_address,
    )
    for r in results:
        print(json.dumps(r) if o.json else format_result(r), flush=True)
    if o.plot:
        plot(results, o.plot)
    return 0
