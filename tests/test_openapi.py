"""The OpenAPI document of `iwarp serve` (iwarp/streaming/openapi.json): it names exactly the
routes the server has, it is served, and schemathesis, fuzzing every route of a real
`iwarp serve --token` with and without the token, finds no 500, no answer the document does
not describe, and no answer slower than the deadline (tests/schemathesis.toml).

Fixed seed, bounded examples: about a minute on 2 cores. The longer local run is in
iwarp/streaming/README.md ("The API description and fuzzing"); `IWARP_FUZZ_EXAMPLES=300`
runs this test longer too."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

import aiohttp
from aiohttp import web
from test_streaming import REPO_ROOT, run, running

from iwarp.streaming import openapi
from iwarp.streaming.server import ServerConfig, create_app

TOKEN = "fuzz-t0ken"
SEED = 27
SCHEMATHESIS_CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SERVE = "import sys; from iwarp.cli import main; sys.exit(main(sys.argv[1:]))"


def _documented(document: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def _routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route, in OpenAPI's path syntax. HEAD is left out: aiohttp
    adds it to every GET route (checked), and OpenAPI documents it with GET."""
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()}
    heads = {path for method, path in routes if method == "HEAD"}
    assert heads <= {path for method, path in routes if method == "GET"}, "a HEAD without GET"
    return {(method, path) for method, path in routes if method != "HEAD"}


def test_every_route_is_documented_and_every_documented_route_exists(small_animator):
    app = create_app(small_animator, "default", ServerConfig())
    routed, documented = _routed(app), _documented(openapi.document())
    assert routed - documented == set(), "routes missing from iwarp/streaming/openapi.json"
    assert documented - routed == set(), "documented in openapi.json, but not routed"


def test_the_document_is_served_as_is_without_a_token(small_animator):
    async def scenario():
        async with (
            running(small_animator, ServerConfig(token=TOKEN)) as (url, _api),
            aiohttp.ClientSession() as http,
            http.get(url + "/openapi.json") as r,
        ):
            return r.status, await r.json()

    status, served = run(scenario())
    assert status == 200
    assert served == openapi.document()
    assert served["openapi"].startswith("3.")


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`iwarp serve --token` as a user starts it (the tiny random-init model on torch, the
    packaged default avatar), on a free port; its URL and its log file."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-c", SERVE, "serve", "--backend", "torch"]
    command += ["--checkpoint", str(checkpoint), "--port", "0", "--token", TOKEN]
    command += ["--workers", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)  # model, MediaPipe and the default avatar: seconds
            if match := re.search(r"open (http://\S+?)/? in a browser", line):
                url = match.group(1)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _schemathesis(url: str, *options: str, examples: int) -> tuple[int, str]:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(SCHEMATHESIS_CONFIG)]
    # No --checks: every check is on by default, and the config's exceptions then apply.
    command += ["run", f"{url}/openapi.json", "--seed", str(SEED)]
    command += ["--max-examples", str(examples), "--workers", "1", "--no-color", *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_schemathesis_finds_no_500_no_undocumented_answer_and_no_slow_one(served, with_token):
    pytest.importorskip("schemathesis")
    url, log_path = served
    examples = int(os.environ.get("IWARP_FUZZ_EXAMPLES", "6"))
    # With the token, one client id: an offer's session is then the next request's (owners
    # are token + X-Iwarp-Client), so the links reach the session routes. Without it, the
    # generated client ids are fuzzed too (on the routes that need no token).
    options = ["--header", f"Authorization: Bearer {TOKEN}", "--header", "X-Iwarp-Client: fuzzer"]
    options = options if with_token else []
    status, report = _schemathesis(url, *options, examples=examples)
    summary = re.search(r"(\d+) generated", report)
    print(
        f"schemathesis ({'with' if with_token else 'without'} the token): "
        f"{summary.group(1) if summary else '?'} test cases"
    )
    assert status == 0, report[-20000:]
    assert summary and int(summary.group(1)) > 50, report[-3000:]
    server_log = log_path.read_text()
    assert "internal error" not in server_log and "Traceback" not in server_log, server_log
