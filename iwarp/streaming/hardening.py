"""HTTP-level guards that apply to every route: request bodies are taken as sent (no content
coding), and no answer of this server can be shown inside another site's frame.

Content codings: aiohttp would decompress gzip, deflate, br and zstd bodies itself, and a
corrupt or unsupported one surfaced as a 500 or a plain-text 400 from its parser (issue 27).
No client of this API compresses what it sends (browsers do not), so `create_app` turns
aiohttp's decompression off (`HANDLER_ARGS`) and `refuse_content_coding` answers any coded
body with 415 and `Accept-Encoding: identity` (RFC 9110, 15.5.16) before it is read. That also
takes decompression bombs off the table.

Framing: the page has buttons (start the camera, delete an avatar); `X-Frame-Options: DENY`
and CSP `frame-ancestors 'none'` stop another site from overlaying it (clickjacking).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from iwarp.streaming.httperrors import ApiError

# For web.Application(handler_args=...): bodies reach the handlers exactly as sent.
HANDLER_ARGS = {"auto_decompress": False}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_content_coding(request: web.Request, handler: Handler) -> web.StreamResponse:
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if request.body_exists and coding not in ("", "identity"):
        raise ApiError(
            f"Content-Encoding {coding[:40]!r} is not accepted",
            "send the request body uncompressed, without a Content-Encoding header",
            415,
        )
    return await handler(request)


async def deny_framing(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, the page, its files and errors alike."""
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
    if response.status == 415:
        # The one coding a body may have (true of a 415 for its Content-Type too).
        response.headers.setdefault("Accept-Encoding", "identity")
