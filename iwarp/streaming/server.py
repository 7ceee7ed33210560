"""`iwarp serve`: the aiohttp app. Routes, auth, ownership and error mapping live here;
sessions, tracks and uploads are in their own modules.

Auth: with a token, every route but the page itself (`/`, `/static/*`: no data in them) needs
`Authorization: Bearer <token>`, else 401. Ownership: an avatar belongs to an owner key,
sha256(token, X-Iwarp-Client header), so two people who share a token but not a browser
(the page keeps a random client id in localStorage) cannot see, use or delete each other's
avatars; such an avatar answers 404 to anyone else, exactly like one that does not exist. The
server's own avatars (the default, or `--avatar` photos) have no owner and are public, and
cannot be deleted (403). Sessions belong to their owner key the same way.

Browsers: a web page the user visits can send requests to this server (it is on their
machine). Without a token nothing else would stop it, so requests with a foreign `Origin`
(not this server's own, nor one given with `--allow-origin`) get 403, a `Host` that is not an
IP address, localhost, this machine's name or an `--allow-host` gets 403 (DNS rebinding), and
JSON endpoints take only `Content-Type: application/json` (415), which a page cannot send
cross-origin without a CORS preflight this server never grants.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiortc import RTCSessionDescription
from PIL import Image

from iwarp.errors import InputError, IwarpError
from iwarp.options import option
from iwarp.runtime.animator import Animator
from iwarp.runtime.avatar_store import AvatarRecord
from iwarp.runtime.options import EngineOptions, avatar_photos
from iwarp.streaming import hardening, logfilters, openapi, rtc
from iwarp.streaming.engine import Engine
from iwarp.streaming.httperrors import ApiError, status_for
from iwarp.streaming.limits import address_key, body_deadline, parse_networks
from iwarp.streaming.metrics import CONTENT_TYPE
from iwarp.streaming.session import SessionLimits, SessionRegistry
from iwarp.streaming.uploads import UploadLimits, decode_photo, read_photos

log = logging.getLogger("iwarp.streaming")
# What requests cause (refusals, client errors, 500s): rate-limited, see logfilters.
requests_log = logging.getLogger(logfilters.REQUESTS_LOGGER)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_AVATAR_ID = "default"
CLIENT_HEADER = "X-Iwarp-Client"
MAX_SDP_BYTES = 64 * 1024

OWNER = web.RequestKey("owner", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerConfig:
    token: str | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    uploads: UploadLimits = field(default_factory=UploadLimits)
    max_avatars_per_owner: int = 20
    # Uploaded avatars in all (owners are client-chosen ids, so per-owner limits alone bound
    # nothing); past either cap the least recently used one not in a session is evicted.
    max_avatars: int = 100
    max_avatar_bytes: int = 256 * 1024 * 1024  # their crops and cached features
    # Uploaded avatars from one address (limits.address_key), whatever its client ids; past
    # the caps above an upload evicts only its own owner's avatars, else it gets 503.
    max_avatars_per_address: int = 40
    # Slow clients: a request's head within read_timeout s (of the connection's start or the
    # previous answer), and a body at min_body_rate bytes/s on average past read_timeout s.
    read_timeout: float = 10.0
    min_body_rate: float = 16 * 1024
    # Reverse proxies whose X-Forwarded-For names the client (addresses or networks).
    trusted_proxies: tuple[str, ...] = ()
    workers: int = 1
    allow_origins: tuple[str, ...] = ()  # e.g. "https://app.example.com"; "*" allows any
    allow_hosts: tuple[str, ...] = ()  # extra names the server answers to
    host: str = rtc.DEFAULT_HOST  # the address it listens on (a name there is allowed as Host)


def avatar_bytes(avatar: Any) -> int:
    """Memory an avatar holds: its face crops and the backend's cached features."""
    arrays = [*avatar.crops, *avatar.features.rows.values()]
    pose = avatar.features.pose
    arrays += [a for a in (pose.points, pose.strength, pose.expression) if a is not None]
    return sum(_nbytes(a) for a in arrays)


def _nbytes(array: Any) -> int:
    if isinstance(getattr(array, "nbytes", None), int):  # numpy, CuPy, ...
        return array.nbytes
    if hasattr(array, "element_size") and hasattr(array, "numel"):  # torch
        return int(array.element_size() * array.numel())
    shape = getattr(array, "shape", None)  # ORT OrtValue: shape() is a method
    shape = shape() if callable(shape) else shape
    return 4 * int(np.prod(shape)) if shape is not None else 0


def owner_key(token: str | None, client_id: str) -> str:
    """Who owns an avatar or session: the token and the client id, hashed (never stored raw)."""
    return hashlib.sha256(f"{token or ''}\0{client_id}".encode()).hexdigest()[:32]


def _error(status: int, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": message, "hint": hint}, status=status)


def _is_public_path(path: str) -> bool:
    # The page and the API's description carry no data.
    return path in ("/", "/openapi.json") or path.startswith("/static/")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """iwarp errors -> 4xx JSON {error, hint}; aiohttp's own 4xx keep their status, as JSON;
    anything else is our bug: 500 and one log line (the traceback only at DEBUG level).
    Logged on the rate-limited `requests_log`: clients choose how often these happen."""
    try:
        return await handler(request)
    except IwarpError as exc:
        status = status_for(exc)
        if status == 503:
            # Refused at capacity: the server working as configured, not a fault.
            requests_log.info(
                "%s %s: 503 %s", request.method, request.path, exc.message, extra={"flood_key": 503}
            )
        elif status >= 500:
            requests_log.error("%s %s: %s", request.method, request.path, exc)
        return _error(status, exc.message, exc.hint)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        allow = exc.headers.get("Allow")
        response = _error(exc.status, exc.reason, f"this path takes {allow}" if allow else "")
        if allow is not None:  # RFC 9110: a 405 says which methods the resource takes
            response.headers["Allow"] = allow
        return response
    except (HttpProcessingError, RequestPayloadError) as exc:
        # aiohttp's parser failed on the body mid-read (its framing or a multipart part's
        # headers): the client's error.
        reason = " ".join(str(getattr(exc, "message", "") or exc).split())[:200]
        return _error(
            400,
            f"malformed request body ({reason or type(exc).__name__})",
            "send the body as its Content-Type and Transfer-Encoding say",
        )
    except ConnectionResetError:
        # The client went away mid-request (a closed tab during an upload): nobody to answer.
        requests_log.info("%s %s: the client disconnected", request.method, request.path)
        return _error(400, "connection lost", "")
    except Exception as exc:
        requests_log.error(
            "%s %s: internal error: %s: %s", request.method, request.path, type(exc).__name__, exc
        )
        requests_log.debug("traceback", exc_info=True)
        return _error(500, "internal server error", "see the server's log")


def _auth_middleware(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and not _is_public_path(request.path):
            # Raw header bytes come in as surrogate escapes: compare them as the bytes they were.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            scheme, _, credentials = given.partition(b" ")
            # RFC 7235: the scheme is case-insensitive; the token is compared in constant time.
            bearer = scheme.lower() == b"bearer"
            if not (hmac.compare_digest(credentials.lstrip(b" "), expected) and bearer):
                response = _error(
                    401,
                    "missing or wrong token",
                    "send 'Authorization: Bearer <token>' (the token given to iwarp serve)",
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="iwarp"'
                return response
        client = request.headers.get(CLIENT_HEADER, "")
        if len(client) > 128:
            return _error(400, f"{CLIENT_HEADER} is too long", "use a short random id")
        if not (client.isascii() and client.isprintable()):
            return _error(
                400, f"{CLIENT_HEADER} has non-ASCII or control characters", "use a random hex id"
            )
        request[OWNER] = owner_key(token, client)
        return await handler(request)

    return auth


def _host_name(host_header: str) -> str:
    """'name:port', '[v6]:port' or 'name' -> the lower-case name or address alone."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin_middleware(config: ServerConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    """403 for a foreign Origin or an unknown Host name (see the module docstring)."""
    origins = {o.rstrip("/").lower() for o in config.allow_origins}
    names = {"localhost", socket.gethostname().lower(), config.host.lower()}
    names |= {h.lower() for h in config.allow_hosts}
    names |= {_host_name(o.split("://", 1)[-1]) for o in origins if o != "*"}

    def known_host(name: str) -> bool:
        # An IP literal cannot be rebound by DNS; names must be known to be ours.
        return _is_ip(name) or name in names or name.endswith(".localhost")

    @web.middleware
    async def origin_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None and not known_host(_host_name(host)):
            return _error(
                403,
                "unknown Host name in the request",
                "open the server by IP address or localhost, or start iwarp serve with "
                "--allow-host NAME",
            )
        origin = request.headers.get("Origin")
        if origin is not None and "*" not in origins:
            own = f"{request.scheme}://{host or ''}".lower()
            if origin.rstrip("/").lower() not in (own, *origins):
                return _error(
                    403,
                    "requests from other web sites are refused",
                    "open the page from this server, or start iwarp serve with "
                    "--allow-origin ORIGIN",
                )
        return await handler(request)

    return origin_check


async def _json_body(request: web.Request) -> dict[str, Any]:
    # A web page can send text/plain cross-origin without a preflight; JSON it cannot.
    if request.content_type != "application/json":
        raise ApiError(
            f"expected Content-Type application/json, got {request.content_type or 'none'}",
            "send a JSON object with Content-Type: application/json",
            415,
        )
    try:
        body = await request.json()
    except (ValueError, LookupError, RecursionError) as exc:
        # ValueError: bad JSON or bytes; LookupError: unknown charset; RecursionError: nesting.
        reason = type(exc).__name__ if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(f"request body is not JSON ({reason})", "send a JSON object", 400) from exc
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object", "send a JSON object", 400)
    return body


class Api:
    """The route handlers, sharing one Animator and one SessionRegistry."""

    def __init__(
        self,
        animator: Animator,
        default_avatar: str,
        config: ServerConfig,
        engine: Engine | None = None,
    ) -> None:
        self.animator = animator
        self.default_avatar = default_avatar
        self.config = config
        self.registry = SessionRegistry(
            animator, default_avatar, config.limits, config.workers, engine
        )
        # Avatar decoding and encoding (face detection + source encoder) are seconds of CPU and
        # a full-size decode at a time: one upload at a time, the others wait their turn.
        self.upload_executor = ThreadPoolExecutor(1, thread_name_prefix="iwarp-upload")
        self.uploads_in_flight = 0
        self._pending_uploads: dict[str, int] = {}  # owner -> uploads not registered yet
        # Per address (limits.address_key): uploads in progress, and who uploaded each avatar
        # (in memory only: avatars from --store count for no address).
        self._uploads_by_address: dict[str, int] = {}
        self._avatar_address: dict[str, str] = {}  # avatar id -> address
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        self._last_used: dict[str, float] = {}  # avatar id -> time.monotonic() of last use
        self._sizes: dict[str, int] = {}  # avatar id -> avatar_bytes, computed once
        for record in animator.avatars():  # from --store: evictable, before any upload
            if record.owner:
                self._last_used[record.avatar_id] = 0.0
        self._evict_avatars()  # a --store from a run with higher caps

    # -- helpers ----------------------------------------------------------------------------
    def _visible_record(self, avatar_id: str, owner: str) -> AvatarRecord:
        try:
            record = self.animator.get(avatar_id).record
        except InputError:
            record = None
        if record is None or record.owner not in ("", owner):
            raise ApiError(f"no avatar {avatar_id!r}", "list them with GET /avatars", 404)
        self._last_used[avatar_id] = time.monotonic()
        return record

    def _avatar_size(self, avatar_id: str) -> int:
        if avatar_id not in self._sizes:
            self._sizes[avatar_id] = avatar_bytes(self.animator.get(avatar_id))
        return self._sizes[avatar_id]

    def _evict_avatars(self, keep: str | None = None, owner: str | None = None) -> None:
        """Evicts the least recently used uploaded avatars that no session uses until the
        uploaded ones fit `max_avatars` and `max_avatar_bytes`. After an upload (`keep`, by
        `owner`) only that owner's own avatars may go: a stranger never makes room for
        itself with someone else's (client ids are the client's choice). If none can go,
        `keep` is removed and the upload refused with 503. With no owner (at start, caps
        lowered since the last run) any unused one may go.

        Runs on the event loop with no await: uploads finishing together cannot overshoot."""
        config = self.config
        while True:
            uploaded = [r for r in self.animator.avatars() if r.owner]
            total = sum(self._avatar_size(r.avatar_id) for r in uploaded)
            if len(uploaded) <= config.max_avatars and total <= config.max_avatar_bytes:
                return
            # Not evictable: in a session, the upload just made, or one still being registered
            # by the upload thread (not in _last_used yet: its request would then find it gone).
            spared = {s.avatar_id for s in self.registry.sessions.values()} | {keep}
            candidates = [
                r
                for r in uploaded
                if r.avatar_id in self._last_used
                and r.avatar_id not in spared
                and owner in (None, r.owner)
            ]
            if not candidates:
                if keep is not None:
                    self._remove_avatar(keep)
                raise ApiError(
                    f"the server holds the most avatars it allows ({len(uploaded)}, "
                    f"{total / 2**20:.0f} MiB), none of them yours to replace",
                    "try again later, or delete one of yours that a stream is using",
                    503,
                )
            victim = min(candidates, key=lambda r: self._last_used.get(r.avatar_id, 0.0))
            self._remove_avatar(victim.avatar_id)
            log.info(
                "avatar %s evicted: least recently used, over the avatar caps", victim.avatar_id
            )

    def _remove_avatar(self, avatar_id: str) -> None:
        self.animator.remove_avatar(avatar_id)
        self._last_used.pop(avatar_id, None)
        self._sizes.pop(avatar_id, None)
        self._avatar_address.pop(avatar_id, None)

    def _describe(self, record: AvatarRecord) -> dict[str, Any]:
        return {
            "avatar_id": record.avatar_id,
            "name": record.name,
            "num_sources": record.num_sources,
            "public": record.owner == "",
            "default": record.avatar_id == self.default_avatar,
            "created": record.created,
        }

    # -- routes -----------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        # Not add_static: its FileResponse answers a missing file with an empty 404 that no
        # middleware sees; this one says what is missing, as JSON.
        # Looked up by name among the folder's files: no path is built from the request.
        name = request.match_info["filename"]
        if name not in {p.name for p in STATIC_DIR.iterdir() if p.is_file()}:
            raise ApiError(
                f"no file {name[:80]!r} here", "the page's files are under /static/", 404
            )
        return web.FileResponse(STATIC_DIR / name)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "sessions": self.registry.count,
                "max_sessions": self.config.limits.max_sessions,
                "backend": self.animator.backend.describe(),
                "backend_label": self.animator.backend.label(),
                "image_size": self.animator.backend.image_size,
                "default_avatar": self.default_avatar,
                # Which engine animates, and for Ray how many replicas are up (asks the Serve
                # controller: off the event loop).
                "engine": await asyncio.get_running_loop().run_in_executor(
                    None, self.registry.engine.health
                ),
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.registry.metrics.render(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def offer(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        sdp, kind = body.get("sdp"), body.get("type")
        if not isinstance(sdp, str) or not isinstance(kind, str):
            raise ApiError("an offer needs string fields 'sdp' and 'type'", "see README", 400)
        if kind != "offer":
            raise ApiError(f"expected type 'offer', got {kind!r}", "send the local offer", 400)
        # Bytes, as sent: a character can be 4 (surrogatepass: JSON may carry lone surrogates).
        if len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_BYTES:
            raise ApiError(
                f"SDP offer too long (more than {MAX_SDP_BYTES} bytes)",
                "send the offer from createOffer()",
                400,
            )
        avatar_id = body.get("avatar_id")
        if avatar_id is None:  # absent or null: the server's default avatar
            avatar_id = self.default_avatar
        elif not isinstance(avatar_id, str):
            raise ApiError(
                f"avatar_id must be a string, got {json.dumps(avatar_id)[:40]}",
                "send an id from GET /avatars, or leave avatar_id out for the default",
                400,
            )
        echo_id = _bool_field(body, "echo_id", False)
        self._visible_record(avatar_id, request[OWNER])
        # The registry parses the SDP before it takes a slot (400 with the parser's reason).
        session, answer = await self.registry.create(
            RTCSessionDescription(sdp=sdp, type="offer"),
            avatar_id,
            request[OWNER],
            echo_id,
            address_key(request, self._trusted_proxies),
        )
        return web.json_response(
            {
                "sdp": answer.sdp,
                "type": answer.type,
                "session_id": session.id,
                "avatar_id": avatar_id,
            }
        )

    async def list_avatars(self, request: web.Request) -> web.Response:
        owner = request[OWNER]
        records = [r for r in self.animator.avatars() if r.owner in ("", owner)]
        records.sort(key=lambda r: (r.owner != "", r.created))
        return web.json_response({"avatars": [self._describe(r) for r in records]})

    async def upload_avatar(self, request: web.Request) -> web.Response:
        owner = request[OWNER]
        limits = self.config.uploads
        # Counted with the uploads still in progress, and checked and reserved with no await
        # in between: concurrent uploads cannot overshoot the per-owner limit.
        owned = sum(1 for r in self.animator.avatars() if r.owner == owner)
        owned += self._pending_uploads.get(owner, 0)
        if owned >= self.config.max_avatars_per_owner:
            raise ApiError(
                f"you already have {owned} avatars, the most allowed",
                "delete one with DELETE /avatars/{id}",
                409,
            )
        # The same for the client's address, whatever client ids it sends.
        address = address_key(request, self._trusted_proxies)
        uploading = self._uploads_by_address.get(address, 0)
        held = sum(1 for a in self._avatar_address.values() if a == address) + uploading
        if held >= self.config.max_avatars_per_address:
            raise ApiError(
                f"your address already holds {held} avatars, the most one address may",
                "delete some with DELETE /avatars/{id}, or start iwarp serve with a higher "
                "--max-avatars-per-address",
                409,
            )
        if uploading >= limits.max_in_flight_per_address:
            raise ApiError(
                f"{uploading} uploads from your address are in progress, the most one "
                "address may run at once",
                "wait for them to finish",
                429,
            )
        if self.uploads_in_flight >= limits.max_in_flight:
            raise ApiError(
                f"{self.uploads_in_flight} uploads are in progress, the most at once",
                "try again in a few seconds",
                503,
            )
        self.uploads_in_flight += 1
        self._uploads_by_address[address] = uploading + 1
        self._pending_uploads[owner] = self._pending_uploads.get(owner, 0) + 1
        try:
            with tempfile.TemporaryDirectory(prefix="iwarp-upload-") as folder:
                photos = await read_photos(request, limits, Path(folder))

                def register() -> str:
                    # One photo decoded at a time, each downscaled as it is decoded.
                    images = [decode_photo(p, limits) for p in photos]
                    name = ", ".join(Path(p.filename).name for p in photos)[:100]
                    return self.animator.add_avatar(images, owner=owner, name=name)

                loop = asyncio.get_running_loop()
                avatar_id = await loop.run_in_executor(self.upload_executor, register)
        finally:
            self.uploads_in_flight -= 1
            self._pending_uploads[owner] -= 1
            if not self._pending_uploads[owner]:
                del self._pending_uploads[owner]
            self._uploads_by_address[address] -= 1
            if not self._uploads_by_address[address]:
                del self._uploads_by_address[address]
        if avatar_id not in {r.avatar_id for r in self.animator.avatars()}:
            # A DELETE came between registration and now (it has removed the photos too).
            raise ApiError(
                f"avatar {avatar_id!r} was deleted before its upload finished",
                "upload it again if that was not meant",
                409,
            )
        self._last_used[avatar_id] = time.monotonic()
        self._avatar_address[avatar_id] = address
        self._evict_avatars(keep=avatar_id, owner=owner)
        record = self.animator.get(avatar_id).record
        log.info("avatar %s added (%d photos)", avatar_id, record.num_sources)
        return web.json_response(self._describe(record), status=201)

    async def delete_avatar(self, request: web.Request) -> web.Response:
        avatar_id = request.match_info["avatar_id"]
        record = self._visible_record(avatar_id, request[OWNER])
        if record.owner == "":
            raise ApiError(
                f"avatar {avatar_id!r} belongs to the server", "it cannot be deleted", 403
            )
        self._remove_avatar(avatar_id)
        return web.json_response({"deleted": avatar_id})

    async def avatar_preview(self, request: web.Request) -> web.Response:
        avatar_id = request.match_info["avatar_id"]
        self._visible_record(avatar_id, request[OWNER])
        crops = self.animator.get(avatar_id).crops
        buf = io.BytesIO()
        Image.fromarray(_side_by_side(crops)).save(buf, format="PNG")
        return web.Response(body=buf.getvalue(), content_type="image/png")

    async def get_session(self, request: web.Request) -> web.Response:
        session = self.registry.get(request.match_info["session_id"], request[OWNER])
        return web.json_response(session.info())

    async def update_session(self, request: web.Request) -> web.Response:
        session = self.registry.get(request.match_info["session_id"], request[OWNER])
        body = await _json_body(request)
        if "avatar_id" not in body and "neutral" not in body:
            raise ApiError("nothing to change", "send {avatar_id} and/or {neutral: bool}", 400)
        # Every field is checked before anything changes: a 400 leaves the session as it was.
        avatar_id = body.get("avatar_id")
        if "avatar_id" in body:
            if not isinstance(avatar_id, str):
                raise ApiError("avatar_id must be a string", "see GET /avatars", 400)
            self._visible_record(avatar_id, request[OWNER])
        neutral = _bool_field(body, "neutral", False) if "neutral" in body else None
        if avatar_id is not None:
            session.switch_avatar(avatar_id)
        if neutral is not None and not await session.set_neutral(neutral) and neutral:
            if session.closed:  # it ended while waiting for a frame: not about any face
                raise ApiError(
                    f"session {session.id} ended before a video frame arrived",
                    "start a new stream",
                    409,
                )
            raise ApiError(
                "no face in view to take the neutral pose from",
                "face the camera and try again",
                422,
            )
        return web.json_response(session.info())

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self.registry.get(request.match_info["session_id"], request[OWNER])
        await session.close("closed by the client")
        return web.json_response({"closed": session.id})

    # -- lifecycle --------------------------------------------------------------------------
    async def on_shutdown(self, app: web.Application) -> None:
        await self.registry.close_all()

    async def on_cleanup(self, app: web.Application) -> None:
        self.registry.shutdown()
        self.upload_executor.shutdown(wait=False, cancel_futures=True)


def _bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    """A JSON boolean field; a string like "false" is an error, not truthy."""
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(
            f"{name} must be true or false, got {json.dumps(value)[:40]}",
            f'send {{"{name}": true}} or {{"{name}": false}}',
            400,
        )
    return value


def _side_by_side(crops: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(list(crops), axis=1)


API_KEY = web.AppKey("api", Api)


def create_app(
    animator: Animator,
    default_avatar: str,
    config: ServerConfig | None = None,
    engine: Engine | None = None,
) -> web.Application:
    """The server around `animator`; `default_avatar` must be registered (ownerless) in it.
    Sessions animate on `engine` (default: `animator` itself, in this process).

    Applies the aiortc settings first (rtc.configure: marker-bit jitter buffer, bitrate,
    127.0.0.1 among the ICE candidates), since they must precede any peer connection.
    """
    config = config or ServerConfig()
    rtc.configure()
    api = Api(animator, default_avatar, config, engine)
    app = web.Application(
        middlewares=[
            _errors,
            body_deadline(config.read_timeout, config.min_body_rate),
            _origin_middleware(config),
            _auth_middleware(config.token),
            hardening.refuse_content_coding,
        ],
        # aiohttp's keep-alive timer closes a connection whose next request head has not
        # arrived in time (from its start, or from the previous answer): the head deadline.
        handler_args={**hardening.HANDLER_ARGS, "keepalive_timeout": config.read_timeout},
    )
    app.on_response_prepare.append(hardening.deny_framing)
    logfilters.install()
    app[API_KEY] = api
    app.router.add_get("/", api.index)
    app.router.add_get("/openapi.json", openapi.serve_document)
    app.router.add_get("/static/{filename}", api.static_file)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_post("/offer", api.offer)
    app.router.add_get("/avatars", api.list_avatars)
    app.router.add_post("/avatars", api.upload_avatar)
    app.router.add_delete("/avatars/{avatar_id}", api.delete_avatar)
    app.router.add_get("/avatars/{avatar_id}/preview", api.avatar_preview)
    app.router.add_get("/sessions/{session_id}", api.get_session)
    app.router.add_post("/sessions/{session_id}", api.update_session)
    app.router.add_delete("/sessions/{session_id}", api.delete_session)
    app.on_shutdown.append(api.on_shutdown)
    app.on_cleanup.append(api.on_cleanup)
    # What is alive now (model, backend, libraries) lives as long as the server: frozen out of
    # the cyclic collector's sight, the collection after each session (session.py) takes
    # milliseconds instead of ~300 ms.
    gc.collect()
    gc.freeze()
    return app


def _ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise IwarpError("--cert and --key go together", "give both files, or neither for HTTP")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise IwarpError(
            f"cannot load the certificate {cert} / key {key} ({exc})",
            "give a PEM certificate and its private key",
        ) from exc
    return context


@dataclass
class ServeOptions:
    """`iwarp serve`'s settings; each field is its command-line option (iwarp.options)."""

    avatars: list[str] = avatar_photos("--avatar")
    runtime: EngineOptions = option(default_factory=EngineOptions)  # --backend, --threads
    host: str = option(rtc.DEFAULT_HOST, help="address to listen on")
    port: int = option(rtc.DEFAULT_PORT, help="port to listen on")
    token: str | None = option(
        None, env="IWARP_TOKEN", help="require 'Authorization: Bearer TOKEN' (or $IWARP_TOKEN)"
    )
    max_sessions: int = option(4, help="concurrent streams")
    max_sessions_per_client: int = option(
        2, help="concurrent streams one client (X-Iwarp-Client) may hold"
    )
    max_avatars: int = option(
        100, help="uploaded avatars kept in all; past it the least recently used unused one goes"
    )
    max_avatar_memory_mib: float = option(
        256.0,
        flag="--max-avatar-memory",
        metavar="MIB",
        help="memory for uploaded avatars (~1.5 MiB per photo at 256 px), evicted the same way",
    )
    # Per client address (IPv6: per /64): client ids are the client's choice, addresses not.
    max_sessions_per_address: int = option(2, help="concurrent streams from one address")
    max_avatars_per_address: int = option(40, help="uploaded avatars kept from one address")
    max_uploads_per_address: int = option(2, help="uploads in progress from one address")
    ice_timeout: float = option(
        10.0, help="close a session whose peer has not connected S s after its offer"
    )
    max_remote_candidates: int = option(
        32, help="most ICE candidates an offer may list (each gets STUN checks)"
    )
    read_timeout: float = option(
        10.0,
        help="close a connection whose request head has not arrived in S s; a body gets S s "
        "plus the time --min-body-rate allows",
    )
    min_body_rate_kib: float = option(
        16.0,
        flag="--min-body-rate",
        metavar="KIB_S",
        help="slowest average rate (KiB/s) a request body may arrive at after --read-timeout",
    )
    trusted_proxies: list[str] = option(
        default_factory=list,
        flag="--trusted-proxy",
        metavar="ADDRESS",
        help="a reverse proxy or load balancer (address or network, repeatable) whose "
        "X-Forwarded-For names the client for the per-address limits. Default: none",
    )
    allow_origins: list[str] = option(
        default_factory=list,
        flag="--allow-origin",
        help="also accept requests from pages of this origin (e.g. https://app.example.com; "
        "repeatable; '*' allows any). Default: only the server's own page",
    )
    allow_hosts: list[str] = option(
        default_factory=list,
        flag="--allow-host",
        help="also answer to this Host name (repeatable). Default: IP addresses, localhost "
        "and this machine's name",
    )
    cert: str | None = option(None, help="TLS certificate (PEM): serve HTTPS")
    key: str | None = option(None, help="TLS private key (PEM)")
    store: str | None = option(None, help="folder that keeps uploaded avatars across restarts")
    workers: int = option(0, help="frames animated at once (0: auto)")
    idle_timeout: float = option(10.0, help="close a session after S s without video")
    # Scale-out (docs/SCALING.md): the networks on Ray Serve replicas, WebRTC stays here.
    engine: str = option(
        "local",
        choices=("local", "ray"),
        help="local: animate in this process; ray: on Ray Serve replicas (the cluster extra)",
    )
    ray_address: str | None = option(
        None,
        help="with --engine ray: the cluster's head, HOST:PORT or auto (default: start one here)",
    )
    replicas: int = option(
        2, help="with --engine ray: replicas to deploy (a GPU each where the cluster has GPUs)"
    )
    batch: int = option(
        0,
        help="with --engine ray: most frames of different sessions per replica call "
        "(0: 8 on GPUs, 1 on CPUs)",
    )


def serve(o: ServeOptions) -> int:
    """Runs the server until Ctrl-C / SIGTERM. Prints the URL to open once it listens.

    `o.engine == "ray"`: the sessions' frames are animated by `o.replicas` Ray Serve replicas
    (`o.runtime.backend` is theirs) on the cluster at `o.ray_address` (None: an embedded one on
    this machine); this process keeps WebRTC, face tracking and the avatars (docs/SCALING.md).
    """
    from iwarp.paths import DEFAULT_AVATAR

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # session start/stop lines; libraries stay at WARNING
    _check_options(o)
    ssl_context = _ssl_context(o.cert, o.key)
    cluster = _cluster() if o.engine == "ray" else None
    cores = os.cpu_count() or 1
    if cluster is not None:
        # A worker per session: each waits on its remote call, the model runs elsewhere.
        workers = o.workers or o.max_sessions
        edge_threads, threads = 1, o.runtime.threads or max(1, cores // 2)
        # An unreachable cluster fails now, before any loading.
        cluster.connect(o.ray_address, o.replicas * threads)
    else:
        workers = o.workers or max(1, min(o.max_sessions, cores))
        # Intra-op threads x concurrent frames = cores: more only makes the frames fight.
        threads = edge_threads = o.runtime.threads or max(1, cores // workers)
    # With --engine ray this Animator only validates and crops uploaded avatars and tracks
    # faces; the best engine on this machine does (its network never runs per frame here).
    backend = "auto" if cluster is not None else o.runtime.backend
    animator = Animator.from_pretrained(
        backend, o.runtime.checkpoint, store_dir=o.store, threads=edge_threads
    )
    photos = o.avatars or [DEFAULT_AVATAR]
    default_id = animator.add_avatar(
        photos, avatar_id=DEFAULT_AVATAR_ID, name=", ".join(Path(p).name for p in photos)
    )
    frame_engine: Engine | None = None
    if cluster is not None:
        print("iwarp serve: deploying the animation engine on Ray Serve...", flush=True)
        frame_engine = cluster.start_ray_engine(
            animator,
            o.ray_address,
            o.replicas,
            o.runtime.backend,
            o.runtime.checkpoint,
            threads,
            o.batch,
        )
    try:
        app = create_app(animator, default_id, _server_config(o, workers), frame_engine)
        asyncio.run(_run(app, o.host, o.port, ssl_context, o.token is not None))
    finally:
        if frame_engine is not None:
            frame_engine.close()
    return 0


def _check_options(o: ServeOptions) -> None:
    """Refuses settings that cannot run, naming the flag and a value that can."""
    for flag, value, example in (
        ("--max-sessions", o.max_sessions, 4),
        ("--max-sessions-per-client", o.max_sessions_per_client, 2),
        ("--max-sessions-per-address", o.max_sessions_per_address, 2),
        ("--max-avatars-per-address", o.max_avatars_per_address, 40),
        ("--max-uploads-per-address", o.max_uploads_per_address, 2),
        ("--max-remote-candidates", o.max_remote_candidates, 32),
        ("--ice-timeout", o.ice_timeout, 10),
        ("--read-timeout", o.read_timeout, 10),
        ("--min-body-rate", o.min_body_rate_kib, 16),
        ("--replicas", o.replicas, 2),
    ):
        if not value > 0:
            raise IwarpError(f"{flag} must be more than 0, got {value:g}", f"e.g. {flag} {example}")
    if o.engine not in ("local", "ray"):
        raise IwarpError(f"unknown --engine {o.engine!r}", "choose local or ray")
    try:
        parse_networks(o.trusted_proxies)
    except ValueError as exc:
        raise IwarpError(f"--trusted-proxy: {exc}", "e.g. --trusted-proxy 10.0.0.0/8") from None


def _server_config(o: ServeOptions, workers: int) -> ServerConfig:
    """The app's settings from the command line's."""
    return ServerConfig(
        token=o.token,
        limits=SessionLimits(
            max_sessions=o.max_sessions,
            max_per_client=o.max_sessions_per_client,
            idle_timeout=o.idle_timeout,
            ice_timeout=o.ice_timeout,
            max_per_address=o.max_sessions_per_address,
            max_remote_candidates=o.max_remote_candidates,
        ),
        uploads=UploadLimits(max_in_flight_per_address=o.max_uploads_per_address),
        max_avatars_per_address=o.max_avatars_per_address,
        read_timeout=o.read_timeout,
        min_body_rate=o.min_body_rate_kib * 1024,
        trusted_proxies=tuple(o.trusted_proxies),
        workers=workers,
        allow_origins=tuple(o.allow_origins),
        allow_hosts=tuple(o.allow_hosts),
        host=o.host,
        max_avatars=o.max_avatars,
        max_avatar_bytes=int(o.max_avatar_memory_mib * 2**20),
    )


def _cluster() -> Any:
    """iwarp.cluster.engine: the optional `cluster` extra, imported only for --engine ray, so
    the streaming package never needs Ray."""
    try:
        from iwarp.cluster import engine
    except ImportError as exc:
        raise IwarpError(
            f"--engine ray needs Ray Serve, which is not installed ({exc})",
            "pip install -e '.[cluster]'",
        ) from exc
    return engine


async def _run(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None, token: bool
) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise IwarpError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            "choose another --port, or stop the program using it",
        ) from exc
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    bound_port = runner.addresses[0][1] if runner.addresses else port
    scheme = "https" if ssl_context else "http"
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"iwarp serve: open {scheme}://{shown}:{bound_port}/ in a browser", flush=True)
    if token:
        print("iwarp serve: the page will ask for the token", flush=True)
    if scheme == "http" and not rtc.is_loopback(host):
        print(
            "iwarp serve: browsers allow the camera only on https or localhost; "
            "give --cert/--key to serve other machines",
            flush=True,
        )
    try:
        await stop.wait()
    finally:
        if received:
            api = app.get(API_KEY)
            sessions = f", closing {api.registry.count} sessions" if api is not None else ""
            print(f"iwarp serve: {received[0].name} received, stopping{sessions}", flush=True)
        await runner.cleanup()
