#!/usr/bin/env python
"""Soak test of `iwarp serve`: N clients for M minutes, with connects and disconnects, avatar
uploads and bad requests mixed in; the server's memory, descriptors, threads and latency are
sampled all along and compared between the start and the end.

    python bench/soak.py --clients 4 --minutes 10 --json --out soak.json
    python bench/soak.py --url http://127.0.0.1:8080 --pid 12345 --clients 2 --minutes 1

By default it starts `iwarp serve` itself (on a free loopback port, with any `--serve-arg`s,
e.g. `--serve-arg=--backend=onnxruntime`) and stops it with SIGTERM at the end; with
`--url` and `--pid` it measures a server that is already running on this machine.

Each client loops: connect (offer/answer, real aiortc peer streaming a real clip at --fps,
frames stamped with their numbers so each animated frame's round trip is known), stream for a
random 10-30 s (every other session with an avatar it uploaded; one switch to the default
avatar or neutral-pose request mid-stream), then leave in one of three ways:
DELETE its session and close, close the peer connection only (the server notices), or stop
sending and stay silent (the server's idle timeout must end the session). Between sessions it
sends a few bad requests (garbage SDP, text/plain JSON, a foreign Origin, a non-image upload, a
malformed multipart body, a wrong JSON type, an unknown session) and checks each gets its 4xx.

Each client sends from its own loopback address (127.0.0.10, .11, ...), as separate machines
would, so the server's per-address limits apply to each apart. With `--hostile` (on by
default) one more client on 127.0.0.66-70 misbehaves in rounds, every --hostile-every
seconds: a real peer sending SRTP on 400 SSRCs and then deleting its session (the teardown
must finish), four trickled uploads (two refused at once, two cut off with 408), 20
connections that send their headers a byte a second (closed by the server), an offer with
600 ICE candidates to ports of this machine nobody listens on (400), and four offers that
never connect under rotating client ids (two held, then freed by the ICE deadline; two 429).
Each answer is checked; every request of every client must be answered.

Every --sample-every seconds it records the server's RSS (/proc/PID/status), open file
descriptors (/proc/PID/fd), threads, live sessions and avatars, and the round trips of the
frames received since the last sample. The report compares the first and the last tenth of
the samples after --warmup, and fits a line through RSS over time: the memory slope, in MiB
per hour. `--json` prints it as one JSON object; `--out` also writes it, with every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import aiohttp
from aiortc import RTCPeerConnection
from PIL import Image

from iwarp.benchmarks.slow_clients import trickle_request_head
from iwarp.benchmarks.webrtc import load_frames
from iwarp.media import default_driving_clip, read_image
from iwarp.metrics import latency_summary_ms
from iwarp.paths import DEFAULT_AVATAR
from iwarp.streaming import rtc
from iwarp.streaming.client import OfferRefused, StreamingClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument(
        "--url", help="a running server to soak (needs --pid); default: start iwarp serve"
    )
    p.add_argument("--pid", type=int, help="process id of the server at --url (same machine)")
    p.add_argument("--token", default=os.environ.get("IWARP_TOKEN"), help="the server's token")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra argument for the iwarp serve it starts, repeatable "
        "(e.g. --serve-arg=--backend=onnxruntime)",
    )
    p.add_argument("--clip", help="driving clip (default: a real one from the shared data)")
    p.add_argument("--size", type=int, default=256, help="frame size sent (default 256)")
    p.add_argument("--fps", type=float, default=15.0, help="frames per second sent (default 15)")
    p.add_argument(
        "--session-seconds",
        type=float,
        nargs=2,
        default=(10.0, 30.0),
        metavar=("MIN", "MAX"),
        help="each session streams for a random time in this range (default 10 30)",
    )
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument(
        "--warmup", type=float, default=60.0, help="seconds left out of start/end and the slope"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hostile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mix in a misbehaving client (default: on; --no-hostile for none)",
    )
    p.add_argument(
        "--hostile-every", type=float, default=30.0, help="seconds between hostile rounds"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", help="also write the report, with every sample, to this JSON file")
    args = p.parse_args(argv)
    if (args.url is None) != (args.pid is None):
        p.error("--url and --pid go together (or give neither to start a server)")
    if args.clients < 1 or args.minutes <= 0:
        p.error("--clients must be >= 1 and --minutes > 0")
    return args


# -- the server's process -------------------------------------------------------------------------


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": round(rss_kb / 1024, 1), "threads": threads, "fds": fds}


@dataclass
class Server:
    url: str
    pid: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None


def start_server(extra: list[str], token: str | None) -> Server:
    log = Path(tempfile.mkstemp(prefix="iwarp-soak-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "iwarp.cli", "serve", "--port", "0", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if token:
        env["IWARP_TOKEN"] = token
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    deadline = time.monotonic() + 600  # the first run may export ONNX graphs
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"iwarp serve exited ({proc.wait()}); see {log}")
        match = re.search(r"open (https?://\S+?)/? in a browser", line)
        if match:
            return Server(match.group(1), proc.pid, proc, log)
    proc.kill()
    raise SystemExit(f"iwarp serve did not start within 600 s; see {log}")


def stop_server(server: Server) -> dict[str, Any]:
    """SIGTERM, then what it printed and how it exited."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = server.proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        rest, _ = server.proc.communicate()
    log = server.log_path.read_text() if server.log_path else ""
    return {
        "exit_code": server.proc.returncode,
        "stop_message": rest.strip().splitlines()[-1] if rest.strip() else "",
        "tracebacks_in_log": log.count("Traceback"),
        "internal_errors_in_log": log.count("internal error"),
        "forced_peer_closes_in_log": log.count("took over"),
        "log": str(server.log_path),
    }


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Tally:
    sessions: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # status of refused offers -> count
    leave: dict[str, int] = field(default_factory=dict)  # how sessions ended -> count
    uploads: int = 0
    bad_requests: int = 0
    requests: int = 0  # HTTP requests sent
    unanswered: list[str] = field(default_factory=list)  # requests that got no answer
    unexpected: list[str] = field(default_factory=list)  # bad requests with the wrong answer
    connect_s: list[float] = field(default_factory=list)  # offer -> first animated frame
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (received at, rtt s)


def _photo(seed: int) -> bytes:
    """The packaged portrait, slightly changed per upload (mirrored, shifted) as a PNG."""
    image = read_image(DEFAULT_AVATAR)
    if seed % 2:
        image = image[:, ::-1]
    image = np.roll(image, seed % 17, axis=0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests() -> list[tuple[str, dict[str, Any], int]]:
    """(method path, aiohttp request arguments, expected status)."""
    form = aiohttp.FormData()
    form.add_field("file", b"not an image at all\n" * 20, filename="notes.txt")
    return [
        ("POST /offer", {"json": {"sdp": "v=0\r\nm=video 9\r\n", "type": "offer"}}, 400),
        (
            "POST /offer",
            {"data": b'{"sdp": "v=0", "type": "offer"}', "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        (
            "POST /offer",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        (
            "POST /offer",
            {"json": {"sdp": "v=0", "type": "offer"}, "headers": {"Origin": "http://evil.example"}},
            403,
        ),
        ("POST /avatars", {"data": form}, 415),
        (
            "POST /avatars",
            {"data": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
            400,
        ),
        ("POST /offer", {"json": {"sdp": "v=0", "type": "offer", "echo_id": "yes"}}, 400),
        ("GET /sessions/0123456789abcdef", {}, 404),
        ("GET /avatars/nope/preview", {}, 404),
    ]


class SoakClient(StreamingClient):
    """A StreamingClient whose requests are counted in `tally`, with those never answered."""

    def __init__(self, tally: Tally, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tally = tally

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        self.tally.requests += 1
        try:
            return await asyncio.wait_for(super().request(method, path, **kwargs), 60)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.tally.unanswered.append(f"{method} {path}: {type(exc).__name__} {exc}"[:200])
            raise


def _client_address(index: int) -> str:
    """Client `index`'s own loopback address: one machine each, as the server counts."""
    return f"127.0.0.{10 + index}"


async def client_loop(
    index: int, url: str, args: argparse.Namespace, frames: list[np.ndarray], deadline: float
) -> Tally:
    rng = random.Random(args.seed * 1000 + index)
    tally = Tally()
    client_id = f"soak-{index}-{uuid.uuid4().hex[:8]}"
    avatar_id: str | None = None
    cycle = 0
    while time.monotonic() < deadline:
        cycle += 1
        client = SoakClient(tally, url, frames, args.fps, token=args.token, client_id=client_id)
        client.local_address = _client_address(index)
        async with client:
            # Bad requests between sessions: each must get its 4xx, never a 500.
            for name, kwargs, expected in rng.sample(_bad_requests(), 3):
                method, path = name.split(" ", 1)
                try:
                    status, _ = await client.request(method, path, **kwargs)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = f"{type(exc).__name__}"
                tally.bad_requests += 1
                if status != expected:
                    tally.unexpected.append(f"{name} {kwargs.keys()}: {status}, not {expected}")
            # Every other cycle: upload an avatar (used by the next session, deleted after it).
            if avatar_id is None and cycle % 2 == 1:
                status, body = await client.request(
                    "POST", "/avatars", data=_form(_photo(index * 1000 + cycle))
                )
                if status == 201:
                    avatar_id = body["avatar_id"]
                    tally.uploads += 1
                elif status == 503 and "in progress" in str(body):
                    # Every upload slot busy (the hostile client holds up to 2 of 4): a
                    # refusal to retry, as for a full server's offers.
                    tally.refused["upload 503"] = tally.refused.get("upload 503", 0) + 1
                else:
                    tally.unexpected.append(f"upload: {status} {body}")
            t0 = time.monotonic()
            try:
                await client.connect(avatar_id=avatar_id)
            except Exception as exc:  # 503 full / 429 own limit are expected under churn
                status = re.search(r"refused \((\d+)\)", str(exc))
                key = status.group(1) if status else type(exc).__name__
                tally.refused[key] = tally.refused.get(key, 0) + 1
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                continue
            tally.sessions += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.first_frame.wait(), 30)
                tally.connect_s.append(time.monotonic() - t0)
            seconds = rng.uniform(*args.session_seconds)
            stop_at = min(deadline, time.monotonic() + seconds)
            seen = 0
            control_at = time.monotonic() + 3.0  # one control request mid-stream
            while time.monotonic() < stop_at:
                await asyncio.sleep(1.0)
                if control_at and time.monotonic() > control_at:
                    control_at = 0.0
                    body = rng.choice([{"avatar_id": "default"}, {"neutral": True}])
                    status, answer = await client.request(
                        "POST", f"/sessions/{client.session_id}", json=body
                    )
                    if status not in (200, 422):  # 422: no face in that frame
                        tally.unexpected.append(f"control {body}: {status} {answer}")
                for r in client.received[seen:]:
                    if r.latency is not None:
                        tally.latencies.append((r.time, r.latency))
                seen = len(client.received)
            how = rng.choice(["delete", "delete", "close", "vanish"])
            tally.leave[how] = tally.leave.get(how, 0) + 1
            if how == "delete":
                await client.request("DELETE", f"/sessions/{client.session_id}")
            elif how == "vanish":
                # Stop sending but keep the connection up: the idle timeout must end it.
                client.stop_sending()
                await asyncio.sleep(12.0)
            if avatar_id is not None and rng.random() < 0.5:
                status, _ = await client.request("DELETE", f"/avatars/{avatar_id}")
                if status not in (200, 404):  # 404: evicted meanwhile, which is allowed
                    tally.unexpected.append(f"delete avatar: {status}")
                avatar_id = None
        await asyncio.sleep(rng.uniform(0.2, 2.0))
    if avatar_id is not None:
        async with SoakClient(
            tally, url, frames, args.fps, token=args.token, client_id=client_id
        ) as c:
            await c.request("DELETE", f"/avatars/{avatar_id}")
    return tally


# -- the hostile client ---------------------------------------------------------------------------
# Every address and port below is on this machine (loopback); every loop ends by itself.


def _head(method: str, path: str, token: str | None, *lines: str) -> bytes:
    auth = [f"Authorization: Bearer {token}"] if token else []
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *auth, *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def _ssrc_flood(url: str, args: argparse.Namespace, frames: list, tally: Tally) -> str:
    """A real session whose peer sends SRTP on 400 SSRCs, then ends it: the DELETE must be
    answered (the teardown hung forever before issue 27's fix)."""
    client = SoakClient(tally, url, frames, args.fps, token=args.token, local_address="127.0.0.66")
    async with client:
        for _ in range(25):  # a free slot within 25 s, else this round goes without
            try:
                await client.connect()
                break
            except OfferRefused as exc:  # 503 full: the legitimate clients hold the slots
                refused = f"offer refused: {exc.status}"
                await asyncio.sleep(1.0)
        else:
            return refused
        await asyncio.wait_for(client.first_frame.wait(), 30)
        await client.call.send_on_unlisted_ssrcs(400)
        await asyncio.sleep(2.5)  # the server's RTCP reports go out every 0.5-1.5 s
        t0 = time.monotonic()
        status, _ = await client.request("DELETE", f"/sessions/{client.session_id}")
        return f"DELETE {status} in {time.monotonic() - t0:.1f} s"


async def _slow_uploads(port: int, token: str | None) -> list[str]:
    """Four uploads from one address, their bodies at 1 byte a second: the answers' status
    codes ('none': the server closed the connection without one)."""
    head = _head(
        "POST",
        "/avatars",
        token,
        "X-Iwarp-Client: trickle",
        "Content-Type: multipart/form-data; boundary=bb",
        "Content-Length: 100000",
    )
    connections = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.67", 0)
        )
        writer.write(head + b"-")
        connections.append((reader, writer))
    answers: dict[int, str] = {}
    for _ in range(30):  # seconds, at most
        for n, (reader, writer) in enumerate(connections):
            if n in answers:
                continue
            with contextlib.suppress(TimeoutError):
                line = await asyncio.wait_for(reader.readline(), 0.25)
                answers[n] = line.split(b" ")[1].decode() if line else "none"
                continue
            with contextlib.suppress(ConnectionError):
                writer.write(b"-")
        if len(answers) == len(connections):
            break
    for _reader, writer in connections:
        writer.close()
    return sorted(answers.get(n, "unanswered") for n in range(len(connections)))


async def _slow_headers(port: int, count: int = 20) -> float:
    """`count` connections sending a request head a byte a second: seconds until the server
    closed the last one (inf: one was still open after its 40-byte head)."""
    heads = (trickle_request_head(port, local_address="127.0.0.68") for _ in range(count))
    return max(await asyncio.gather(*heads))


async def _offers(url: str, token: str | None, sdps: list[str], address: str) -> list[int]:
    """Offers from `address`, each under a new client id: their status codes."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    statuses = []
    async with aiohttp.ClientSession(connector=connector, headers=auth) as http:
        for text in sdps:
            headers = {"X-Iwarp-Client": uuid.uuid4().hex}
            body = {"sdp": text, "type": "offer"}
            async with http.post(url + "/offer", json=body, headers=headers) as r:
                statuses.append(r.status)
    return statuses


async def _offer_sdp(candidates: list[str]) -> str:
    """A real aiortc video offer with `candidates` instead of its own (none: it never
    connects, and never learns that it cannot)."""
    pc = RTCPeerConnection(rtc.rtc_configuration())
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    text = pc.localDescription.sdp
    await pc.close()
    out = []
    for line in text.splitlines():
        if not line.startswith(("a=candidate:", "a=end-of-candidates")):
            out.append(line)
            if line.startswith("m="):
                out += candidates
    return "\r\n".join(out) + "\r\n"


async def hostile_loop(
    url: str, args: argparse.Namespace, frames: list, deadline: float, tally: Tally
) -> list[dict[str, Any]]:
    """A round of every hostile behaviour at once, every --hostile-every seconds; each round's
    answers, checked (a wrong one goes to tally.unexpected)."""
    port = int(url.rsplit(":", 1)[1])
    flood = [  # 600 ports of this machine that nobody listens on
        f"a=candidate:{n} 1 udp {2130706431 - n} 127.0.1.{1 + n // 200} {40000 + n} typ host"
        for n in range(600)
    ]
    rounds = []
    while time.monotonic() + 30 < deadline:
        started = time.monotonic()
        silent = await _offer_sdp([])
        ssrc, uploads, headers, candidates, silent_offers = await asyncio.gather(
            _ssrc_flood(url, args, frames, tally),
            _slow_uploads(port, args.token),
            _slow_headers(port),
            _offers(url, args.token, [await _offer_sdp(flood)], "127.0.0.69"),
            _offers(url, args.token, [silent] * 4, "127.0.0.70"),
        )
        tally.requests += 4 + 20 + 1 + 4
        result = {
            "t": round(started - (deadline - args.minutes * 60), 1),
            "ssrc_flood": ssrc,
            "slow_uploads": uploads,
            "slow_headers_closed_after_s": round(headers, 1),
            "candidate_flood": candidates,
            "never_connecting_offers": silent_offers,
        }
        rounds.append(result)
        problems = []
        if ssrc.startswith("DELETE") and not ssrc.startswith("DELETE 200"):
            problems.append("the SSRC flooder's DELETE")
        if uploads != ["408", "408", "429", "429"]:
            problems.append("slow uploads")
        if headers > 15:
            problems.append("slow headers")
        if candidates != [400]:
            problems.append("candidate flood")
        if silent_offers.count(200) > 2 or set(silent_offers) - {200, 429, 503}:
            problems.append("never-connecting offers")
        for problem in problems:
            tally.unexpected.append(f"hostile round: {problem}: {result}")
        await asyncio.sleep(max(0.0, started + args.hostile_every - time.monotonic()))
    return rounds


def _form(png: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", png, filename="soak.png", content_type="image/png")
    return form


# -- sampling and the report ----------------------------------------------------------------------


async def sampler(
    url: str, pid: int, token: str | None, every: float, samples: list[dict[str, Any]], t0: float
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            sample: dict[str, Any] = {"t": round(time.monotonic() - t0, 1), **process_stats(pid)}
            try:
                async with http.get(url + "/healthz") as r:
                    sample["sessions"] = (await r.json())["sessions"]
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                match = re.search(r"^iwarp_avatars (\S+)", text, re.M)
                sample["avatars"] = int(float(match.group(1))) if match else None
            except (aiohttp.ClientError, KeyError, ValueError) as exc:
                sample["error"] = str(exc)
            samples.append(sample)
            await asyncio.sleep(every)


def report(
    samples: list[dict[str, Any]],
    tallies: list[Tally],
    t0: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    # While the clients run, after the warm-up; the samples after they left are reported apart.
    running = [s for s in samples if s["t"] <= args.minutes * 60]
    steady = [s for s in running if s["t"] >= args.warmup] or running or samples
    tenth = max(1, len(steady) // 10)
    head, tail = steady[:tenth], steady[-tenth:]
    latencies = [(t - t0, rtt) for tally in tallies for t, rtt in tally.latencies]

    def window(part: list[dict[str, Any]]) -> dict[str, Any]:
        lo, hi = part[0]["t"], part[-1]["t"] + args.sample_every
        rtts = [rtt for t, rtt in latencies if lo <= t < hi]
        return {
            "t_s": [lo, part[-1]["t"]],
            "rss_mib": round(float(np.mean([s["rss_mib"] for s in part])), 1),
            "fds": round(float(np.mean([s["fds"] for s in part])), 1),
            "threads": round(float(np.mean([s["threads"] for s in part])), 1),
            "sessions": round(float(np.mean([s.get("sessions") or 0 for s in part])), 2),
            "rtt_ms": latency_summary_ms(rtts),
            "frames": len(rtts),
        }

    t = np.array([s["t"] for s in steady]) / 3600.0
    rss = np.array([s["rss_mib"] for s in steady])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(steady) >= 3 else None
    # Allocator pools and caches fill during the first minutes; the second half shows whether
    # memory keeps growing once they have.
    half = len(steady) // 2
    slope_late = float(np.polyfit(t[half:], rss[half:], 1)[0]) if len(steady) - half >= 3 else None
    fds = np.array([s["fds"] for s in steady])
    threads = np.array([s["threads"] for s in steady])
    total = Tally()
    for tally in tallies:
        total.sessions += tally.sessions
        total.uploads += tally.uploads
        total.bad_requests += tally.bad_requests
        total.unexpected += tally.unexpected
        total.requests += tally.requests
        total.unanswered += tally.unanswered
        total.connect_s += tally.connect_s
        for key, n in tally.refused.items():
            total.refused[key] = total.refused.get(key, 0) + n
        for key, n in tally.leave.items():
            total.leave[key] = total.leave.get(key, 0) + n
    return {
        "clients": args.clients,
        "minutes": args.minutes,
        "fps_sent": args.fps,
        "size": args.size,
        "warmup_s": args.warmup,
        "start": window(head),
        "end": window(tail),
        "rss_slope_mib_per_hour": round(slope, 1) if slope is not None else None,
        "rss_slope_second_half_mib_per_hour": round(slope_late, 1)
        if slope_late is not None
        else None,
        "rss_min_max_mib": [float(rss.min()), float(rss.max())],
        "fds_min_max": [int(fds.min()), int(fds.max())],
        "threads_min_max": [int(threads.min()), int(threads.max())],
        "rtt_all_ms": latency_summary_ms([rtt for _, rtt in latencies]),
        "sessions": total.sessions,
        "offers_refused": total.refused,
        "ended_by": total.leave,
        "uploads": total.uploads,
        "bad_requests": total.bad_requests,
        "unexpected_answers": total.unexpected[:20],
        "unexpected_count": len(total.unexpected),
        "requests": total.requests,
        "unanswered": total.unanswered[:20],
        "unanswered_count": len(total.unanswered),
        "connect_to_first_frame_s_p50": round(float(np.median(total.connect_s)), 2)
        if total.connect_s
        else None,
    }


def _line(sample: dict[str, Any]) -> str:
    return (
        f"t={sample['t']:6.0f} s  rss {sample['rss_mib']:7.1f} MiB  fds {sample['fds']:4d}  "
        f"threads {sample['threads']:3d}  sessions {sample.get('sessions')}  "
        f"avatars {sample.get('avatars')}"
    )


async def soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    rtc.configure(loopback_only=True)
    clip = args.clip or default_driving_clip()
    frames, _ = load_frames(clip, args.size, max_frames=150)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    samples: list[dict[str, Any]] = []
    sampling = asyncio.create_task(
        sampler(server.url, server.pid, args.token, args.sample_every, samples, t0)
    )
    printed = 0

    async def progress() -> None:
        nonlocal printed
        while True:
            await asyncio.sleep(1.0)
            for sample in samples[printed:]:
                if not args.json:
                    print(_line(sample), flush=True)
            printed = len(samples)

    printer = asyncio.create_task(progress())
    try:
        hostile_tally = Tally()
        hostile = (
            hostile_loop(server.url, args, frames, deadline, hostile_tally)
            if args.hostile
            else asyncio.sleep(0, result=[])
        )
        *tallies, rounds = await asyncio.gather(
            *(client_loop(i, server.url, args, frames, deadline) for i in range(args.clients)),
            hostile,
        )
        # A last sample once every client is gone: sessions must be back to 0.
        await asyncio.sleep(args.sample_every)
    finally:
        sampling.cancel()
        printer.cancel()
        await asyncio.gather(sampling, printer, return_exceptions=True)
    result = report(samples, [*tallies, hostile_tally], t0, args)
    result["hostile_rounds"] = rounds
    # The last sample, taken after every client left: sessions back to 0, what remains.
    result["after_clients_left"] = samples[-1] if samples else None
    result["clip"] = str(clip)
    result["samples"] = samples
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = (
        Server(args.url.rstrip("/"), args.pid)
        if args.url
        else start_server(args.serve_arg, args.token)
    )
    try:
        result = asyncio.run(soak(args, server))
    finally:
        stopped = stop_server(server) if server.proc is not None else None
    if stopped is not None:
        result["server_stop"] = stopped
    with contextlib.suppress(OSError):
        result["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    result["load_average"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "samples"}
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("start", "end"):
            w = summary[key]
            print(
                f"{key:5s} (t {w['t_s'][0]:.0f}-{w['t_s'][1]:.0f} s): rss {w['rss_mib']} MiB, "
                f"fds {w['fds']}, threads {w['threads']}, sessions {w['sessions']}, "
                f"round trip p50/p95 {w['rtt_ms']['p50']}/{w['rtt_ms']['p95']} ms "
                f"({w['frames']} frames)"
            )
        print(
            f"RSS slope after warm-up: {summary['rss_slope_mib_per_hour']} MiB/hour "
            f"(second half: {summary['rss_slope_second_half_mib_per_hour']} MiB/hour)"
        )
        print(json.dumps({k: v for k, v in summary.items() if k not in ("start", "end")}))
    return 1 if result["unexpected_count"] or result["unanswered_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
