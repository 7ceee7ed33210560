"""The cam's local control endpoint (HTTP on 127.0.0.1), for scripts and stream decks."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from aiohttp import web

from iwarp.cam.frames import log

if TYPE_CHECKING:
    from iwarp.cam.app import CamApp


class CamControls:
    """HTTP on 127.0.0.1: GET /state; POST /neutral {on}, /avatar/{n}, /pause {on},
    /overlay {on}, /quit. `on` may be left out to toggle (neutral: set)."""

    def __init__(self, app: CamApp) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, port: int) -> CamControls | None:
        if not port:
            return None
        api = web.Application()
        api.router.add_get("/state", self.state)
        api.router.add_post("/neutral", self.neutral)
        api.router.add_post("/avatar/{n}", self.avatar)
        api.router.add_post("/pause", self.pause)
        api.router.add_post("/overlay", self.overlay)
        api.router.add_post("/quit", self.quit)
        self.runner = web.AppRunner(api, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as exc:
            log(f"control endpoint not started: port {port} is taken ({exc}); keys still work")
            await self.runner.cleanup()
            return None
        self.port = port
        log(f"controls: http://127.0.0.1:{port}/state (POST /neutral, /avatar/N, /pause, ...)")
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    async def _on(request: web.Request) -> bool | None:
        if not request.can_read_body:
            return None
        with contextlib.suppress(ValueError):
            body = await request.json()
            if isinstance(body, dict) and isinstance(body.get("on"), bool):
                return body["on"]
        return None

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.app.state())

    async def neutral(self, request: web.Request) -> web.Response:
        on = await self._on(request)
        if await self.app.set_neutral(True if on is None else on):
            return web.json_response(self.app.state())
        return web.json_response(
            {"error": "no face in view", "hint": "look at the camera and try again"}, status=422
        )

    async def avatar(self, request: web.Request) -> web.Response:
        n = request.match_info["n"]
        if not n.isdigit() or not await self.app.set_avatar(int(n) - 1):
            return web.json_response(
                {"error": f"no avatar {n}", "hint": f"1..{self.app.engine.avatar_count}"},
                status=404,
            )
        return web.json_response(self.app.state())

    async def pause(self, request: web.Request) -> web.Response:
        self.app.toggle_pause(await self._on(request))
        return web.json_response(self.app.state())

    async def overlay(self, request: web.Request) -> web.Response:
        self.app.toggle_overlay(await self._on(request))
        return web.json_response(self.app.state())

    async def quit(self, request: web.Request) -> web.Response:
        self.app.stop()
        return web.json_response({"stopping": True})
