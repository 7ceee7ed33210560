"""`iwarp serve` against malformed and hostile input, second round (issue 27, defects 6-9):
bytes in multipart part headers, compressed bodies, chunked uploads past the size limit, log
floods, and small validation gaps. A real server on a loopback port (the 64x64 random-init
model on the torch backend), real sockets; raw HTTP where aiohttp's client would refuse to
send it."""

from __future__ import annotations

import asyncio
import fractions
import gzip
import json
import logging

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

import aiohttp
import av
from aiortc import MediaStreamTrack
from test_streaming import _form, raw_exchange, run, running

from iwarp.streaming import logfilters
from iwarp.streaming.client import PeerCall, ServerApi, StreamingClient
from iwarp.streaming.server import ServerConfig
from iwarp.streaming.uploads import UploadLimits

pytestmark = pytest.mark.usefixtures("no_uploads_left")


def _post_head(path: str, content_type: str, length: int, *headers: bytes) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Connection: close",
        f"Content-Type: {content_type}".encode(),
        f"Content-Length: {length}".encode(),
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json_error(headers: dict[str, str], body: bytes) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:200])
    answer = json.loads(body)
    assert answer["error"] and "hint" in answer, answer
    return answer


# -- 6. no 500s from malformed multipart or compressed bodies ------------------------------------


@pytest.mark.parametrize(
    "part_header",
    [b"X-Note: a\x00b", b"X-Note: a\x01b", b"X-Note: a\x7fb", b"X Note: b"],
    ids=["nul", "0x01", "0x7f", "space-in-name"],
)
def test_bad_bytes_in_a_multipart_part_header_are_json_400(small_animator, face_png, part_header):
    body = (
        b"--bb\r\n"
        b'Content-Disposition: form-data; name="file"; filename="f.png"\r\n'
        + part_header
        + b"\r\n\r\n"
        + face_png
        + b"\r\n--bb--\r\n"
    )
    head = _post_head("/avatars", "multipart/form-data; boundary=bb", len(body))

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            return await raw_exchange(url, head + body)

    status, headers, answer = run(scenario())
    assert status == 400, answer[:300]
    assert "multipart" in _json_error(headers, answer)["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "x-unknown"])
def test_compressed_request_bodies_are_refused_with_json(small_animator, encoding):
    """Corrupt gzip was a 500; br/zstd/deflate a plain-text 400 from aiohttp's parser. No
    client of this API compresses what it sends (browsers do not), so every content coding
    is refused before anything is decompressed: 415, as RFC 9110 asks, with the codings
    accepted in Accept-Encoding."""
    valid_gzip = gzip.compress(b'{"sdp": "v=0", "type": "offer"}')
    cases = [
        ("/offer", "application/json", b"abc"),
        ("/offer", "application/json", valid_gzip),
        ("/avatars", "multipart/form-data; boundary=bb", b"abc"),
    ]

    async def scenario():
        answers = []
        async with running(small_animator, ServerConfig()) as (url, _api):
            for path, content_type, body in cases:
                coding = f"Content-Encoding: {encoding}".encode()
                head = _post_head(path, content_type, len(body), coding)
                answers.append(await raw_exchange(url, head + body))
        return answers

    for (path, _, _), (status, headers, body) in zip(cases, run(scenario()), strict=True):
        assert status == 415, (path, status, body[:200])
        assert "Content-Encoding" in _json_error(headers, body)["error"], body
        assert headers.get("accept-encoding") == "identity", headers


# -- 7. the upload limit counts the bytes read, whatever the framing -----------------------------


def test_a_chunked_upload_is_limited_by_the_bytes_read(small_animator, face_png):
    """No Content-Length to check up front: a big non-`file` field, then a photo. The body
    is cut off with 413 once more than the limit has been read."""
    limits = UploadLimits(max_bytes=256 * 1024, max_photos=1)
    limit = limits.max_photos * limits.max_bytes + 64 * 1024
    filler = (
        b'--bb\r\nContent-Disposition: form-data; name="notes"\r\n\r\n'
        + b"x" * (16 * limit)
        + b"\r\n"
    )
    photo = (
        b'--bb\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n'
        + face_png
        + b"\r\n--bb--\r\n"
    )
    body = filler + photo

    async def chunked() -> object:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    async def scenario():
        async with (
            running(small_animator, ServerConfig(uploads=limits)) as (url, _api),
            aiohttp.ClientSession() as http,
        ):
            headers = {"Content-Type": "multipart/form-data; boundary=bb"}
            async with http.post(url + "/avatars", data=chunked(), headers=headers) as r:
                assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
                return r.status, await r.json()

    status, answer = run(scenario())
    assert status == 413, answer
    assert f"more than {limit} bytes" in answer["error"], answer


# -- 8. logs cannot be flooded -------------------------------------------------------------------


class GarbageVideoTrack(MediaStreamTrack):
    """A camera whose 'VP8' is random bytes: aiortc packetizes pre-encoded av.Packets as
    they are, so the server's decoder gets garbage at 30 frames a second."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._rng = np.random.default_rng(0)
        self._count = 0

    async def recv(self) -> av.Packet:
        await asyncio.sleep(1 / 30)
        packet = av.Packet(self._rng.integers(0, 256, 800, dtype=np.uint8).tobytes())
        packet.pts = self._count * 3000
        packet.time_base = fractions.Fraction(1, 90000)
        self._count += 1
        return packet


def _decode_failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "failed to decode" in r.getMessage()]


def test_garbage_video_from_a_peer_writes_a_bounded_number_of_log_lines(small_animator, caplog):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api), ServerApi(url) as http:
            call = PeerCall(GarbageVideoTrack(), lambda rgb, t: None)
            try:
                await call.start(http, timeout=20)
                for _ in range(300):  # until the garbage reaches the decoder (ICE, DTLS first)
                    if _decode_failures(caplog):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(3)  # ~90 more frames that cannot be decoded
            finally:
                await call.close()

    logfilters.reset_counts()
    with caplog.at_level(logging.WARNING):
        run(scenario())
    decode_lines = _decode_failures(caplog)
    assert decode_lines, "the garbage never reached the decoder: the test tests nothing"
    assert len(decode_lines) <= 10, f"{len(decode_lines)} lines for one peer's garbage"


MALFORMED_REQUESTS = [
    b"GET / HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
]


def test_malformed_requests_are_logged_in_one_line_each_rate_limited(small_animator, caplog):
    async def scenario():
        async with running(small_animator, ServerConfig(token="t0ken")) as (url, _api):
            for _ in range(10):
                for request in MALFORMED_REQUESTS:
                    status, _, _ = await raw_exchange(url, request)
                    assert status == 400

    logfilters.reset_counts()
    with caplog.at_level(logging.DEBUG):
        run(scenario())
    lines = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert lines, "aiohttp logged nothing: the test tests nothing"
    assert not [r for r in lines if r.exc_info or r.exc_text], "a traceback was logged"
    assert all(r.levelno <= logging.INFO for r in lines), [r.levelname for r in lines]
    assert len(lines) <= 15, f"{len(lines)} lines for 40 malformed requests"


def test_refusals_when_busy_are_not_logged_as_errors(small_animator, face_png, caplog):
    """503 'too many uploads' is the server working as configured, not a fault."""

    async def scenario():
        config = ServerConfig(uploads=UploadLimits(max_in_flight=0))
        async with running(small_animator, config) as (url, _api), ServerApi(url) as http:
            for _ in range(30):
                status, _ = await http.request("POST", "/avatars", data=_form(("f.png", face_png)))
                assert status == 503

    logfilters.reset_counts()
    with caplog.at_level(logging.DEBUG, logger="iwarp.streaming"):
        run(scenario())
    refusals = [r for r in caplog.records if "in progress" in r.getMessage()]
    assert refusals, "the refusals were not logged at all"
    assert all(r.levelno == logging.INFO for r in refusals), [r.levelname for r in refusals]
    assert len(refusals) <= 10, f"{len(refusals)} lines for 30 refusals"


# -- 9. small correctness gaps -------------------------------------------------------------------


def test_a_session_update_that_fails_validation_changes_nothing(small_animator, face_png, camera):
    async def scenario():
        async with (
            running(small_animator, ServerConfig()) as (url, _api),
            StreamingClient(url, camera, 30) as client,
        ):
            status, uploaded = await client.request(
                "POST", "/avatars", data=_form(("f.png", face_png))
            )
            assert status == 201, uploaded
            await client.connect()
            path = f"/sessions/{client.session_id}"
            update = {"avatar_id": uploaded["avatar_id"], "neutral": None}
            status, answer = await client.request("POST", path, json=update)
            assert status == 400 and "neutral" in answer["error"], answer
            return (await client.session_info())["avatar_id"]

    assert run(scenario()) == "default"


@pytest.mark.parametrize("avatar_id", [0, False, [], {}, ""])
def test_an_offer_avatar_id_that_is_not_a_name_is_refused(small_animator, avatar_id):
    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api), ServerApi(url) as http:
            offer = {"sdp": "v=0\r\n", "type": "offer", "avatar_id": avatar_id}
            return await http.request("POST", "/offer", json=offer)

    status, answer = run(scenario())
    assert status in (400, 404) and "avatar" in answer["error"], answer
    if avatar_id != "":
        assert status == 400, answer


def test_the_sdp_limit_counts_bytes_not_characters(small_animator):
    sdp = "v=0\r\ns=" + "é" * 40_000 + "\r\n"  # 40 k characters, 80 KB in UTF-8: over 64 KiB

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api), ServerApi(url) as http:
            return await http.request("POST", "/offer", json={"sdp": sdp, "type": "offer"})

    status, answer = run(scenario())
    assert status == 400 and "too long" in answer["error"], answer


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_auth_scheme_is_case_insensitive(small_animator, scheme):
    async def scenario():
        async with running(small_animator, ServerConfig(token="t0ken")) as (url, _api):
            headers = {"Authorization": f"{scheme} t0ken"}
            async with aiohttp.ClientSession(headers=headers) as http:
                async with http.get(url + "/healthz") as r:
                    good = r.status
                headers = {"Authorization": f"{scheme} t0kem"}
                async with http.get(url + "/healthz", headers=headers) as r:
                    wrong = r.status
            return good, wrong

    assert run(scenario()) == (200, 401)


def test_no_page_or_answer_can_be_framed_by_another_site(small_animator):
    async def scenario():
        async with running(small_animator, ServerConfig(token="t0ken")) as (url, _api):
            found = {}
            async with aiohttp.ClientSession() as http:
                for path in ("/", "/static/app.js", "/healthz", "/nowhere"):
                    async with http.get(url + path) as r:
                        found[path] = (r.status, dict(r.headers))
            return found

    for path, (status, headers) in run(scenario()).items():
        assert headers.get("X-Frame-Options") == "DENY", (path, status)
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), path


# -- found by schemathesis (tests/test_openapi.py) -----------------------------------------------


def test_a_wrong_method_is_405_with_allow_and_a_missing_file_is_a_json_404(small_animator):
    """RFC 9110: a 405 lists the methods the resource takes (the JSON answer had dropped
    aiohttp's Allow header). aiohttp's static route answered a missing file with an empty
    application/octet-stream 404 that no middleware saw."""

    def request(method: str, path: str) -> bytes:
        return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    async def scenario():
        async with running(small_animator, ServerConfig()) as (url, _api):
            return [
                await raw_exchange(url, request(method, path))
                for method, path in [
                    ("TRACE", "/offer"),
                    ("PUT", "/sessions/x"),
                    ("GET", "/static/nothing.js"),
                    ("GET", "/static/..%2Fserver.py"),
                    ("GET", "/static/app.js"),
                ]
            ]

    trace, put, missing, traversal, found = run(scenario())
    assert trace[0] == 405 and trace[1].get("allow") == "POST", trace[1]
    assert "POST" in _json_error(trace[1], trace[2])["hint"]
    assert put[0] == 405 and set(put[1]["allow"].split(",")) >= {"GET", "POST", "DELETE"}
    for status, headers, body in (missing, traversal):
        assert status == 404 and "no file" in _json_error(headers, body)["error"], body
    assert found[0] == 200 and found[2], found[1]
