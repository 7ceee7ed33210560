"""`iwarp serve` against hostile and careless clients: raw header bytes, concurrent uploads,
avatar caps, upload memory, malformed bodies, offers that must not hold slots, type checks, and
requests from other web sites. A real server on a loopback port (the 64x64 random-init model on
the torch backend), real sockets; raw HTTP where aiohttp's client would refuse to send it."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

import aiohttp
from PIL import Image
from test_streaming import REPO_ROOT, _form, _png, raw_exchange, run, running

from iwarp.media import read_image
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime.animator import Animator
from iwarp.streaming.client import StreamingClient
from iwarp.streaming.metrics import parse_samples
from iwarp.streaming.server import ServerConfig, avatar_bytes, owner_key
from iwarp.streaming.session import SessionLimits
from iwarp.streaming.uploads import UploadLimits

pytestmark = pytest.mark.usefixtures("no_uploads_left")


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Sends `request` as is (Connection: close) and returns the status and the body."""
    status, _, body = await raw_exchange(url, request)
    return status, body


def _get(path: str, *headers: bytes) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _post(url: str, path: str, body: bytes, content_type: str, **headers: str):
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, data=body, headers={"Content-Type": content_type, **headers}) as r,
    ):
        return r.status, await r.json()


# -- 1. raw bytes in headers ---------------------------------------------------------------------


def test_raw_bytes_in_auth_and_client_headers_are_401_and_400(small_animator, caplog):
    async def scenario():
        async with running(small_animator, ServerConfig(token="t0ken")) as (url, _api):
            status, body = await _raw(url, _get("/healthz", b"Authorization: Bearer \xff\xfe"))
            assert status == 401 and b"token" in body
            status, body = await _raw(
                url, _get("/healthz", b"Authorization: Bearer t0ken", b"X-Iwarp-Client: a\xffb")
            )
            assert status == 400 and b"X-Iwarp-Client" in body
        async with running(small_animator, ServerConfig()) as (url, _api):
            status, body = await _raw(url, _get("/avatars", b"X-Iwarp-Client: \xff"))
            assert status == 400

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- 2, 3. avatar limits -------------------------------------------------------------------------


def test_concurrent_uploads_cannot_overshoot_the_per_owner_limit(small_animator, face_png):
    async def scenario():
        config = ServerConfig(max_avatars_per_owner=3)
        async with (
            running(small_animator, config) as (url, _api),
            aiohttp.ClientSession(headers={"X-Iwarp-Client": "greedy"}) as http,
        ):

            async def upload() -> int:
                async with http.post(url + "/avatars", data=_form(("f.png", face_png))) as r:
                    return r.status

            assert await upload() == 201
            statuses = await asyncio.gather(*(upload() for _ in range(6)))
            assert sorted(statuses) == [201, 201, 409, 409, 409, 409], statuses
            assert sum(1 for r in small_animator.avatars() if r.owner) == 3

    run(scenario())


def test_global_avatar_caps_evict_only_the_uploaders_own_unused_avatars(
    small_animator, face_png, camera
):
    """Past the caps an upload makes room among its own owner's avatars (least recently used,
    not in a session), never with someone else's: a stranger gets 503 (issue 27: client ids
    are the client's choice, and rotating them evicted everyone's avatars)."""

    async def scenario():
        config = ServerConfig(max_avatars=3)
        async with running(small_animator, config) as (url, api):
            clients = [StreamingClient(url, camera, 30, client_id=f"c{i}") for i in range(3)]
            for c in clients:
                await c.__aenter__()
            try:

                async def upload(client: StreamingClient) -> tuple[int, dict]:
                    return await client.request("POST", "/avatars", data=_form(("f.png", face_png)))

                def kept() -> set[str]:
                    return {r.avatar_id for r in small_animator.avatars() if r.owner}

                ids = []
                for client in (clients[0], clients[0], clients[1]):
                    status, body = await upload(client)
                    assert status == 201, body
                    ids.append(body["avatar_id"])
                # A stranger finds the server full: refused, nobody's avatar evicted.
                status, body = await upload(clients[2])
                assert status == 503 and "none of them yours" in body["error"], body
                assert kept() == set(ids)
                # Client 0 previews its first avatar: its second is its least recently used,
                # and its next upload replaces that one.
                assert (await clients[0].request("GET", f"/avatars/{ids[0]}/preview"))[0] == 200
                status, body = await upload(clients[0])
                assert status == 201, body
                assert kept() == {ids[0], ids[2], body["avatar_id"]}
                assert (await clients[0].request("GET", f"/avatars/{ids[1]}/preview"))[0] == 404

                # The byte cap, the same way: room for 3.5 avatars, client 1 replaces its own.
                size = avatar_bytes(small_animator.get(ids[0]))
                api.config.max_avatars = 10
                api.config.max_avatar_bytes = 3 * size + size // 2
                status, body = await upload(clients[1])
                assert status == 201, body
                assert ids[2] not in kept() and ids[0] in kept()

                # An avatar a session uses is never evicted, not even for its own owner.
                await clients[1].connect(avatar_id=body["avatar_id"])
                status, refused = await upload(clients[1])
                assert status == 503, refused
                assert body["avatar_id"] in kept() and len(kept()) == 3
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)

    run(scenario())


def test_store_keeps_a_bounded_copy_of_a_large_photo(checkpoint, tmp_path):
    store = tmp_path / "store"
    animator = Animator.from_pretrained(
        "torch", checkpoint, device="cpu", threads=1, show_progress=False, store_dir=store
    )
    animator.add_avatar([DEFAULT_AVATAR], avatar_id="default", name="default")
    big = Image.fromarray(read_image(DEFAULT_AVATAR)).resize((3600, 3600), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    limits = UploadLimits()

    async def scenario():
        async with (
            running(animator, ServerConfig()) as (url, _api),
            aiohttp.ClientSession(headers={"X-Iwarp-Client": "me"}) as http,
            http.post(url + "/avatars", data=_form(("big.jpg", buf.getvalue()))) as r,
        ):
            return r.status, await r.json()

    status, body = run(scenario())
    assert status == 201, body
    stored = store / body["avatar_id"] / "source_0.png"
    with Image.open(stored) as im:
        assert max(im.size) <= limits.max_side, im.size
    assert stored.stat().st_size < 5 * 2**20


# -- 4. upload memory ----------------------------------------------------------------------------


def _multipart(boundary: str, *files: tuple[str, bytes]) -> bytes:
    out = b""
    for name, data in files:
        out += (
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def _upload_head(length: int, boundary: str) -> bytes:
    return (
        "POST /avatars HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Iwarp-Client: x\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_upload_parts_are_streamed_to_disk_not_held_in_memory(small_animator, tmp_path):
    """A 7 MB photo, sent with sendfile (the client allocates nothing), refused only after
    the whole part was read (its header says 2.2 MP, over this server's 1 MP): the
    server's Python allocations stay far below the photo's size."""
    noise = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
    body = _multipart("b0undary", ("noise.png", _png(noise)))
    assert len(body) > 6 * 2**20
    body_file = tmp_path / "body"
    body_file.write_bytes(_upload_head(len(body), "b0undary") + body)
    del body, noise
    limits = UploadLimits(max_bytes=8 * 2**20, max_pixels=1_000_000)

    def send(port: int) -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", port)) as sock, body_file.open("rb") as f:
            sock.sendfile(f)
            return b"".join(iter(lambda: sock.recv(65536), b""))

    async def scenario():
        async with running(small_animator, ServerConfig(uploads=limits)) as (url, _api):
            tracemalloc.start()
            try:
                answer = await asyncio.to_thread(send, _address(url)[1])
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return answer, peak

    answer, peak = run(scenario())
    assert b" 413 " in answer.split(b"\r\n", 1)[0] and b"megapixels" in answer, answer[:300]
    assert peak < 2 * 2**20, f"peak Python allocations {peak / 2**20:.1f} MiB during the upload"


def test_pixel_budget_per_upload_and_uploads_in_flight(small_animator, face_png, caplog):
    # All from one address: its own cap (test_serve_limits.py) is raised to test the global one.
    limits = UploadLimits(
        max_pixels=200_000, max_request_pixels=300_000, max_in_flight=2, max_in_flight_per_address=4
    )
    photo = _png(np.zeros((400, 400, 3), np.uint8))  # 0.16 MP each: two are over the budget

    async def scenario():
        async with running(small_animator, ServerConfig(uploads=limits)) as (url, _api):
            status, body = await _post(
                url,
                "/avatars",
                _multipart("bb", ("a.png", photo), ("b.png", photo)),
                "multipart/form-data; boundary=bb",
            )
            assert status == 413 and "add up to" in body["error"], body

            # Two uploads that stall halfway fill the in-flight slots: a third is refused at
            # once, and accepted after they are gone.
            full = _multipart("bb", ("f.png", face_png))
            stalled = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection(*_address(url))
                writer.write(_upload_head(len(full), "bb") + full[: len(full) // 2])
                await writer.drain()
                stalled.append((reader, writer))
            await asyncio.sleep(0.3)
            form = _form(("f.png", face_png))
            async with aiohttp.ClientSession() as http, http.post(url + "/avatars", data=form) as r:
                assert r.status == 503 and "in progress" in (await r.json())["error"]
            for _reader, writer in stalled:
                writer.close()
            await asyncio.sleep(0.3)
            form = _form(("f.png", face_png))
            async with aiohttp.ClientSession() as http, http.post(url + "/avatars", data=form) as r:
                assert r.status == 201, await r.text()

    run(scenario())
    # The stalled clients that went away are not the server's errors.
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


# -- 5, 6, 7. malformed bodies -------------------------------------------------------------------


def test_json_bodies_that_break_the_parser_are_400(small_animator):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            deep = b"[" * 100_000 + b"]" * 100_000
            status, body = await _post(url, "/offer", deep, "application/json")
            assert status == 400 and "JSON" in body["error"], body
            status, body = await _post(url, "/offer", b"{}", "application/json; charset=nope")
            assert status == 400 and "JSON" in body["error"], body
            status, body = await _post(url, "/offer", b"\xff\xfe{", "application/json")
            assert status == 400, body

    run(scenario())


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",  # no boundary
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "x" * 200,
        'multipart/form-data; boundary="unterminated',
    ],
)
def test_malformed_multipart_is_400(small_animator, face_png, content_type):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            body = _multipart("bb", ("f.png", face_png))
            return await _post(url, "/avatars", body, content_type)

    status, body = run(scenario())
    assert status == 400 and "multipart" in body["error"], body


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: a decompression bomb's
    signature without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_pillow_decompression_bomb_is_413(small_animator):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            body = _multipart("bb", ("bomb.png", _png_header_only(20_000, 10_000)))  # 200 MP
            return await _post(url, "/avatars", body, "multipart/form-data; boundary=bb")

    status, body = run(scenario())
    assert status == 413 and "pixels" in body["error"], body


# -- 8, 9, 10. offers and sessions ---------------------------------------------------------------


def _audio_only_offer_sdp() -> str:
    """A well-formed offer with no video: aiortc sets it up before the server can tell."""
    from aiortc import RTCPeerConnection

    from iwarp.streaming import rtc

    async def make() -> str:
        pc = RTCPeerConnection(rtc.rtc_configuration())
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return run(make())


def test_bad_offers_hold_no_slot_and_one_client_cannot_take_every_slot(
    small_animator, camera, caplog
):
    audio_only = _audio_only_offer_sdp()

    async def scenario():
        config = ServerConfig(limits=SessionLimits(max_sessions=2, max_per_client=1))
        async with running(small_animator, config) as (url, api):
            stop = asyncio.Event()

            async def flood() -> None:
                # Offers that look like video offers but fail in aiortc (no ICE credentials),
                # and well-formed audio-only ones that aiortc would set up before they fail.
                bad = [audio_only, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=video 9 RTP/AVP 9\r\n"]
                async with aiohttp.ClientSession() as http:
                    for n in itertools.count():
                        if stop.is_set():
                            break
                        offer = {"sdp": bad[n % 2], "type": "offer"}
                        async with http.post(url + "/offer", json=offer) as r:
                            assert r.status == 400

            flooders = [asyncio.create_task(flood()) for _ in range(6)]
            await asyncio.sleep(0.2)
            try:
                flooder = owner_key(None, "")
                for attempt in range(5):  # a good offer at several moments of the flood
                    async with StreamingClient(url, camera, 30, client_id=f"good{attempt}") as c:
                        await c.connect()
                        status, _ = await c.request("DELETE", f"/sessions/{c.session_id}")
                        assert status == 200
                    assert all(s.owner == flooder for s in api.registry.sessions.values())
            finally:
                stop.set()
                await asyncio.gather(*flooders)
            rejected = parse_samples(api.registry.metrics.render())["iwarp_sessions_rejected_total"]
            assert rejected == 0

            # One client holds its one session; its second offer is 429, another client's 200.
            async with (
                StreamingClient(url, camera, 30, client_id="alice") as alice,
                StreamingClient(url, camera, 30, client_id="alice") as alice2,
                StreamingClient(url, camera, 30, client_id="bob") as bob,
            ):
                await alice.connect()
                with pytest.raises(Exception, match="429"):
                    await alice2.connect()
                await bob.connect()

                # 10. JSON types are checked: "false" is not false.
                status, body = await bob.request(
                    "POST", f"/sessions/{bob.session_id}", json={"neutral": "false"}
                )
                assert status == 400 and "true or false" in body["error"], body
                assert (await bob.session_info())["neutral"] is False

    with caplog.at_level(logging.INFO, logger="iwarp.streaming"):
        run(scenario(), timeout=120)
    # A bad offer is refused before a session (and its slot) exists: none was set up and torn
    # down again, which is what registering first and parsing after did.
    assert not [r for r in caplog.records if "setup failed" in r.getMessage()]


@pytest.mark.parametrize(
    ("sdp", "reason"),
    [
        ("v=0\r\nm=video 9\r\n", "media line"),
        ("v=0\r\nm=video 9 RTP/AVP 9\r\nc=IN\r\n", "AssertionError"),
        ("v=0\r\nm=video 9 RTP/AVP 9\r\na=rtpmap:9\r\n", "unpack"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=video 9 RTP/AVP 9\r\n", "ICE"),
    ],
)
def test_malformed_offer_errors_give_a_reason(small_animator, sdp, reason):
    async def scenario():
        async with (
            running(small_animator, ServerConfig()) as (url, api),
            aiohttp.ClientSession() as http,
            http.post(url + "/offer", json={"sdp": sdp, "type": "offer"}) as r,
        ):
            return r.status, await r.json(), api.registry.count

    status, body, count = run(scenario())
    assert status == 400 and reason in body["error"], body
    assert not body["error"].rstrip().endswith(":"), body
    assert count == 0


def test_offer_fields_must_have_json_types(small_animator):
    async def scenario():
        async with (
            running(small_animator, ServerConfig()) as (url, _api),
            aiohttp.ClientSession() as http,
        ):
            offer = {"sdp": "v=0\r\n", "type": "offer", "echo_id": "yes"}
            async with http.post(url + "/offer", json=offer) as r:
                return r.status, await r.json()

    status, body = run(scenario())
    assert status == 400 and "echo_id" in body["error"], body


# -- 11. other web sites -------------------------------------------------------------------------


def test_foreign_origins_unknown_hosts_and_text_plain_are_refused(small_animator, face_png):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            own = url  # http://127.0.0.1:PORT, what the page sends as its Origin
            offer = b'{"sdp": "v=0", "type": "offer"}'
            evil = {"Origin": "http://evil.example"}
            status, body = await _post(url, "/offer", offer, "text/plain", Origin=own)
            assert status == 415 and "application/json" in body["error"], body
            status, body = await _post(url, "/offer", offer, "application/json", **evil)
            assert status == 403 and "other web sites" in body["error"], body
            status, body = await _post(
                url,
                "/avatars",
                _multipart("bb", ("f.png", face_png)),
                "multipart/form-data; boundary=bb",
                **evil,
            )
            assert status == 403, body
            assert not [r for r in small_animator.avatars() if r.owner]
            status, body = await _raw(url, _get("/avatars", b"Origin: null"))
            assert status == 403
            # DNS rebinding: evil.example resolved to 127.0.0.1, the Host header says so.
            status, body = await _raw(
                url, b"GET /avatars HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            )
            assert status == 403 and b"allow-host" in body
            # The page's own requests pass: same origin, IP or localhost Host, JSON.
            for host in (b"127.0.0.1:8080", b"localhost:8080", b"[::1]:8080"):
                status, _ = await _raw(
                    url,
                    b"GET /avatars HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
                )
                assert status == 200, host
            status, body = await _post(url, "/offer", offer, "application/json", Origin=own)
            assert status == 400 and "video" in body["error"], body  # past the origin check

        config = ServerConfig(allow_origins=("https://app.example",), allow_hosts=("iwarp.lan",))
        async with running(small_animator, config) as (url, _api):
            status, body = await _post(
                url, "/offer", offer, "application/json", Origin="https://app.example"
            )
            assert status == 400 and "video" in body["error"], body
            for host in (b"iwarp.lan", b"app.example"):
                status, _ = await _raw(
                    url,
                    b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
                )
                assert status == 200, host

    run(scenario())


# -- shutdown ------------------------------------------------------------------------------------

SERVE_SCRIPT = textwrap.dedent(
    """
    import asyncio
    from aiohttp import web
    from iwarp.streaming.server import _run
    asyncio.run(_run(web.Application(), "127.0.0.1", 0, None, False))
    """
)


def test_sigterm_stops_the_server_with_a_line_saying_so():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        first = proc.stdout.readline()
        assert "open http://127.0.0.1:" in first
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "SIGTERM received, stopping" in rest, rest


# -- native resources ----------------------------------------------------------------------------


def test_ended_sessions_leave_no_codec_threads_behind(small_animator, camera):
    """aiortc's peer connections sit in reference cycles that hold native VP8 encoder/decoder
    threads: without a collection after each session they pile up (seen: +2 threads and
    ~5 MB RSS per session in a soak). Counted as OS threads of this process (server and
    clients both live here)."""

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    async def one_session(url: str, api) -> None:
        async with StreamingClient(url, camera, 30) as client:
            await client.connect()
            await asyncio.wait_for(client.first_frame.wait(), 20)
            status, _ = await client.request("DELETE", f"/sessions/{client.session_id}")
            assert status == 200
        assert api.registry.count == 0

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, api):
            await one_session(url, api)  # thread pools and codecs started once
            await asyncio.sleep(1.5)
            baseline = os_threads()
            for _ in range(8):
                await one_session(url, api)
            await asyncio.sleep(1.5)  # the collection runs 1 s after a session closed
            return baseline, os_threads()

    baseline, after = run(scenario())
    assert after <= baseline + 2, f"OS threads {baseline} -> {after} after 8 sessions"
