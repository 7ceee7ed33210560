"""End to end in a real browser: headless Chromium with a fake camera, driven by Playwright,
against `iwarp serve`'s app, inside a network namespace that has only loopback.

The pytest test re-runs this file as a script (`--inner`) under `unshare`, so the server and
the browser share a namespace where 127.0.0.1 is the only address: Chrome offers no other ICE
candidate and nothing can leave the machine. The page asks for the token, uploads an avatar,
starts the camera (a Y4M file of the swaying astronaut) and receives the animated video.

"Shows the avatar, not the camera": the server runs the shipped weights on the torch backend,
unchanged, and keeps a copy of every frame the network produced. The test reads frames from
the page's <video> via a canvas and checks that each is much closer to a frame the network
produced than to any camera frame (the camera is never echoed back).

Needs Debian's `chromium` (/usr/bin/chromium), `pip install playwright` (never `playwright
install`: the system browser is used) and a permitted `unshare -n`; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("IWARP_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token"
MIN_FRAMES = 60
SKIP_EXIT = 77  # the inner run's "cannot run here" exit code


def _unshare_command() -> list[str]:
    # As root, a plain network namespace; otherwise a user namespace makes us root in it.
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


def _prerequisites() -> str | None:
    """Why this test cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run([*_unshare_command(), "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        return f"unshare -n is not permitted here: {probe.stderr.decode().strip()}"
    return None


def test_browser_streams_the_avatar_end_to_end(tmp_path):
    reason = _prerequisites()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [*_unshare_command(), sys.executable, __file__, "--inner", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    if proc.returncode == SKIP_EXIT:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    result = json.loads((tmp_path / "result.json").read_text())
    print(json.dumps(result, indent=1))
    assert result["interfaces"] == ["lo"]
    assert result["frames_received"] >= MIN_FRAMES, log
    assert result["server_frames_out"] >= MIN_FRAMES
    # Every sampled frame is much closer to the avatar than to any camera frame.
    for to_avatar, to_camera in result["distances"]:
        assert to_avatar < 0.5 * to_camera, result["distances"]
    assert "Neutral pose set" in result["neutral_message"]
    assert result["placeholders_before_start"] == [True, True]
    assert result["placeholders_while_streaming"] == [False, False]
    assert "Press Start camera:" in result["camera_placeholder_text"]
    label = result["engine_label"]
    assert result["status_ready"] == f"ready · {label}", result["status_ready"]
    assert "threads" in result["status_title"], result["status_title"]
    assert re.fullmatch(
        rf"connected · {re.escape(label)} · [\d.]+ ms per frame", result["status_streaming"]
    ), result["status_streaming"]
    assert "Avatar ready" in result["upload_message"], result["upload_message"]
    assert result["files_left_in_picker"] == 0
    assert result["stats"]["fps"] > 0
    assert result["sessions_after_stop"] == 0
    assert "server is full" in result["full_message"]
    assert "Connection lost" in result["lost_message"] and result["reconnected"]


# -- the inner run (a script, inside the namespace) ----------------------------------------------


def _loopback_up() -> list[str]:
    """`ip link set lo up` without iproute2; returns the namespace's interfaces."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))
    return [name for _, name in socket.if_nameindex()]


def _small(image, side: int = 32):
    import cv2
    import numpy as np

    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


GRAB_JS = """
(side) => {
  const video = document.getElementById("avatar");
  const canvas = document.createElement("canvas");
  canvas.width = side; canvas.height = side;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(video, 0, 0, side, side);
  return {w: video.videoWidth, h: video.videoHeight,
          data: Array.from(ctx.getImageData(0, 0, side, side).data)};
}
"""


async def _inner(out: Path) -> None:
    import asyncio
    import collections
    import time

    import numpy as np
    from aiohttp import web
    from PIL import Image
    from playwright.async_api import async_playwright

    from iwarp.graphs import tensor_to_image
    from iwarp.media import read_image, synthetic_driving_frames, write_y4m
    from iwarp.paths import DEFAULT_AVATAR
    from iwarp.runtime.animator import Animator
    from iwarp.runtime.backends.torch_backend import TorchBackend
    from iwarp.streaming.client import StreamingClient
    from iwarp.streaming.server import API_KEY, ServerConfig, create_app
    from iwarp.streaming.session import SessionLimits

    interfaces = _loopback_up()

    class RecordingBackend(TorchBackend):
        """The shipped weights, unchanged; remembers the frames the network produced."""

        def __init__(self) -> None:
            super().__init__(None, "cpu", 1)
            self.outputs: collections.deque = collections.deque(maxlen=400)

        def animate(self, avatar, pose):
            out = super().animate(avatar, pose)
            self.outputs.append(out)
            return out

    backend = RecordingBackend()
    animator = Animator(backend)
    animator.add_avatar([DEFAULT_AVATAR], avatar_id="default", name="astronaut")

    astronaut = read_image(DEFAULT_AVATAR)
    camera_frames = synthetic_driving_frames(astronaut, 60, 256)
    camera_file = write_y4m(out / "camera.y4m", camera_frames, 30)
    avatar_photo = np.ascontiguousarray(astronaut[:, ::-1, ::-1])  # mirrored, BGR
    avatar_file = out / "avatar.png"
    Image.fromarray(avatar_photo).save(avatar_file)

    # One session slot, so the page meets a full server first (and must retry by itself).
    config = ServerConfig(token=TOKEN, limits=SessionLimits(max_sessions=1))
    app = create_app(animator, "default", config)
    api = app[API_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"

    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera_file}",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    result: dict = {"interfaces": interfaces, "engine_label": backend.label()}
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=args, timeout=60_000
            )
            page = await browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.set_default_timeout(60_000)
            await page.goto(url)
            # Before the camera starts, the two video squares say what will show there.
            result["placeholders_before_start"] = [
                await page.is_visible(f"#{name}-placeholder") for name in ("camera", "avatar")
            ]
            # The token prompt, then the avatar list.
            await page.wait_for_selector("#token-panel:not([hidden])")
            await page.fill("#token-input", TOKEN)
            await page.click("#token-form button")
            await page.wait_for_selector("#avatar-list li")
            # The words a person reads (rendered text, spaces included) and the header status:
            # state and engine in words, the engine's details in the tooltip.
            result["camera_placeholder_text"] = await page.inner_text("#camera-placeholder")
            result["status_ready"] = await page.text_content("#status")
            result["status_title"] = await page.get_attribute("#status", "title")
            # Upload the avatar photo; it becomes the selected avatar.
            await page.set_input_files("#upload-input", str(avatar_file))
            await page.wait_for_selector("#upload-preview img")
            await page.click("#upload-button")
            await page.wait_for_function(
                "document.querySelectorAll('#avatar-list li').length === 2"
            )
            await page.wait_for_selector("#avatar-list li.selected:not(:first-child)")
            # The confirmation stays up once the new avatar is selected; the picker is empty.
            await page.wait_for_function(
                "document.getElementById('message').textContent.includes('Avatar ready')"
            )
            await asyncio.sleep(1.0)
            result["upload_message"] = await page.text_content("#message")
            result["files_left_in_picker"] = await page.evaluate(
                "document.getElementById('upload-input').files.length"
            )
            uploaded = [r.avatar_id for r in animator.avatars() if r.owner]
            assert len(uploaded) == 1, uploaded
            # Another client holds the only slot: the page says the server is full...
            async with StreamingClient(url.rstrip("/"), camera_frames, 30, token=TOKEN) as other:
                await other.connect()
                await page.click("#start")
                await page.wait_for_function(
                    "document.getElementById('message').textContent.includes('server is full')"
                )
                result["full_message"] = await page.text_content("#message")
            # ...and once the slot is free, it connects by itself. Then: animated frames.
            t0 = time.monotonic()
            await page.wait_for_function(
                f"window.iwarp.framesReceived >= {MIN_FRAMES}", timeout=90_000
            )
            result["seconds_to_frames"] = round(time.monotonic() - t0, 1)
            result["placeholders_while_streaming"] = [
                await page.is_visible(f"#{name}-placeholder") for name in ("camera", "avatar")
            ]
            await page.wait_for_function(
                "document.getElementById('status').textContent.includes('ms per frame')"
            )
            result["status_streaming"] = await page.text_content("#status")
            session = next(iter(api.registry.sessions.values()))
            assert session.avatar_id == uploaded[0], "the session does not use the upload"
            # Sample what the page shows and compare with the avatar and the camera.
            cams = [_small(f) for f in camera_frames]
            distances = []
            for _ in range(5):
                grab = await page.evaluate(GRAB_JS, 32)
                shown = np.array(grab["data"], np.float32).reshape(32, 32, 4)[:, :, :3]
                produced = [_small(tensor_to_image(o[0])) for o in list(backend.outputs)]
                to_avatar = min(float(np.abs(shown - p).mean()) for p in produced)
                to_camera = min(float(np.abs(shown - c).mean()) for c in cams)
                distances.append((round(to_avatar, 1), round(to_camera, 1)))
                result["video_size"] = [grab["w"], grab["h"]]
                await asyncio.sleep(0.3)
            result["distances"] = distances
            # The neutral-pose button (the astronaut faces the camera).
            await page.click("#neutral")
            await page.wait_for_function(
                "document.getElementById('message').textContent.includes('eutral pose')"
            )
            result["neutral_message"] = await page.text_content("#message")
            await page.wait_for_function("window.iwarp.stats.fps > 0", timeout=10_000)
            result["stats"] = await page.evaluate("window.iwarp.stats")
            result["frames_received"] = await page.evaluate("window.iwarp.framesReceived")
            result["server_frames_out"] = session.stats.frames_out
            # The server drops the session: the page notices, says so, and reconnects.
            await api.registry.close_all("test: dropped by the server")
            await page.wait_for_function(
                "document.getElementById('message').textContent.includes('Connection lost')"
            )
            result["lost_message"] = await page.text_content("#message")
            frames = result["frames_received"]
            await page.wait_for_function(f"window.iwarp.framesReceived >= {frames + 30}")
            result["reconnected"] = api.registry.count == 1
            await page.click("#stop")
            await page.wait_for_function(
                "document.getElementById('status').textContent === 'stopped'"
            )
            deadline = time.monotonic() + 10
            while api.registry.count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            result["sessions_after_stop"] = api.registry.count
            result["console"] = console[-20:]
            await browser.close()
    finally:
        await runner.cleanup()
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__" and "--inner" in sys.argv:
    import asyncio

    sys.path.insert(0, str(REPO_ROOT))
    asyncio.run(asyncio.wait_for(_inner(Path(sys.argv[sys.argv.index("--inner") + 1])), 200))
