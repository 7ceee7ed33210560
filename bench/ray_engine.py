#!/usr/bin/env python
"""The Ray engine without WebRTC: what the hop to a replica adds, frames/s per replica with
and without batching, and the freeze when a replica is killed mid-stream.

    python bench/ray_engine.py --replicas 2 --frames 150 --clients 1,2,4 --batch 1,4 --json

One process, an embedded Ray cluster, the shipped weights on `--backend` (1 thread per
replica), a real driving clip (default: the one `iwarp bench-webrtc` streams), 256x256.
- hop: one stream, each frame animated locally (this process's Animator) and through a
  replica, alternately, so both see the same machine load. Added latency = remote - local;
  also remote call - replica model time (serialisation, JPEG, routing, network).
- throughput: N streams, each a thread sending its next frame as soon as the last came back,
  for --seconds; frames/s per replica, for each --batch (the deployment is updated in place).
- kill: 2 streams paced at 30 fps; after 3 s the replica that served the most frames is
  killed; freeze = the longest gap between two frames a stream got back.
The end-to-end WebRTC numbers come from `iwarp bench-webrtc` against `iwarp serve --engine ray`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from iwarp.metrics import percentile_ms
from iwarp.paths import DEFAULT_AVATAR


def hop(animator: Any, engine: Any, frames: list[np.ndarray]) -> dict[str, Any]:
    local, remote = animator.stream(), engine.stream()
    t_local, t_remote, t_overhead = [], [], []
    for i, frame in enumerate(frames):
        t0 = time.perf_counter()
        local.animate("default", frame)
        t1 = time.perf_counter()
        remote.animate("default", frame)
        t2 = time.perf_counter()
        if i >= 10:  # warm-up: graphs, avatars on the replicas
            t_local.append(t1 - t0)
            t_remote.append(t2 - t1)
            t_overhead.append((t2 - t1) - remote.last_reply.model_s)
    local.close()
    remote.close()
    return {
        "frames": len(t_local),
        "local_ms": {"p50": percentile_ms(t_local, 50), "p95": percentile_ms(t_local, 95)},
        "ray_ms": {"p50": percentile_ms(t_remote, 50), "p95": percentile_ms(t_remote, 95)},
        "added_ms": {
            "p50": round(percentile_ms(t_remote, 50) - percentile_ms(t_local, 50), 1),
            "p95": round(percentile_ms(t_remote, 95) - percentile_ms(t_local, 95), 1),
        },
        "call_minus_replica_model_ms": {
            "p50": percentile_ms(t_overhead, 50),
            "p95": percentile_ms(t_overhead, 95),
        },
    }


def _streams(
    engine: Any, frames: list[np.ndarray], n: int, seconds: float, fps: float | None = None
) -> tuple[list[list[float]], list[int]]:
    """n threads animating frames through the engine (paced at `fps`, else back to back);
    returns each stream's completion times, and the batch size each frame ran in."""
    done: list[list[float]] = [[] for _ in range(n)]
    batches: list[int] = []  # the batch each frame ran in on its replica
    start = time.monotonic()
    stop = start + seconds

    def worker(k: int) -> None:
        stream = engine.stream()
        i = k * 7  # streams at different points of the clip
        while time.monotonic() < stop:
            if fps:
                time.sleep(max(0.0, start + len(done[k]) / fps - time.monotonic()))
            stream.animate("default", frames[i % len(frames)])
            done[k].append(time.monotonic())
            batches.append(stream.last_reply.batch)
            i += 1
        stream.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, batches


def throughput(engine: Any, frames: list[np.ndarray], n: int, seconds: float) -> dict[str, Any]:
    before = {r: s.frames for r, s in engine.replica_stats().items()}
    done, batches = _streams(engine, frames, n, seconds)
    after = {r: s.frames for r, s in engine.replica_stats().items()}
    per_replica = {
        r: round((after[r] - before.get(r, 0)) / seconds, 2)
        for r in sorted(after)
        if after[r] > before.get(r, 0)  # replicas of an earlier deployment are gone
    }
    return {
        "clients": n,
        "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
        "fps_total": round(sum(len(d) for d in done) / seconds, 2),
        "fps_per_client": [round(len(d) / seconds, 2) for d in done],
        "fps_per_replica": per_replica,
    }


def kill(engine: Any, frames: list[np.ndarray], seconds: float = 8.0) -> dict[str, Any]:
    from iwarp.cluster.engine import kill_replica

    before = {r: s.frames for r, s in engine.replica_stats().items()}
    result: dict[str, Any] = {}

    def killer() -> None:
        time.sleep(3.0)
        now = {r: s.frames for r, s in engine.replica_stats().items()}
        busiest = max(now, key=lambda r: now[r] - before.get(r, 0))
        result["replica"], result["killed_at"] = busiest, time.monotonic()
        kill_replica(busiest)

    thread = threading.Thread(target=killer)
    retries = engine.retries
    thread.start()
    done, _ = _streams(engine, frames, 2, seconds, fps=30.0)
    thread.join()
    t_kill = result.pop("killed_at")
    gaps_around = [max(np.diff([t for t in d if t >= t_kill - 0.5])) for d in done]
    usual = [float(np.median(np.diff([t for t in d if t < t_kill]))) for d in done]
    return {
        **result,
        "freeze_ms": [round(g * 1e3, 1) for g in gaps_around],
        "usual_gap_ms": [round(u * 1e3, 1) for u in usual],
        "calls_retried": engine.retries - retries,
        "frames_after_kill": [sum(t > t_kill for t in d) for d in done],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--frames", type=int, default=150, help="frames for the hop measurement")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--batch", default="1,4", help="replica batch sizes to compare")
    p.add_argument("--seconds", type=float, default=10.0, help="per throughput run")
    p.add_argument("--clip", help="driving clip (default: iwarp bench-webrtc's)")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from iwarp.benchmarks.webrtc import load_frames
    from iwarp.cluster.engine import deploy_replicas, start_ray_engine
    from iwarp.media import default_driving_clip
    from iwarp.runtime.animator import Animator
    from iwarp.system import cpu_name

    frames, _ = load_frames(args.clip or default_driving_clip(), 256)
    animator = Animator.from_pretrained(args.backend, threads=1, show_progress=False)
    animator.add_avatar([DEFAULT_AVATAR], avatar_id="default")
    batches = [int(b) for b in args.batch.split(",")]
    engine = start_ray_engine(
        animator, None, args.replicas, args.backend, threads=1, max_batch=batches[0]
    )
    report: dict[str, Any] = {
        "cpu": cpu_name(),
        "backend": animator.backend.describe(),
        "replicas": args.replicas,
        "hop": hop(animator, engine, frames[: args.frames]),
        "throughput": [],
    }
    for batch in batches:
        engine.handle = deploy_replicas(args.replicas, args.backend, None, 1, batch, 0)
        for n in [int(c) for c in args.clients.split(",")]:
            run = throughput(engine, frames, n, args.seconds)
            report["throughput"].append({"batch": batch, **run})
            if not args.json:
                print(f"batch {batch}: {run}", flush=True)
    if not args.no_kill:
        report["kill"] = kill(engine, frames)
    engine.close()
    print(json.dumps(report) if args.json else json.dumps(report, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
