"""`iwarp serve`: the aiohttp app. Routes, auth, ownership and error mapping live here;
sessions, tracks and uploads are in their own modules.

Auth: with a token, every route but the page itself (`/`, `/static/*`: no data in them) needs
`Authorization: Bearer <token>`, else 401. Ownership: an avatar belongs to an owner key,
sha256(token, X-Iwarp-Client header), so two people who share a token but not a browser
(the page keeps a random client id in localStorage) cannot see, use or delete each other's
avatars; such an avatar answers 404 to anyone else, exactly like one that does not exist. The
server's own avatars (the default, or `--avatar` photos) have no owner and are public, and
cannot be deleted (403). Sessions belong to their owner key the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiortc import RTCSessionDescription
from PIL import Image

from iwarp.errors import InputError, IwarpError
from iwarp.runtime.animator import Animator
from iwarp.runtime.avatar_store import AvatarRecord
from iwarp.streaming import rtc
from iwarp.streaming.httperrors import ApiError, status_for
from iwarp.streaming.metrics import CONTENT_TYPE
from iwarp.streaming.session import SessionLimits, SessionRegistry
from iwarp.streaming.uploads import UploadLimits, decode_photo, read_photos

log = logging.getLogger("iwarp.streaming")

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
    workers: int = 1


def owner_key(token: str | None, client_id: str) -> str:
    """Who owns an avatar or session: the token and the client id, hashed (never stored raw)."""
    return hashlib.sha256(f"{token or ''}\0{client_id}".encode()).hexdigest()[:32]


def _error(status: int, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": message, "hint": hint}, status=status)


def _is_public_path(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """iwarp errors -> 4xx JSON {error, hint}; aiohttp's own 4xx keep their status, as JSON."""
    try:
        return await handler(request)
    except IwarpError as exc:
        status = status_for(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        return _error(status, exc.message, exc.hint)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return _error(exc.status, exc.reason, "")


def _auth_middleware(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and not _is_public_path(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
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
        request[OWNER] = owner_key(token, client)
        return await handler(request)

    return auth


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not JSON ({exc})", "send a JSON object", 400) from exc
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object", "send a JSON object", 400)
    return body


class Api:
    """The route handlers, sharing one Animator and one SessionRegistry."""

    def __init__(self, animator: Animator, default_avatar: str, config: ServerConfig) -> None:
        self.animator = animator
        self.default_avatar = default_avatar
        self.config = config
        self.registry = SessionRegistry(animator, default_avatar, config.limits, config.workers)
        # Avatar encoding (face detection + source encoder) is seconds of CPU: one at a time.
        self.upload_executor = ThreadPoolExecutor(1, thread_name_prefix="iwarp-upload")

    # -- helpers ----------------------------------------------------------------------------
    def _visible_record(self, avatar_id: str, owner: str) -> AvatarRecord:
        try:
            record = self.animator.get(avatar_id).record
        except InputError:
            record = None
        if record is None or record.owner not in ("", owner):
            raise ApiError(f"no avatar {avatar_id!r}", "list them with GET /avatars", 404)
        return record

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

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "sessions": self.registry.count,
                "max_sessions": self.config.limits.max_sessions,
                "backend": self.animator.backend.describe(),
                "image_size": self.animator.backend.image_size,
                "default_avatar": self.default_avatar,
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
        if len(sdp) > MAX_SDP_BYTES:
            raise ApiError("SDP offer too long", "send the offer from createOffer()", 400)
        # aiortc accepts free text as an SDP with no media; refuse it here with a reason.
        if not sdp.lstrip().startswith("v=0") or "\nm=video " not in sdp.replace("\r", ""):
            raise ApiError(
                "malformed SDP offer: it needs a 'v=0' line and a video media section",
                "send the offer from RTCPeerConnection.createOffer() with a camera track",
                400,
            )
        avatar_id = body.get("avatar_id") or self.default_avatar
        if not isinstance(avatar_id, str):
            raise ApiError("avatar_id must be a string", "see GET /avatars", 400)
        self._visible_record(avatar_id, request[OWNER])
        session, answer = await self.registry.create(
            RTCSessionDescription(sdp=sdp, type="offer"),
            avatar_id,
            request[OWNER],
            echo_id=bool(body.get("echo_id", False)),
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
        owned = sum(1 for r in self.animator.avatars() if r.owner == owner)
        if owned >= self.config.max_avatars_per_owner:
            raise ApiError(
                f"you already have {owned} avatars, the most allowed",
                "delete one with DELETE /avatars/{id}",
                409,
            )
        limits = self.config.uploads
        photos = await read_photos(request, limits)
        loop = asyncio.get_running_loop()

        def register() -> str:
            images = [decode_photo(p, limits) for p in photos]
            name = ", ".join(Path(p.filename).name for p in photos)[:100]
            return self.animator.add_avatar(images, owner=owner, name=name)

        avatar_id = await loop.run_in_executor(self.upload_executor, register)
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
        self.animator.remove_avatar(avatar_id)
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
        if "avatar_id" in body:
            avatar_id = body["avatar_id"]
            if not isinstance(avatar_id, str):
                raise ApiError("avatar_id must be a string", "see GET /avatars", 400)
            self._visible_record(avatar_id, request[OWNER])
            session.switch_avatar(avatar_id)
        if "neutral" in body:
            on = bool(body["neutral"])
            if not await session.set_neutral(on) and on:
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


def _side_by_side(crops: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(list(crops), axis=1)


API_KEY = web.AppKey("api", Api)


def create_app(
    animator: Animator, default_avatar: str, config: ServerConfig | None = None
) -> web.Application:
    """The server around `animator`; `default_avatar` must be registered (ownerless) in it.

    Applies the aiortc settings first (rtc.configure: marker-bit jitter buffer, bitrate,
    127.0.0.1 among the ICE candidates), since they must precede any peer connection.
    """
    config = config or ServerConfig()
    rtc.configure()
    api = Api(animator, default_avatar, config)
    app = web.Application(middlewares=[_errors, _auth_middleware(config.token)])
    app[API_KEY] = api
    app.router.add_get("/", api.index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
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


def serve(
    avatars: Sequence[str | Path] | None = None,
    backend: str = "auto",
    checkpoint: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    max_sessions: int = 4,
    cert: str | None = None,
    key: str | None = None,
    store: str | Path | None = None,
    workers: int = 0,
    threads: int = 0,
    idle_timeout: float = 10.0,
) -> int:
    """Runs the server until Ctrl-C / SIGTERM. Prints the URL to open once it listens."""
    from iwarp.paths import DEFAULT_AVATAR

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # session start/stop lines; libraries stay at WARNING
    if max_sessions < 1:
        raise IwarpError("--max-sessions must be at least 1", "e.g. --max-sessions 4")
    ssl_context = _ssl_context(cert, key)
    cores = os.cpu_count() or 1
    workers = workers or max(1, min(max_sessions, cores))
    # Intra-op threads x concurrent frames = cores: more only makes the frames fight.
    threads = threads or max(1, cores // workers)
    animator = Animator.from_pretrained(backend, checkpoint, store_dir=store, threads=threads)
    photos = list(avatars) if avatars else [DEFAULT_AVATAR]
    default_id = animator.add_avatar(
        photos, avatar_id=DEFAULT_AVATAR_ID, name=", ".join(Path(p).name for p in photos)
    )
    config = ServerConfig(
        token=token,
        limits=SessionLimits(max_sessions=max_sessions, idle_timeout=idle_timeout),
        workers=workers,
    )
    app = create_app(animator, default_id, config)
    asyncio.run(_run(app, host, port, ssl_context, token is not None))
    return 0


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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
        await runner.cleanup()
