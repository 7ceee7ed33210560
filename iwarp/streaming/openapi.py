"""The HTTP API described as an OpenAPI 3.1 document (`openapi.json` beside this module),
served at `GET /openapi.json` without auth, like the page: it carries no data.

The file is the one description: tests/test_openapi.py checks that every route of
`create_app` is in it and everything in it is routed (methods included), and fuzzes the
server with schemathesis against it (every answer must be one it documents).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from aiohttp import web

DOCUMENT_PATH = Path(__file__).resolve().parent / "openapi.json"


@functools.cache
def _document_bytes() -> bytes:
    return DOCUMENT_PATH.read_bytes()


def document() -> dict[str, Any]:
    """The OpenAPI document, a fresh copy (callers may change it)."""
    return json.loads(_document_bytes())


async def serve_document(request: web.Request) -> web.Response:
    return web.Response(body=_document_bytes(), content_type="application/json")
