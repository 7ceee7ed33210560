"""`iwarp serve` against clients that try to take more than their share: a peer that sends
on hundreds of SSRCs, strangers evicting other people's avatars, a DELETE racing an upload,
slow uploads and slow headers, offers that never connect and candidate floods (issue 27,
defects 1-5). A real server on a loopback port, real aiortc peers, aiohttp clients and raw
sockets; distinct clients come from distinct loopback addresses (127.0.0.x), as distinct
machines would. Every address and port used is on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import time
import uuid

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

import aiohttp
from aiortc import RTCPeerConnection, rtcdtlstransport
from PIL import Image
from test_streaming import _form, run, running

from iwarp.benchmarks.slow_clients import trickle_request_head
from iwarp.media import read_image
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime.animator import Animator
from iwarp.runtime.avatar_store import AvatarStore
from iwarp.streaming import rtc, rtcguard
from iwarp.streaming.client import StreamingClient
from iwarp.streaming.server import ServerConfig, owner_key
from iwarp.streaming.session import SessionLimits

pytestmark = pytest.mark.usefixtures("no_uploads_left")


def _http(address: str, client_id: str | None = None) -> aiohttp.ClientSession:
    """An HTTP client whose requests come from `address` (a loopback address)."""
    headers = {"X-Iwarp-Client": client_id} if client_id else None
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    return aiohttp.ClientSession(connector=connector, headers=headers)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _upload(http: aiohttp.ClientSession, url: str, photo: bytes, **headers: str):
    form = _form(("face.png", photo))
    async with http.post(url + "/avatars", data=form, headers=headers) as r:
        return r.status, await r.json()


async def _offer_sdp(candidates: list[str] | None = None) -> str:
    """A real aiortc video offer whose own candidates are replaced by `candidates` (none: an
    offer that can never connect, and never learns that it cannot)."""
    pc = RTCPeerConnection(rtc.rtc_configuration())
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    text = pc.localDescription.sdp
    await pc.close()
    lines = [
        line
        for line in text.splitlines()
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    ]
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.startswith("m=") and candidates:
            out += candidates
    return "\r\n".join(out) + "\r\n"


# -- 1. a peer sending on hundreds of SSRCs ------------------------------------------------------


@pytest.mark.parametrize("router", ["negotiated", "stock"])
def test_a_peer_sending_on_hundreds_of_ssrcs_cannot_hang_the_session_teardown(
    small_animator, camera, caplog, router
):
    """aiortc's receiver learns every SSRC that carries a known payload type, and its RTCP task
    dies packing a receiver report with more than 63 of them; `receiver.stop()` then waits for
    it forever, so `pc.close()` never returned and neither did this DELETE. The server's router
    ignores SSRCs the offer did not list; with aiortc's stock router (the hang happens for
    real) the bounded close still finishes the teardown."""

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, api):
            if router == "stock":
                rtcdtlstransport.RtpRouter = rtcguard._StockRouter
            async with StreamingClient(url, camera, 30) as client:
                await client.connect()
                await asyncio.wait_for(client.first_frame.wait(), 20)
                # SRTP, authenticated: a real peer of this session.
                await client.call.send_on_unlisted_ssrcs(400)
                await asyncio.sleep(2.5)  # the server's RTCP loop runs every 0.5-1.5 s
                session = api.registry.sessions[client.session_id]
                server_router = session.pc.getReceivers()[0].transport._rtp_router
                if router == "negotiated":
                    assert server_router.dropped >= 398, server_router.dropped
                t0 = time.monotonic()
                try:
                    status, _ = await asyncio.wait_for(
                        client.request("DELETE", f"/sessions/{client.session_id}"), 15
                    )
                except TimeoutError:
                    raise AssertionError("DELETE /sessions did not answer in 15 s") from None
                assert status == 200
                assert time.monotonic() - t0 < 10
                assert session.closed and api.registry.count == 0

    try:
        with caplog.at_level(logging.INFO, logger="iwarp.streaming"):
            run(scenario(), timeout=90)
    finally:
        rtcguard.install()
    messages = [r.getMessage() for r in caplog.records]
    assert any("closed: closed by the client" in m for m in messages)
    forced = any("took over" in m for m in messages)
    assert forced == (router == "stock"), messages


# -- 2. strangers evicting other owners' avatars -------------------------------------------------


def test_strangers_cannot_evict_or_delete_other_owners_avatars(checkpoint, face_png, tmp_path):
    store = tmp_path / "store"
    animator = Animator.from_pretrained(
        "torch", checkpoint, device="cpu", threads=1, show_progress=False, store_dir=store
    )
    animator.add_avatar([DEFAULT_AVATAR], avatar_id="default", name="default")

    async def scenario():
        async with running(animator, ServerConfig(max_avatars=6)) as (url, api):
            api.config.max_avatars_per_address = 3
            async with _http("127.0.0.2", "victim") as victim:
                mine = []
                for _ in range(2):
                    status, body = await _upload(victim, url, face_png)
                    assert status == 201, body
                    mine.append(body["avatar_id"])
                # One address, a new client id per upload: at most 3 avatars from it.
                attacks = []
                async with _http("127.0.0.3") as attacker:
                    for n in range(6):
                        status, body = await _upload(
                            attacker, url, face_png, **{"X-Iwarp-Client": f"x{n}"}
                        )
                        attacks.append(status)
                # Another address finds the server full: refused, nobody evicted.
                async with _http("127.0.0.4") as second:
                    others = [
                        (await _upload(second, url, face_png, **{"X-Iwarp-Client": f"y{n}"}))[0]
                        for n in range(3)
                    ]
                async with victim.get(url + "/avatars") as r:
                    listed = {a["avatar_id"] for a in (await r.json())["avatars"]}
                assert set(mine) <= listed, "the victim's avatars were evicted"
                assert all((store / avatar_id / "meta.json").is_file() for avatar_id in mine)
                assert attacks == [201, 201, 201, 409, 409, 409], attacks
                assert others == [201, 503, 503], others
                # The victim's own upload makes room among the victim's own avatars.
                status, body = await _upload(victim, url, face_png)
                assert status == 201, body
                victim_key = owner_key(None, "victim")
                owned = [r.avatar_id for r in animator.avatars() if r.owner == victim_key]
                assert len(owned) == 2 and body["avatar_id"] in owned
                assert not (store / mine[0]).exists()  # the least recently used of its own

    run(scenario(), timeout=120)


# -- 3. a DELETE racing an upload ----------------------------------------------------------------


def test_a_delete_that_answered_200_leaves_no_photo_on_disk(checkpoint, tmp_path):
    """The avatar was registered before its photos were written: a DELETE in between answered
    200, then the photos were written, and came back after a restart."""
    store = tmp_path / "store"
    animator = Animator.from_pretrained(
        "torch", checkpoint, device="cpu", threads=1, show_progress=False, store_dir=store
    )
    animator.add_avatar([DEFAULT_AVATAR], avatar_id="default", name="default")
    # A large photo: writing its 1536 px copy to the store takes a while.
    big = Image.fromarray(read_image(DEFAULT_AVATAR)).resize((1536, 1536))
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=1)
    photo = buf.getvalue()

    async def attempt(url: str, http: aiohttp.ClientSession) -> tuple:
        """(avatar id, DELETE's status, the upload's status and body)."""
        upload = asyncio.ensure_future(_upload(http, url, photo))
        deleted: tuple[str | None, int | None] = (None, None)
        while not upload.done():
            async with http.get(url + "/avatars") as r:
                new = [a["avatar_id"] for a in (await r.json())["avatars"] if not a["public"]]
            if new:
                async with http.delete(url + f"/avatars/{new[0]}") as r:
                    deleted = (new[0], r.status)
                break
            await asyncio.sleep(0.002)
        status, body = await upload
        return (*deleted, status, body)

    async def scenario():
        results = []
        async with (
            running(animator, ServerConfig()) as (url, _api),
            aiohttp.ClientSession(headers={"X-Iwarp-Client": "me"}) as http,
        ):
            for _ in range(3):
                results.append(await attempt(url, http))
                await asyncio.sleep(0.3)
        return results

    results = run(scenario(), timeout=120)
    deleted = [avatar_id for avatar_id, status, _, _ in results if status == 200]
    assert deleted, f"no DELETE got through: {results}"
    for avatar_id in deleted:
        assert not (store / avatar_id).exists(), f"{avatar_id}'s photos are still on disk"
        assert avatar_id not in AvatarStore(store).ids()  # what a restart would load
    # The upload either finished first (201) or says its avatar was deleted meanwhile (409).
    assert all(status in (201, 409) for *_, status, _ in results), results


# -- 4. slow clients -----------------------------------------------------------------------------


def test_slow_uploads_from_one_address_leave_upload_slots_to_others(small_animator, face_png):
    """Four uploads that trickle their bodies took every upload slot: everyone else got 503."""

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            stalled = []
            answers = []
            body = b"--bb\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
            for n in range(4):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", _port(url), local_addr=("127.0.0.2", 0)
                )
                writer.write(
                    b"POST /avatars HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + f"X-Iwarp-Client: slow{n}\r\n".encode()
                    + b"Content-Type: multipart/form-data; boundary=bb\r\n"
                    + b"Content-Length: 100000\r\n\r\n"
                    + body
                )
                await writer.drain()
                stalled.append(writer)
                with contextlib.suppress(TimeoutError):
                    answers.append(await asyncio.wait_for(reader.read(200), 0.5))
            try:
                refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
                assert len(refused) == 2, answers
                async with _http("127.0.0.3", "someone") as http:
                    status, body = await _upload(http, url, face_png)
                assert status == 201, body
            finally:
                for writer in stalled:
                    writer.close()

    run(scenario())


def test_slow_headers_and_slow_bodies_are_cut_off(small_animator):
    """40 connections that sent their headers a byte at a time were never closed, and a body
    at 1 byte per second held its upload slot for as long as it lasted. With the defaults
    (10 s for a request's head; a body at 16 KiB/s after its first 10 s) both end."""

    async def trickle_body(port: int) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        writer.write(
            b"POST /avatars HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=bb\r\nContent-Length: 5000\r\n\r\n"
        )
        try:
            for _ in range(40):
                writer.write(b"-")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(400), 1.0)
                    return time.monotonic() - t0, answer
            return float("inf"), b""
        except ConnectionError:
            return time.monotonic() - t0, b""
        finally:
            writer.close()

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            port = _port(url)
            heads = asyncio.gather(*(trickle_request_head(port, padding=16) for _ in range(40)))
            body_seconds, answer = await trickle_body(port)
            return await heads, body_seconds, answer

    head_seconds, body_seconds, answer = run(scenario(), timeout=90)
    assert max(head_seconds) < 14, f"slow-header connections open for {max(head_seconds)} s"
    assert body_seconds < 14 and answer.startswith(b"HTTP/1.1 408"), (body_seconds, answer)
    assert b"too slowly" in answer, answer


# -- 5. offers that never connect, candidate floods ----------------------------------------------


def test_offers_that_never_connect_free_their_slots_and_one_address_holds_two(small_animator):
    """40 offers that never connected held every slot 30 s each, whatever their client ids."""

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, api):
            offer = {"sdp": await _offer_sdp(), "type": "offer"}
            statuses = []
            async with _http("127.0.0.2") as attacker:
                for n in range(4):
                    headers = {"X-Iwarp-Client": f"rotating{n}"}
                    async with attacker.post(url + "/offer", json=offer, headers=headers) as r:
                        statuses.append(r.status)
            assert statuses == [200, 200, 429, 429], statuses
            async with (
                _http("127.0.0.3", "someone") as other,
                other.post(url + "/offer", json=offer) as r,
            ):
                assert r.status == 200, await r.text()
            t0 = time.monotonic()
            while api.registry.count and time.monotonic() - t0 < 15:
                await asyncio.sleep(0.2)
            return api.registry.count, time.monotonic() - t0

    count, seconds = run(scenario(), timeout=60)
    assert count == 0 and seconds < 12, f"{count} sessions still held after {seconds:.0f} s"


def test_an_offer_with_hundreds_of_candidates_sends_no_stun_to_them(small_animator):
    """An offer with 600 candidates made the server send STUN to every one of them."""
    listeners = []
    for n in range(60):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.0.{2 + n // 20}", 0))
        sock.setblocking(False)
        listeners.append(sock)
    targets = [s.getsockname() for s in listeners]
    # Ports nobody listens on fill the rest: loopback, so nothing leaves this machine.
    targets += [(f"127.0.1.{1 + n // 200}", 40000 + n) for n in range(540)]
    candidates = [
        f"a=candidate:{n} 1 udp {2130706431 - n} {host} {port} typ host"
        for n, (host, port) in enumerate(targets)
    ]

    async def scenario():
        async with (
            running(small_animator, ServerConfig()) as (url, _api),
            aiohttp.ClientSession() as http,
        ):
            offer = {"sdp": await _offer_sdp(candidates), "type": "offer"}
            async with http.post(url + "/offer", json=offer) as r:
                status, body = r.status, await r.json()
            await asyncio.sleep(3.0)
            return status, body

    try:
        status, body = run(scenario())
        reached = set()
        for sock in listeners:
            with contextlib.suppress(BlockingIOError):
                while sock.recv(2048):
                    reached.add(sock.getsockname())
    finally:
        for sock in listeners:
            sock.close()
    assert not reached, f"the server sent STUN to {len(reached)} of the listed addresses"
    assert status == 400 and "candidates" in body["error"], body


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_address_limits(
    small_animator,
):
    """Behind a load balancer every request comes from it: with --trusted-proxy the last
    X-Forwarded-For hop is the client; from anyone else the header changes nothing."""

    async def offers(http: aiohttp.ClientSession, url: str, offer: dict, *forwarded: str):
        statuses = []
        for client in forwarded:
            headers = {
                "X-Iwarp-Client": uuid.uuid4().hex,
                "X-Forwarded-For": f"203.0.113.9, {client}",
            }
            async with http.post(url + "/offer", json=offer, headers=headers) as r:
                statuses.append(r.status)
        return statuses

    async def scenario():
        config = ServerConfig(
            limits=SessionLimits(max_sessions=8), trusted_proxies=("127.0.0.5/32",)
        )
        async with running(small_animator, config) as (url, _api):
            offer = {"sdp": await _offer_sdp(), "type": "offer"}
            async with _http("127.0.0.5") as proxy:
                # 203.0.113.9 is the client's own claim, before the proxy's hop: ignored.
                assert await offers(proxy, url, offer, *["192.0.2.1"] * 3) == [200, 200, 429]
                assert await offers(proxy, url, offer, "192.0.2.2") == [200]
            async with _http("127.0.0.6") as direct:
                statuses = await offers(direct, url, offer, "192.0.2.3", "192.0.2.4", "192.0.2.5")
                assert statuses == [200, 200, 429], statuses

    run(scenario())
