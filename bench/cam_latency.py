#!/usr/bin/env python
"""Camera-to-sink latency of `iwarp cam`, locally and through an `iwarp serve` on loopback.

    python bench/cam_latency.py --seconds 20 --json              # both modes
    python bench/cam_latency.py --modes remote --url http://127.0.0.1:8080

A real clip (clips/liveportrait/driving/d3.mp4 from the shared data, else a generated one)
plays in a loop at its frame rate as the camera; the avatar frames go to a file sink. Latency
is from a frame leaving the camera to its avatar frame reaching the sink (remote: matched
through the id band the server echoes). Prints one JSON object per mode in the latency
benchmark's format (`rtt_ms` p50/p95/p99/mean/max, fps_in, fps_out, frames sent/received/
dropped); without --url, the remote mode starts its own `iwarp serve` on a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from iwarp.cam.app import CamSettings, run_cam
from iwarp.media import default_driving_clip, video_info
from iwarp.runtime.options import EngineOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "iwarp.cli", "serve", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("iwarp serve did not start")


def measure(mode: str, clip: Path, seconds: float, url: str | None, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = CamSettings(
            camera=str(clip),
            loop=True,
            server=url if mode == "remote" else None,
            sink=str(Path(tmp) / "avatar.mp4"),
            seconds=seconds,
            control_port=0,
            engine=EngineOptions(threads=threads),
        )
        s = run_cam(settings)
    fps_in = video_info(clip).fps or 30.0
    return {
        "mode": mode,
        "clients": 1,
        "clip": str(clip),
        "seconds": s["seconds"],
        "fps_in": round(fps_in, 2),
        "rtt_ms": s["latency_ms"],  # camera -> sink
        "fps_out": s["fps_out"],
        "frames_sent": s["frames_in"],
        "frames_received": s["frames_out"],
        "frames_dropped": s["frames_in"] - s["frames_out"],
        "reconnects": s["reconnects"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="local,remote", help="local, remote or both")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clip", help="camera stand-in (default: a real val clip)")
    p.add_argument("--url", help="remote: an already running iwarp serve")
    p.add_argument("--threads", type=int, default=0, help="model CPU threads (0: all cores)")
    p.add_argument("--json", action="store_true", help="one JSON object per mode")
    args = p.parse_args()
    clip = Path(args.clip) if args.clip else default_driving_clip()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or os.cpu_count() or 1))
    for mode in args.modes.split(","):
        server = None
        url = args.url
        if mode == "remote" and url is None:
            server, url = start_server(args.threads)
        try:
            r = measure(mode, clip, args.seconds, url, args.threads)
        finally:
            if server is not None:
                server.kill()
                server.wait()
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            lat = r["rtt_ms"]
            print(
                f"{mode}: camera->sink p50 {lat['p50']} / p95 {lat['p95']} ms, "
                f"{r['fps_out']} fps out of {r['fps_in']}, {r['frames_dropped']} frames skipped",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
