"""The Animator: avatars in, driving frames in, avatar frames out, over any backend.

Per avatar (once):   photo -> face crop -> backend.encode_avatar -> cached AvatarFeatures
Per frame (stream):  frame -> face tracking -> crop -> backend.detect -> relative motion
                     -> smoothing -> backend.animate -> frame

A face's pose (keypoints, strength and, for a network with one, expression) is one
`motion.Pose` from `detect` to `animate`. A `DrivingStream` holds what belongs to one driving
video (its face tracker, neutral pose, keypoint and expression filters), so one Animator serves
several streams; `Animator.animate` uses a default stream for the single-user case.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from iwarp.errors import InputError
from iwarp.face import (
    FaceDetector,
    FaceTracker,
    crop_and_resize,
    detect_face_or_raise,
    face_crop_box,
    keypoint_filter,
)
from iwarp.graphs import image_to_tensor, tensor_to_image
from iwarp.media import read_image, to_rgb
from iwarp.motion import Pose, relative_pose
from iwarp.runtime.avatar_store import AvatarRecord, AvatarStore
from iwarp.runtime.backends import AvatarFeatures, Backend, create_backend


@dataclass
class Avatar:
    record: AvatarRecord
    crops: list[np.ndarray]  # face crops at the model size, what the network saw
    features: AvatarFeatures


@dataclass
class StageTimes:
    """Milliseconds spent in each stage for the last frame."""

    face_tracking: float = 0.0
    keypoints: float = 0.0
    animator: float = 0.0
    total: float = 0.0


class FaceCropper(FaceTracker):
    """A face tracker that also cuts the S x S crop it boxes: what the networks see of a
    driving frame (and what `iwarp cam`'s overlay blends over the avatar)."""

    def crop(self, frame: np.ndarray, size: int) -> np.ndarray | None:
        """The face crop of `frame` at `size` x `size`, or None when no face is in view."""
        box = self.update(frame)
        return None if box is None else crop_and_resize(frame, box, size)


# Automatic neutral pose: this many consecutive face frames whose keypoints move less than
# AUTO_NEUTRAL_STEADY (mean per keypoint and frame, in [-1, 1] units: ~1 px at 256) are averaged.
AUTO_NEUTRAL_FRAMES = 5
AUTO_NEUTRAL_STEADY = 0.008


@dataclass
class DrivingStream:
    """Per-driving-video state: face tracker, neutral pose, smoothing, last good pose."""

    animator: Animator
    smoothing: bool = True
    tracker: FaceCropper = field(default_factory=FaceCropper)
    reference: Pose | None = None
    last_pose: Pose | None = None  # what was animated last
    last_driving: Pose | None = None  # raw pose of the last face seen
    times: StageTimes = field(default_factory=StageTimes)
    # Relative motion from the start (live use): the first face seen is the neutral pose at
    # once, replaced by the mean of the first AUTO_NEUTRAL_FRAMES steady frames. A cross-identity
    # driver in absolute mode pastes its own face geometry onto the avatar.
    auto_reference: bool = False
    reference_origin: str = "none"  # none | first face | steady frames | set
    neutral_window: list[Pose] = field(default_factory=list)
    # Every attribute is in exactly one of these two lists (tests/test_runtime.py checks it),
    # so a new field is a decision: what travels to a Ray replica with each frame (the motion
    # carried from frame to frame), and what stays with the process that made it.
    motion_fields: ClassVar[tuple[str, ...]] = (
        "smoothing",
        "reference",
        "last_pose",
        "last_driving",
        "auto_reference",
        "reference_origin",
        "neutral_window",
        "filter",
        "expression_filter",
    )
    local_fields: ClassVar[tuple[str, ...]] = ("animator", "tracker", "times")

    def __post_init__(self) -> None:
        self.filter = keypoint_filter()
        # The expression (standardised openness: 1 = one standard deviation) through a filter
        # of the same settings: at rest its jitter is smoothed, and a blink or a mouth opening
        # (~1 in a frame or two) moves it fast enough that beta opens the cutoff to tens of Hz,
        # so it passes with little lag.
        self.expression_filter = keypoint_filter()

    # The frame path in three steps: face_crop (face tracking, no network) -> crop_pose
    # (keypoints) -> animate_pose (relative motion, smoothing, the animator network). A remote
    # engine (iwarp.cluster) runs the first step where the camera is and the other two where
    # the model is, carrying `motion_state()` along so that nothing lives on the model side.
    def face_crop(self, frame: np.ndarray) -> np.ndarray | None:
        """The S x S face crop of a driving frame, or None when no face is in view."""
        t0 = time.perf_counter()
        crop = self.tracker.crop(to_rgb(frame), self.animator.image_size)
        self.times.face_tracking = (time.perf_counter() - t0) * 1e3  # the crop included
        return crop

    def crop_pose(self, crop: np.ndarray | None) -> Pose | None:
        """The pose of a face crop (None stays None: no face in view)."""
        if crop is None:
            self.times.keypoints = 0.0
            return None
        t0 = time.perf_counter()
        pose = self.animator.detect(crop)
        self.times.keypoints = (time.perf_counter() - t0) * 1e3
        return pose

    def driving_pose(self, frame: np.ndarray) -> Pose | None:
        """The face-tracked pose of a driving frame, or None when no face is in view."""
        return self.crop_pose(self.face_crop(frame))

    def motion_state(self) -> dict[str, Any]:
        """What carries over from one frame to the next (neutral pose, smoothing, last pose):
        the `motion_fields`."""
        return {name: getattr(self, name) for name in self.motion_fields}

    def restore_motion(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(self.motion_fields)
        if unknown:
            raise ValueError(f"not motion state: {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)

    def set_reference(self, frame: np.ndarray | None = None) -> bool:
        """Sets the neutral pose for relative motion from `frame` (or the last pose seen);
        None with no pose seen yet clears it. Returns whether a reference is now set."""
        pose = self.driving_pose(frame) if frame is not None else self.last_driving
        self.reference = pose
        self.reference_origin = "set" if pose is not None else "none"
        return pose is not None

    def clear_reference(self) -> None:
        """Absolute motion from now on (also stops the automatic neutral pose)."""
        self.reference = None
        self.reference_origin = "none"
        self.auto_reference = False

    def _take_neutral(self, pose: Pose) -> None:
        """Automatic neutral pose: the first face at once, then the first steady frames (steady
        keypoints; their expression is averaged too)."""
        if self.reference_origin in ("steady frames", "set"):
            return
        if self.reference is None:
            self.reference, self.reference_origin = pose, "first face"
        window = [*self.neutral_window, pose][-AUTO_NEUTRAL_FRAMES:]
        steps = [float(np.abs(b.points - a.points).mean()) for a, b in itertools.pairwise(window)]
        if len(window) == AUTO_NEUTRAL_FRAMES and max(steps) < AUTO_NEUTRAL_STEADY:
            self.reference = Pose.join(window, np.stack).map(
                lambda a: a.mean(axis=0).astype(np.float32)
            )
            self.reference_origin = "steady frames"
            window = []
        self.neutral_window = window

    def animate(self, avatar_id: str, frame: np.ndarray) -> np.ndarray:
        """One driving frame -> one avatar frame (model size). Never fails on a faceless frame:
        it holds the last good pose, or shows the avatar's photo before any face was seen."""
        t0 = time.perf_counter()
        avatar = self.animator.get(avatar_id)
        out = self.animate_crop(avatar, self.face_crop(frame))
        self.times.total = (time.perf_counter() - t0) * 1e3
        return out

    def animate_crop(self, avatar: Avatar, crop: np.ndarray | None) -> np.ndarray:
        """`animate` from the face crop on (None: no face in view)."""
        return self.animate_pose(avatar, self.crop_pose(crop))

    def animate_pose(self, avatar: Avatar, pose: Pose | None) -> np.ndarray:
        """`animate` from the driver's raw pose on (None: no face in view)."""
        if pose is not None:
            self.last_driving = pose
            if self.auto_reference:
                self._take_neutral(pose)
            pose = self._relative(avatar, pose)
            if self.smoothing:
                pose = self._smooth(pose)
            self.last_pose = pose
        elif self.last_pose is not None:
            pose = self.last_pose
        else:
            self.times.animator = 0.0
            return avatar.crops[0].copy()
        t0 = time.perf_counter()
        out = self.animator.render(avatar, pose)
        self.times.animator = (time.perf_counter() - t0) * 1e3
        return out

    def _relative(self, avatar: Avatar, pose: Pose) -> Pose:
        if self.reference is None:
            return pose
        # The first source is the avatar's canonical face: move it as the driver moves (its
        # keypoints, strength and expression alike).
        source = avatar.features.pose.select(0)
        return relative_pose(source, pose, self.reference).map(lambda a: a.astype(np.float32))

    def _smooth(self, pose: Pose) -> Pose:
        """The keypoints and the expression through their One-Euro filters (strength as it
        is)."""
        points = self.filter(pose.points).astype(np.float32)
        expression = pose.expression
        if expression is not None:
            expression = self.expression_filter(expression).astype(np.float32)
        return Pose(points, pose.strength, expression)

    def reset(self) -> None:
        self.tracker.reset()
        self.filter.reset()
        self.expression_filter.reset()
        self.last_pose = None
        self.last_driving = None

    def close(self) -> None:
        """Frees the face tracker's MediaPipe graphs (native memory) now, not at GC."""
        self.tracker.close()


class Animator:
    def __init__(
        self,
        backend: Backend,
        store: AvatarStore | None = None,
        smoothing: bool = True,
        detector: FaceDetector | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.smoothing = smoothing
        self._detector = detector or FaceDetector()
        self._avatars: dict[str, Avatar] = {}
        self._lock = threading.Lock()
        self._default_stream: DrivingStream | None = None
        if store is not None:
            for record, photos in store.load_all():
                self._avatars[record.avatar_id] = self._build(record, photos)

    @classmethod
    def from_pretrained(
        cls,
        backend: str = "auto",
        checkpoint: str | Path | None = None,
        store_dir: str | Path | None = None,
        build_dir: str | Path | None = None,
        device: str | None = None,
        threads: int = 0,
        smoothing: bool = True,
        show_progress: bool = True,
        precision: str | None = None,
    ) -> Animator:
        """The shipped weights (or `checkpoint`) on the chosen backend; ONNX graphs are built
        on first use and reused after. `store_dir` keeps avatars across restarts."""
        engine = create_backend(
            backend, checkpoint, device, build_dir, threads, show_progress, precision
        )
        store = AvatarStore(store_dir) if store_dir else None
        return cls(engine, store, smoothing)

    # -- the network, for driving streams ----------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of the face crops the network takes and of the frames it makes."""
        return self.backend.image_size

    def detect(self, crop: np.ndarray) -> Pose:
        """The pose of one S x S uint8 face crop: keypoints (1, K, 2), strength (1, K) and
        expression (1, E) or None."""
        return self.backend.detect(image_to_tensor(crop))

    def render(self, avatar: Avatar, pose: Pose) -> np.ndarray:
        """The avatar at this (already relative, smoothed) pose: an S x S uint8 frame."""
        return tensor_to_image(self.backend.animate(avatar.features, pose)[0])

    # -- avatars ----------------------------------------------------------------------------
    def add_avatar(
        self,
        images: Sequence[np.ndarray | str | Path],
        avatar_id: str | None = None,
        owner: str = "",
        name: str = "",
    ) -> str:
        """Registers 1..N photos of one face as an avatar; returns its id."""
        if not images:
            raise InputError("an avatar needs at least one photo", "give one or more face photos")
        photos = [read_image(i) if isinstance(i, str | Path) else to_rgb(i) for i in images]
        labels = [
            str(i) if isinstance(i, str | Path) else f"photo {n + 1}" for n, i in enumerate(images)
        ]
        record = AvatarRecord(avatar_id or AvatarStore.new_id(), len(photos), owner, name)
        avatar = self._build(record, photos, labels)
        # On disk before anyone can see it: a remove_avatar (a DELETE) can only find an avatar
        # whose photos are already written, so it always deletes them. Written after, they
        # outlived a delete that raced the upload and came back after a restart.
        if self.store is not None:
            self.store.save(record, photos)
        with self._lock:
            self._avatars[record.avatar_id] = avatar
        return avatar.record.avatar_id

    def _build(
        self, record: AvatarRecord, photos: list[np.ndarray], labels: list[str] | None = None
    ) -> Avatar:
        """The avatar of these photos (faces found, cropped, encoded), not registered yet."""
        size = self.backend.image_size
        crops = []
        for i, photo in enumerate(photos):
            label = labels[i] if labels else f"photo {i + 1} of avatar {record.avatar_id}"
            face = detect_face_or_raise(photo, self._detector, label)
            crops.append(crop_and_resize(photo, face_crop_box(face), size))
        return self.avatar_from_crops(record, crops)

    def avatar_from_crops(self, record: AvatarRecord, crops: list[np.ndarray]) -> Avatar:
        """An avatar from its face crops (model size), not registered here: what a remote
        engine's replica builds from the crops the edge made."""
        features = self.backend.encode_avatar(image_to_tensor(np.stack(crops)))
        return Avatar(record, crops, features)

    def remove_avatar(self, avatar_id: str) -> None:
        with self._lock:
            if self._avatars.pop(avatar_id, None) is None:
                raise InputError(f"unknown avatar {avatar_id!r}", "list the avatars to see ids")
        if self.store is not None:
            self.store.delete(avatar_id)

    def get(self, avatar_id: str) -> Avatar:
        try:
            return self._avatars[avatar_id]
        except KeyError:
            raise InputError(
                f"unknown avatar {avatar_id!r}", "add it with add_avatar or list the avatars"
            ) from None

    def avatars(self) -> list[AvatarRecord]:
        with self._lock:
            return [a.record for a in self._avatars.values()]

    # -- driving ----------------------------------------------------------------------------
    def stream(self, auto_reference: bool = False) -> DrivingStream:
        """A new driving stream (one per webcam / video / session). `auto_reference`: relative
        motion from the first frames, the neutral pose taken automatically (live use)."""
        return DrivingStream(self, smoothing=self.smoothing, auto_reference=auto_reference)

    @property
    def default_stream(self) -> DrivingStream:
        if self._default_stream is None:
            self._default_stream = self.stream()
        return self._default_stream

    def animate(self, avatar_id: str, frame: np.ndarray) -> np.ndarray:
        return self.default_stream.animate(avatar_id, frame)

    def set_reference(self, frame: np.ndarray | None = None) -> bool:
        return self.default_stream.set_reference(frame)
