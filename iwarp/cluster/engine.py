"""The edge side: the engine an `iwarp serve --engine ray` process gives its sessions.

Per frame, in the session's model thread:

    camera frame ─▶ RayStream.animate
                      │ face_crop                 here: MediaPipe face tracking, S x S crop
                      │ RayEngine.call ─────────▶ a replica (deployment.py): keypoints,
                      │   (retried on another      relative motion, smoothing, animator
                      │    replica if one dies) ◀─ frame + the session's motion state
                      ▼
                 avatar frame ─▶ back to the track

The edge keeps everything a session owns (face tracker, motion state, avatars); replicas keep
only encoded avatars, which they can rebuild. See docs/SCALING.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from iwarp.cluster.deployment import APP_NAME, DEPLOYMENT_NAME, AnimatorDeployment
from iwarp.cluster.wire import (
    AvatarSources,
    FrameReply,
    FrameRequest,
    Pose,
    pack_image,
    unpack_image,
)
from iwarp.errors import IwarpError
from iwarp.runtime.animator import Animator, Avatar, DrivingStream
from iwarp.streaming.engine import ReplicaStats

log = logging.getLogger("iwarp.cluster")

# A replica that died takes its in-flight call with it: these mean "try another one".
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, TimeoutError)


class EngineUnavailable(IwarpError):
    """No replica answered within the retry window."""


class RayStream(DrivingStream):
    """A `DrivingStream` whose network steps run on a replica: face tracking stays here, the
    motion state travels with each frame and comes back updated."""

    local_fields = (*DrivingStream.local_fields, "engine", "avatar_id", "last_reply")
    engine: RayEngine
    avatar_id: str = ""  # the avatar of the last frame: where a neutral-pose request goes
    last_reply: FrameReply | None = None  # which replica, its model time, its batch

    def animate_crop(self, avatar: Avatar, crop: np.ndarray | None) -> np.ndarray:
        t0 = time.perf_counter()
        self.avatar_id = avatar.record.avatar_id
        reply = self.last_reply = self.engine.call(self._request(avatar, crop, "animate"))
        self.restore_motion(reply.motion)
        self.times.keypoints = 0.0
        self.times.animator = (time.perf_counter() - t0) * 1e3  # the whole remote call
        frame = unpack_image(reply.frame)
        assert frame is not None, "a replica answered a frame request without a frame"
        return frame

    def crop_pose(self, crop: np.ndarray | None) -> Pose | None:
        # Keypoints only (set_reference, the neutral pose).
        if crop is None:
            return None
        avatar_id = self.avatar_id or self.animator.avatars()[0].avatar_id
        avatar = self.animator.get(avatar_id)
        return self.engine.call(self._request(avatar, crop, "pose")).pose

    def _request(self, avatar: Avatar, crop: np.ndarray | None, op: str) -> FrameRequest:
        return FrameRequest(
            *self.engine.sources(avatar),
            pack_image(crop, self.engine.codec),
            self.motion_state(),
            op,  # type: ignore[arg-type]
            self.engine.codec,
        )


class RayEngine:
    """Sessions' frames to the `iwarp` Serve application, with failover between replicas."""

    name = "ray"

    def __init__(
        self,
        animator: Animator,
        handle: Any,
        address: str,
        owns_cluster: bool,
        codec: str = "jpeg",
        call_timeout: float = 5.0,
        retry_window: float = 30.0,
    ) -> None:
        self.animator = animator  # avatars (the edge is their home) and the crop size
        self.handle = handle
        self.address = address
        self.owns_cluster = owns_cluster  # an embedded local cluster: shut it down on close
        self.codec = codec
        self.call_timeout = call_timeout
        self.retry_window = retry_window
        self.stats: dict[str, ReplicaStats] = {}
        self.retries = 0  # calls that failed on a lost replica and went to another one
        self.in_flight = 0  # calls waiting for a replica's answer now
        # avatar id -> (avatar, key on the replicas, ObjectRef of its AvatarSources)
        self._sources: dict[str, tuple[Avatar, str, Any]] = {}
        self._lock = threading.Lock()

    # -- sessions ---------------------------------------------------------------------------
    def stream(self) -> RayStream:
        stream = RayStream(self.animator, smoothing=self.animator.smoothing, auto_reference=True)
        stream.engine = self
        return stream

    def sources(self, avatar: Avatar) -> tuple[str, Any]:
        """The avatar's key on the replicas and its face crops in this process's object store,
        put there once (a replica fetches them only on a miss). The key is the id and a hash
        of the crops: two edges' "default" avatars are the same on the replicas only when they
        are the same photos."""
        with self._lock:
            cached = self._sources.get(avatar.record.avatar_id)
            if cached is None or cached[0] is not avatar:
                digest = hashlib.sha256(b"".join(c.tobytes() for c in avatar.crops))
                key = f"{avatar.record.avatar_id}-{digest.hexdigest()[:16]}"
                ref = ray.put(AvatarSources(avatar.record, list(avatar.crops)))
                cached = self._sources[avatar.record.avatar_id] = (avatar, key, ref)
                # Deleted avatars' crops leave the object store with their last reference.
                live = {r.avatar_id for r in self.animator.avatars()}
                for gone in [a for a in self._sources if a not in live]:
                    del self._sources[gone]
            return cached[1], cached[2]

    def call(self, request: FrameRequest) -> FrameReply:
        """One frame on some replica; on a lost replica, the same request (same motion state)
        on another, until `retry_window` seconds have passed."""
        deadline = time.monotonic() + self.retry_window
        handle = self.handle.options(multiplexed_model_id=request.avatar_key).animate
        attempt = 0
        while True:
            t0 = time.perf_counter()
            response = handle.remote(request)
            with self._lock:
                self.in_flight += 1
            try:
                reply: FrameReply = response.result(timeout_s=self.call_timeout)
            except _REPLICA_LOST as exc:
                response.cancel()
                attempt += 1
                with self._lock:
                    self.retries += 1
                if time.monotonic() > deadline:
                    raise EngineUnavailable(
                        f"no animation replica answered for {self.retry_window:g} s ({exc})",
                        "check the Ray cluster (ray status) and the replicas' logs",
                    ) from exc
                log.warning("replica lost (%s); retrying on another", type(exc).__name__)
                time.sleep(min(0.05 * attempt, 0.5))  # let the router drop the dead replica
                continue
            finally:
                with self._lock:
                    self.in_flight -= 1
            with self._lock:
                self.stats.setdefault(reply.replica, ReplicaStats()).observe(
                    time.perf_counter() - t0
                )
            return reply

    # -- server ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        try:
            app = serve.status().applications[APP_NAME]
            states = app.deployments[DEPLOYMENT_NAME].replica_states
        except Exception as exc:  # the controller is unreachable: say so, do not fail
            return {"engine": self.name, "address": self.address, "error": str(exc)}
        return {
            "engine": self.name,
            "address": self.address,
            "replicas_up": int(states.get("RUNNING", 0)),
            "replica_states": dict(states),
            "application": getattr(app.status, "value", str(app.status)),
            "retries": self.retries,
        }

    def replica_stats(self) -> dict[str, ReplicaStats]:
        with self._lock:
            return dict(self.stats)

    def close(self) -> None:
        if self.owns_cluster:
            serve.shutdown()
            ray.shutdown()


def connect(address: str | None, cpus: int = 0) -> None:
    """Joins the Ray cluster at `address` (HOST:PORT or auto; None: starts an embedded one on
    this machine, with at least `cpus` CPU slots). IwarpError, at once, when it cannot be
    reached."""
    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        if address is None:
            # Replicas reserve CPUs; on a small machine let them share the cores rather
            # than wait for ones that do not exist.
            ray.init(
                num_cpus=max(os.cpu_count() or 1, cpus),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            with _native_stderr_held() as held:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                held.keep = True
    except ConnectionError as exc:
        raise IwarpError(
            f"cannot connect to a Ray cluster at {address!r} ({exc})",
            "start one with 'ray start --head' or give --ray-address HOST:PORT of its head",
        ) from exc


def start_ray_engine(
    animator: Animator,
    address: str | None = None,
    replicas: int = 2,
    backend: str = "auto",
    checkpoint: str | None = None,
    threads: int = 0,
    max_batch: int = 0,
    codec: str = "jpeg",
) -> RayEngine:
    """Connects (see `connect`), deploys the animator application if it is not running yet
    (else uses it as it is: several edges share one deployment), waits for a replica to
    answer, and returns the engine."""
    connect(address, replicas * max(1, threads))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    try:
        handle = serve.get_app_handle(APP_NAME)
        log.info("using the running Serve application %r", APP_NAME)
    except Exception:  # not deployed yet (RayServeException): this edge deploys it
        handle = deploy_replicas(replicas, backend, checkpoint, threads, max_batch, gpus)
    engine = RayEngine(animator, handle, address or "local", address is None, codec)
    info = handle.info.remote().result(timeout_s=120)
    if info["image_size"] != animator.backend.image_size:
        engine.close()
        raise IwarpError(
            f"the replicas run {info['image_size']} px weights, this edge "
            f"{animator.backend.image_size} px",
            "give every iwarp serve edge the same --checkpoint as the deployment",
        )
    return engine


def deploy_replicas(
    replicas: int,
    backend: str,
    checkpoint: str | None,
    threads: int,
    max_batch: int,
    gpus: int,
) -> Any:
    """Deploys the `iwarp` Serve application with `replicas` replicas; its handle."""
    # A GPU per replica where the cluster has GPUs; on CPUs, `threads` cores each (ORT/torch
    # intra-op threads), so Ray packs replicas onto nodes by cores.
    if gpus:
        actor_options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
    else:
        actor_options = {"num_cpus": max(1, threads)}
    # Batching pays where one call of B frames costs about one frame: on a GPU (docs/SCALING.md).
    batch = max_batch or (8 if gpus else 1)
    # A replica takes no more frames than one batch: the router sends the next one to another
    # replica (which builds the avatar on a miss) instead of queueing it behind a busy one, so
    # sessions that share an avatar spread over replicas.
    app = AnimatorDeployment.options(
        num_replicas=replicas, ray_actor_options=actor_options, max_ongoing_requests=batch
    ).bind(backend, checkpoint, threads, batch, 0.002)
    return _run_app(app, replicas)


def _run_app(app: Any, replicas: int, timeout: float = 600.0) -> Any:
    """serve.run, which waits as long as the replicas cannot be placed: bounded here."""
    outcome: dict[str, Any] = {}

    def deploy() -> None:
        try:
            outcome["handle"] = serve.run(app, name=APP_NAME, route_prefix=None)
        except Exception as exc:  # a replica failed to start (bad backend, missing weights)
            outcome["error"] = exc

    thread = threading.Thread(target=deploy, daemon=True, name="iwarp-deploy")
    thread.start()
    thread.join(timeout)
    if "error" in outcome:
        raise IwarpError(
            f"the animation replicas failed to start ({outcome['error']})",
            "check --backend and --checkpoint on the worker nodes (ray logs)",
        )
    if "handle" not in outcome:
        raise IwarpError(
            f"{replicas} animation replicas did not start within {timeout:g} s",
            "the cluster lacks the CPUs or GPUs they need (see 'ray status'): fewer --replicas",
        )
    return outcome["handle"]


class _Held:
    keep = False


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[_Held]:
    """Holds what Ray's C++ side writes to fd 2 while connecting (a line a second while it
    retries a wrong address), and writes it out only if the block sets `keep`: a failed
    connect is one line of ours, not twenty of Ray's."""
    held = _Held()
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                capture.seek(0)
                os.write(2, capture.read())


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Ray's own connect waits ~60 s on a wrong address: a plain TCP connect says it at once."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise IwarpError(
            f"bad --ray-address {address!r}", "give HOST:PORT of the Ray head (e.g. 10.0.0.5:6379)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()
    except OSError as exc:
        raise IwarpError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})",
            "start its head with 'ray start --head --port PORT', or fix --ray-address",
        ) from exc


def replica_actor_name(replica: str) -> str:
    """The Ray actor behind a replica id (as in iwarp_engine_frames_total{replica=...})."""
    return f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica}"


def kill_replica(replica: str, address: str | None = "auto") -> None:
    """Kills one replica's actor, as a crash would (benchmarks and tests of failover); Serve
    starts a new one by itself."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    ray.kill(ray.get_actor(replica_actor_name(replica), namespace="serve"), no_restart=True)
