"""What travels between an edge and a replica (see deployment.py for why each part is there).

Kept apart from the deployment class: Ray Serve ships that class to the replicas by value, and
a module-level object it uses (the context variable below) must be imported there by
reference instead.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from iwarp.motion import Pose
from iwarp.runtime.avatar_store import AvatarRecord

# The request being served, for Serve's multiplexed loader (which gets only the avatar key):
# it runs in the request's own task, so it sees this request's reference to the crops.
REQUEST_SOURCES: ContextVar[Any] = ContextVar("iwarp_request_sources")


@dataclass
class AvatarSources:
    """What a replica needs to build an avatar: its record and face crops (model size)."""

    record: AvatarRecord
    crops: list[np.ndarray]


@dataclass
class FrameRequest:
    avatar_key: str  # the avatar's id and a hash of its crops: what Serve routes by
    sources: Any  # ray.ObjectRef[AvatarSources], fetched only when the replica lacks the avatar
    crop: bytes | np.ndarray | None  # the face crop (see pack_image); None: no face in view
    motion: dict[str, Any]  # DrivingStream.motion_state() before this frame
    op: Literal["animate", "pose"] = "animate"  # "pose": keypoints only (the neutral pose)
    codec: str = "jpeg"  # how the reply's frame travels (see pack_image)


@dataclass
class FrameReply:
    replica: str
    frame: bytes | np.ndarray | None = None  # op "animate"
    pose: Pose | None = None  # op "pose"
    motion: dict[str, Any] = field(default_factory=dict)  # after this frame
    model_s: float = 0.0  # keypoints + animator on the replica, this frame's share of the batch
    batch: int = 1  # frames in the batch this one ran in


def pack_image(image: np.ndarray | None, codec: str) -> bytes | np.ndarray | None:
    """An S x S RGB image for the wire: JPEG bytes (q 90: ~20 KB instead of 196 KB at 256 px,
    which matters across machines) or the raw array."""
    if image is None or codec == "raw":
        return image
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def unpack_image(data: bytes | np.ndarray | None) -> np.ndarray | None:
    if data is None or isinstance(data, np.ndarray):
        return data
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
