"""`iwarp cam`: a generated clip as the camera and a file sink, locally and through a real
`iwarp serve` on loopback; controls mid-stream; a server restart mid-call; clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc")

from iwarp.cam.app import CamSettings, run_cam_async
from iwarp.media import make_test_clip, read_image, read_video, video_info
from iwarp.paths import DEFAULT_AVATAR

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cam") / "camera.mp4"
    return make_test_clip(path, frames=36, size=256, fps=25, image=read_image(DEFAULT_AVATAR))


@pytest.fixture(scope="module")
def second_avatar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clearly different face: the portrait mirrored, with red and blue swapped."""
    from PIL import Image

    path = tmp_path_factory.mktemp("cam") / "other.png"
    image = np.ascontiguousarray(read_image(DEFAULT_AVATAR)[:, ::-1, ::-1])
    Image.fromarray(image).save(path)
    return path


def cam(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iwarp.cli", "cam", "--control-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


class Server:
    """A real `iwarp serve` process on a loopback port; `restart()` kills and starts it."""

    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self.args = args
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iwarp.cli", "serve", "--port", str(self.port), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("iwarp serve did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(free_port())
    s.start()
    yield s
    s.stop()


# ------------------------------------------------------------------------------------ local
def test_local_camera_file_to_file_sink(clip: Path, tmp_path: Path) -> None:
    out, stats = tmp_path / "avatar.mp4", tmp_path / "stats.json"
    proc = cam("--camera", str(clip), "--sink", str(out), "--lossless", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(stats.read_text())
    assert summary["frames_in"] == summary["frames_out"] == 36
    assert video_info(out).frames == 36
    assert summary["latency_ms"]["p50"] > 0


async def _controlled_run(
    clip: Path, out: Path, avatars: list[list[str]], action: tuple[str, int] | None
) -> int | None:
    """A lossless local run; `action` = (control path, after how many avatar frames).
    Returns the number of avatar frames written when the control took effect."""
    import aiohttp

    port = free_port()
    settings = CamSettings(
        avatars=avatars, camera=str(clip), sink=str(out), lossless=True, control_port=port
    )
    run = asyncio.ensure_future(run_cam_async(settings))
    applied = None
    if action is not None:
        path, after = action
        async with aiohttp.ClientSession() as http:
            while applied is None and not run.done():
                try:
                    async with http.get(f"http://127.0.0.1:{port}/state") as r:
                        state = await r.json()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
                    continue
                if state["stats"]["frames_out"] >= after:
                    async with http.post(f"http://127.0.0.1:{port}{path}") as r:
                        assert r.status == 200, await r.text()
                        applied = (await r.json())["stats"]["frames_out"]
                await asyncio.sleep(0.02)
    await run
    return applied


def _frame_diffs(a: Path, b: Path) -> np.ndarray:
    fa, fb = read_video(a), read_video(b)
    assert len(fa) == len(fb)
    return np.array(
        [np.abs(x.astype(float) - y.astype(float)).mean() for x, y in zip(fa, fb, strict=True)]
    )


def test_switching_avatar_neutral_pose_and_overlay_change_the_output(
    clip: Path, second_avatar: Path, tmp_path: Path
) -> None:
    avatars = [[str(DEFAULT_AVATAR)], [str(second_avatar)]]
    base, switched, neutral, overlay = (
        tmp_path / f"{n}.mp4" for n in ("base", "switch", "neutral", "overlay")
    )
    asyncio.run(_controlled_run(clip, base, avatars, None))
    at_switch = asyncio.run(_controlled_run(clip, switched, avatars, ("/avatar/2", 10)))
    at_neutral = asyncio.run(_controlled_run(clip, neutral, avatars, ("/neutral", 10)))
    at_overlay = asyncio.run(_controlled_run(clip, overlay, avatars, ("/overlay", 10)))
    assert at_switch is not None and at_neutral is not None and at_overlay is not None

    diff = _frame_diffs(base, switched)
    assert diff[: at_switch - 1].max() < 2.0, diff  # same frames until the switch
    assert diff[at_switch + 2 :].min() > 10.0, diff  # another face after it

    diff = _frame_diffs(base, neutral)
    assert diff[: at_neutral - 1].max() < 2.0, diff
    # Relative motion from the pose at frame ~10 differs from absolute keypoints.
    assert diff[at_neutral + 2 :].mean() > 3 * max(diff[: at_neutral - 1].mean(), 0.3), diff

    diff = _frame_diffs(base, overlay)  # the driving face blended over the avatar
    assert diff[: at_overlay - 1].max() < 2.0, diff
    assert diff[at_overlay + 2 :].min() > 3.0, diff


# ----------------------------------------------------------------------------------- remote
def test_remote_through_a_loopback_server(clip: Path, tmp_path: Path, server: Server) -> None:
    out, stats = tmp_path / "avatar.mp4", tmp_path / "stats.json"
    proc = cam(
        "--server", server.url, "--camera", str(clip), "--sink", str(out), "--lossless",
        "--stats-json", str(stats),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(stats.read_text())
    # Lossless: each camera frame waits for its avatar frame; a frame lost on the way would
    # show up as a shortfall (and a 5 s wait), not as a hang.
    assert summary["frames_in"] == 36 and summary["frames_out"] >= 34, summary
    assert video_info(out).frames == summary["frames_written"] == summary["frames_out"]
    assert summary["latency_ms"]["p50"] > 0 and summary["reconnects"] == 0
    # The id band the server echoes is painted over before the sink.
    from iwarp.streaming import frameid

    assert all(frameid.read_id(f) is None for f in read_video(out)[:10])


def test_remote_survives_a_server_restart(clip: Path, tmp_path: Path, server: Server) -> None:
    out, stats = tmp_path / "avatar.mp4", tmp_path / "stats.json"
    seconds, fps = 24.0, 25.0
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "iwarp.cli", "cam", "--control-port", "0",
            "--server", server.url, "--camera", str(clip), "--loop", "--seconds", str(seconds),
            "--sink", str(out), "--steady", "--fps", str(fps), "--stats-json", str(stats),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    time.sleep(6.0)
    server.stop()
    time.sleep(1.0)
    server.start(wait=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(stats.read_text())
    assert summary["reconnects"] >= 1, (summary, err[-1500:])
    calls = summary["frames_per_call"]
    assert len(calls) >= 2 and calls[0] > 5 and calls[-1] > 5, summary
    # The sink never stalled: a steady file holds a frame for every 1/fps of the run.
    assert summary["frames_written"] >= 0.85 * seconds * fps, summary
    assert video_info(out).frames == summary["frames_written"]
    assert "reconnecting" in err


def test_remote_server_full_is_explained(clip: Path, tmp_path: Path) -> None:
    server = Server(free_port(), "--max-sessions", "1")
    server.start()
    try:
        first = subprocess.Popen(
            [
                sys.executable, "-m", "iwarp.cli", "cam", "--control-port", "0",
                "--server", server.url, "--camera", str(clip), "--loop", "--seconds", "40",
                "--sink", str(tmp_path / "first.mp4"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the first call holds the only session
            with urllib.request.urlopen(server.url + "/healthz", timeout=2) as r:
                if json.loads(r.read())["sessions"] == 1:
                    break
            time.sleep(0.3)
        proc = cam(
            "--server", server.url, "--camera", str(clip), "--loop",
            "--sink", str(tmp_path / "o.mp4"), "--connect-timeout", "2", timeout=120,
        )  # fmt: skip
        first.kill()
        first.wait()
    finally:
        server.stop()
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "server full (1/1 sessions)" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- errors
def test_virtualcam_without_a_driver_explains_what_to_do(clip: Path) -> None:
    if any(Path("/sys/devices/virtual/video4linux").glob("video*")):
        pytest.skip("a v4l2loopback device exists on this machine")
    pytest.importorskip("pyvirtualcam")
    proc = cam("--camera", str(clip), "--sink", "virtualcam", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "modprobe v4l2loopback" in proc.stderr and "--sink window" in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--camera", "/dev/video77"], "camera /dev/video77 does not exist"),
        (["--camera", "missing.mp4"], "missing.mp4"),
        (["--server", "http://127.0.0.1:9", "--connect-timeout", "1"], "could not start a call"),
        (["--sink", "nowhere/x.mp4"], "does not exist"),
    ],
)
def test_clear_errors(clip: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    base = ["--camera", str(clip), "--sink", str(tmp_path / "o.mp4")]
    proc = cam(*base, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_camera_file_is_refused(tmp_path: Path, clip: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[:300])
    proc = cam("--camera", str(broken), "--sink", str(tmp_path / "o.mp4"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
