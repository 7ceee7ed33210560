"""The replica side: a Ray Serve deployment that runs the runtime's `Animator`.

A replica is stateless per session. Each request carries what the frame needs:
- the face crop the edge cut out (the edge runs face tracking, where the camera frame is),
- the session's motion state (`DrivingStream.motion_state()`: neutral pose, smoothing, last
  pose), which comes back updated with the animated frame,
- the avatar's key (its id and a hash of its crops), by which Serve routes the request
  (`@serve.multiplexed`) to a replica that already holds that avatar's encoded sources, and a
  reference to the avatar's face crops in the edge's object store, from which any other
  replica builds it on a miss.
So a replica can die between two frames and the next one, on another replica, comes out as it
would have: nothing is lost but the time to rebuild the avatar.

Frames of several sessions that arrive together are batched (`@serve.batch`): their keypoints
run in one network call; the animator runs per session (avatars differ in size).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve

from iwarp.cluster import wire
from iwarp.graphs import image_to_tensor
from iwarp.runtime.animator import Animator, Avatar

APP_NAME = "iwarp"
DEPLOYMENT_NAME = "Animator"
# Encoded avatars one replica keeps (least recently used evicted): each is a few MB at 256 px.
MAX_AVATARS_PER_REPLICA = 16


# -- the deployment ---------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=2.0)
class AnimatorDeployment:
    """One replica: the runtime's Animator on `backend`, its avatars multiplexed by key."""

    def __init__(
        self,
        backend: str = "auto",
        checkpoint: str | None = None,
        threads: int = 0,
        max_batch: int = 1,
        batch_wait_s: float = 0.002,
    ) -> None:
        self.animator = Animator.from_pretrained(
            backend, checkpoint, threads=threads, show_progress=False
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        # One model thread: frames queue here, and the event loop stays free to take in the
        # requests that form the next batch.
        self._model = ThreadPoolExecutor(1, thread_name_prefix="iwarp-replica")
        self.run_batch.set_max_batch_size(max(1, max_batch))
        self.run_batch.set_batch_wait_timeout_s(batch_wait_s)

    def info(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "actor_name": ray.get_runtime_context().get_actor_name(),
            "node": ray.get_runtime_context().get_node_id(),
            "backend": self.animator.backend.describe(),
            "image_size": self.animator.backend.image_size,
        }

    async def animate(self, request: wire.FrameRequest) -> wire.FrameReply:
        # Serve's loader takes only the key; it runs in this task, so it sees this request's
        # reference to the crops through the context (nothing kept once the avatar is built).
        wire.REQUEST_SOURCES.set(request.sources)
        avatar = await self.avatar(request.avatar_key)
        return await self.run_batch((avatar, request))

    @serve.multiplexed(max_num_models_per_replica=MAX_AVATARS_PER_REPLICA)
    async def avatar(self, avatar_key: str) -> Avatar:
        """A miss: fetch the face crops from the edge's object store and encode them."""
        sources: wire.AvatarSources = await wire.REQUEST_SOURCES.get()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._model, self.animator.avatar_from_crops, sources.record, sources.crops
        )

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def run_batch(
        self, jobs: list[tuple[Avatar, wire.FrameRequest]]
    ) -> list[wire.FrameReply]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model, self._run, jobs)

    def _run(self, jobs: list[tuple[Avatar, wire.FrameRequest]]) -> list[wire.FrameReply]:
        t0 = time.perf_counter()
        poses = self._keypoints([wire.unpack_image(request.crop) for _, request in jobs])
        replies = []
        for (avatar, request), pose in zip(jobs, poses, strict=True):
            if request.op == "pose":
                replies.append(wire.FrameReply(self.replica, pose=pose, motion=request.motion))
                continue
            # The session's state for this one frame (its face tracker, unused here, only
            # starts MediaPipe when asked to track, which the edge did).
            stream = self.animator.stream()
            stream.restore_motion(request.motion)
            frame = stream.animate_pose(avatar, pose)
            packed = wire.pack_image(frame, request.codec)
            replies.append(wire.FrameReply(self.replica, packed, motion=stream.motion_state()))
        share = (time.perf_counter() - t0) / len(jobs)
        for reply in replies:
            reply.model_s, reply.batch = share, len(jobs)
        return replies

    def _keypoints(self, crops: list[np.ndarray | None]) -> list[wire.Pose | None]:
        """`DrivingStream.crop_pose` for a batch: the faces' poses in one network call."""
        faces = [c for c in crops if c is not None]
        if not faces:
            return [None] * len(crops)
        detected = self.animator.backend.detect(image_to_tensor(np.stack(faces)))
        poses: list[wire.Pose | None] = []
        n = 0
        for crop in crops:
            if crop is None:
                poses.append(None)
            else:
                poses.append(detected.select(n))
                n += 1
        return poses
