"""Offline face detection (MediaPipe), square head crops, and a smoothed tracker for live video.

Crop framing follows VoxCeleb/FOMM: the whole head with some hair and neck, the face a little
below the centre. The defaults were fitted on FOMM/LIA Vox-style images and clips (see
`DEFAULT_SCALE`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from iwarp.errors import NoFaceError
from iwarp.media import to_rgb

__all__ = [
    "DEFAULT_SCALE",
    "DEFAULT_SHIFT_Y",
    "DETECT_EVERY",
    "CropBox",
    "FaceBox",
    "FaceDetector",
    "FaceTracker",
    "OneEuroFilter",
    "clip_crop_box",
    "crop_and_resize",
    "detect_face_or_raise",
    "face_crop_box",
]

# Crop side in units of FaceBox.size, and centre offset (positive = down) from the point halfway
# between the eyes' centre and the mouth, also in units of size. On 45 Vox-style frames (FOMM and
# LIA demos) the frame is 1.68x (full model) / 1.75x (short model) the box and its centre sits
# 0.18-0.19 x size above that point. A slightly larger, slightly higher square keeps big hair
# (astronaut, d13) in view while the chin and some neck stay in.
DEFAULT_SCALE = 1.8
DEFAULT_SHIFT_Y = -0.2
# A face moves little between frames a few hundredths of a second apart: the tracker (live) and
# the training crops (one box per clip) look for it on one frame in this many.
DETECT_EVERY = 5

NO_FACE_HINT = "use a photo where one face is clearly visible, frontal, and at least ~64 px wide"


@dataclass(frozen=True)
class FaceBox:
    """A detected face in pixels: box corners, confidence and MediaPipe's 6 keypoints.

    Keypoints, in order: right eye, left eye, nose tip, mouth centre, right ear, left ear (the
    subject's right, i.e. image left for a frontal face).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    keypoints: tuple[tuple[float, float], ...] = ()

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def size(self) -> float:
        return max(self.width, self.height)


@dataclass(frozen=True)
class CropBox:
    """A square crop in pixels (centre and side); it may extend beyond the frame."""

    cx: float
    cy: float
    side: float

    def scaled(self, f: float) -> CropBox:
        """The same centre with the side multiplied by `f`."""
        return CropBox(self.cx, self.cy, self.side * f)

    def as_int(self) -> tuple[int, int, int, int]:
        """Integer (x0, y0, x1, y1) with x1 - x0 == y1 - y0, the square's pixel bounds."""
        side = max(1, math.floor(self.side + 0.5))
        x0 = math.floor(self.cx - side / 2.0 + 0.5)
        y0 = math.floor(self.cy - side / 2.0 + 0.5)
        return x0, y0, x0 + side, y0 + side

    def as_array(self) -> np.ndarray:
        return np.array([self.cx, self.cy, self.side], dtype=np.float64)


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    """`frame` itself when it is already what `to_rgb` returns (the runtime converts each
    frame once, then tracks and crops it), else its conversion."""
    if (
        type(frame) is np.ndarray
        and frame.dtype == np.uint8
        and frame.ndim == 3
        and frame.shape[2] == 3
        and frame.shape[0] > 0
        and frame.shape[1] > 0
        and frame.flags.c_contiguous
    ):
        return frame
    return to_rgb(frame)


# --------------------------------------------------------------------------- detection


# What MediaPipe's C++ side (TFLite, absl) prints straight to file descriptor 2 each time a graph
# starts. No setting in mediapipe 0.10.21 turns it off (GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL and
# absl's Python logging do not reach it), so it is filtered where it is made.
_NATIVE_NOISE = (
    b"Created TensorFlow Lite XNNPACK delegate",
    b"All log messages before absl::InitializeLog()",
    b"inference_feedback_manager.cc",
)
_STDERR_LOCK = threading.Lock()  # fd 2 is process-wide: one redirection at a time


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Points fd 2 at a temporary file for the block, then writes back every line that is
    not MediaPipe's start-up noise (other threads' output is delayed, never lost)."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 (a daemon) or a closed sys.stderr: nothing to do
            yield
            return
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not any(noise in line for noise in _NATIVE_NOISE)
            ]
            if kept:
                os.write(2, b"".join(kept))


class FaceDetector:
    """MediaPipe face detection, created on first use; `detect` returns the largest face.

    `model="full"` (MediaPipe's full-range model) finds small and distant faces; `"short"` is
    faster (~2 ms vs ~5 ms at 512 px) and better on large close-ups. With `fallback=True` the
    other model is tried when the chosen one finds nothing: the full-range model misses some
    close-ups, paintings and dolls that the short one finds, and the other way round for small
    faces. Safe to share between threads (calls are serialised).
    """

    def __init__(
        self,
        model: Literal["full", "short"] = "full",
        min_confidence: float = 0.5,
        fallback: bool = True,
    ) -> None:
        if model not in ("full", "short"):
            raise ValueError(f"model must be 'full' or 'short', got {model!r}")
        self.model = model
        self.min_confidence = float(min_confidence)
        self.fallback = fallback
        self.calls = 0  # number of detect() calls, for tests and cost accounting
        self._graphs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _graph(self, model: str) -> Any:
        graph = self._graphs.get(model)
        if graph is None:
            # Imported here: mediapipe takes ~0.7 s to import.
            from mediapipe.python.solutions import face_detection

            with native_noise_filtered():
                graph = face_detection.FaceDetection(
                    model_selection=1 if model == "full" else 0,
                    min_detection_confidence=self.min_confidence,
                )
                # The graph's threads log as it starts; one frame through it waits for that.
                graph.process(np.zeros((16, 16, 3), np.uint8))
            self._graphs[model] = graph
        return graph

    def detect(self, frame: np.ndarray) -> FaceBox | None:
        """Return the largest face with score >= min_confidence, or None."""
        rgb = _as_rgb(frame)
        order = [self.model]
        if self.fallback:
            order.append("short" if self.model == "full" else "full")
        with self._lock:
            self.calls += 1
            for model in order:
                face = self._largest(self._graph(model).process(rgb), rgb.shape[1], rgb.shape[0])
                if face is not None:
                    return face
        return None

    def _largest(self, result: Any, w: int, h: int) -> FaceBox | None:
        best: FaceBox | None = None
        for det in result.detections or ():
            score = float(det.score[0]) if det.score else 0.0
            if score < self.min_confidence:
                continue
            bb = det.location_data.relative_bounding_box
            x0 = min(max(bb.xmin * w, 0.0), float(w))
            y0 = min(max(bb.ymin * h, 0.0), float(h))
            x1 = min(max((bb.xmin + bb.width) * w, 0.0), float(w))
            y1 = min(max((bb.ymin + bb.height) * h, 0.0), float(h))
            if x1 - x0 < 1.0 or y1 - y0 < 1.0:
                continue  # box entirely outside the frame
            kps = tuple((k.x * w, k.y * h) for k in det.location_data.relative_keypoints)
            face = FaceBox(x0, y0, x1, y1, score, kps)
            if best is None or face.width * face.height > best.width * best.height:
                best = face
        return best

    def close(self) -> None:
        """Release the MediaPipe graphs (they are recreated if `detect` is called again)."""
        with self._lock:
            for graph in self._graphs.values():
                graph.close()
            self._graphs.clear()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_face_or_raise(frame: np.ndarray, detector: FaceDetector, what: str) -> FaceBox:
    """Detect the largest face or raise NoFaceError naming `what` (e.g. the file name)."""
    face = detector.detect(frame)
    if face is None:
        raise NoFaceError(f"no face found in {what}", NO_FACE_HINT)
    return face


# --------------------------------------------------------------------------- crop boxes


def _anchor(face: FaceBox) -> tuple[float, float]:
    """Horizontal box centre and, vertically, halfway between the eyes' centre and the mouth.

    The two MediaPipe models place their boxes ~0.06 x size apart vertically but agree on the
    keypoints, so anchoring on them makes the crop independent of which model fired.
    """
    cx, cy = face.center
    if len(face.keypoints) >= 4:
        eyes_y = (face.keypoints[0][1] + face.keypoints[1][1]) / 2.0
        cy = (eyes_y + face.keypoints[3][1]) / 2.0
    return cx, cy


def face_crop_box(
    face: FaceBox, scale: float = DEFAULT_SCALE, shift_y: float = DEFAULT_SHIFT_Y
) -> CropBox:
    """A square head crop: side = scale x face.size, centre moved by shift_y x size (down > 0)."""
    cx, cy = _anchor(face)
    size = face.size
    return CropBox(cx, cy + shift_y * size, scale * size)


def clip_crop_box(
    faces: Sequence[FaceBox | None],
    scale: float = DEFAULT_SCALE,
    shift_y: float = DEFAULT_SHIFT_Y,
    margin: float = 0.1,
) -> CropBox | None:
    """One fixed crop for a whole clip (training data), or None when no frame has a face.

    Centre: median of the per-frame crop centres. Side: the larger of scale x median face size
    and what keeps every detected face box inside the crop with `margin` (fraction of the side)
    to spare, so the face never leaves the crop as the head moves.
    """
    found = [f for f in faces if f is not None]
    if not found:
        return None
    boxes = np.array([face_crop_box(f, scale, shift_y).as_array() for f in found])
    cx, cy = np.median(boxes[:, 0]), np.median(boxes[:, 1])
    side = scale * float(np.median([f.size for f in found]))
    reach = max(max(abs(f.x0 - cx), abs(f.x1 - cx), abs(f.y0 - cy), abs(f.y1 - cy)) for f in found)
    side = max(side, 2.0 * reach / (1.0 - 2.0 * margin))
    return CropBox(float(cx), float(cy), float(side))


def _span(lo: int, hi: int, n: int) -> tuple[int, int, int, int]:
    """For pixels lo..hi-1 of an axis of length n, clamped into it: (start, stop) of the part
    inside (never empty) and how many copies of its first / last pixel pad it before / after."""
    start = min(max(lo, 0), n - 1)
    stop = max(min(hi, n), start + 1)
    before = min(max(start - lo, 0), (hi - lo) - (stop - start))
    return start, stop, before, (hi - lo) - (stop - start) - before


def crop_and_resize(frame: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Cut the square `box` out of `frame` (edge pixels replicated outside it), as size x size.

    Shrinking by more than ~1.5x uses INTER_AREA on the integer-aligned square (area averaging
    avoids aliasing; the sub-pixel rounding is invisible after the shrink); otherwise one
    sub-pixel-exact warpAffine with bilinear sampling does cut, pad and resize at once.
    """
    rgb = _as_rgb(frame)
    if size < 1 or not box.side > 0:
        raise ValueError(f"need size >= 1 and a positive box side, got {size} and {box.side}")
    h, w = rgb.shape[:2]
    k = size / box.side
    if k < 1.0 / 1.5:
        x0, y0, x1, y1 = box.as_int()
        if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
            patch = rgb[y0:y1, x0:x1]
        else:
            # Edge pixels replicated: the part of the box inside the frame (at least the
            # nearest edge row/column when the box is entirely outside), padded by OpenCV.
            # Same pixels as clamping every index, without gathering the patch in numpy
            # (that cost 7-10 ms a frame once the head neared an edge).
            (xa, xb, left, right), (ya, yb, top, bottom) = _span(x0, x1, w), _span(y0, y1, h)
            patch = cv2.copyMakeBorder(
                rgb[ya:yb, xa:xb], top, bottom, left, right, cv2.BORDER_REPLICATE
            )
        return np.ascontiguousarray(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA))
    # Inverse map: output pixel centre u + 0.5 -> source coordinate, minus 0.5 for pixel centres.
    sx0 = box.cx - box.side / 2.0
    sy0 = box.cy - box.side / 2.0
    inv = np.array(
        [[1.0 / k, 0.0, sx0 + 0.5 / k - 0.5], [0.0, 1.0 / k, sy0 + 0.5 / k - 0.5]], dtype=np.float64
    )
    out = cv2.warpAffine(
        rgb,
        inv,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- smoothing, tracking


def keypoint_filter() -> OneEuroFilter:
    """The live paths' keypoint smoothing (and the evaluation's measure of it). Keypoints move
    in [-1, 1]; a low cutoff removes detector jitter, beta keeps fast motion (a quick turn, a
    mouth opening) from lagging."""
    return OneEuroFilter(min_cutoff=1.5, beta=8.0)


class OneEuroFilter:
    """One-Euro low-pass filter (Casiez et al., CHI 2012) for numpy arrays of any fixed shape.

    Slow motion is smoothed hard (cutoff `min_cutoff` Hz), fast motion passes with little lag
    (cutoff grows by `beta` x speed). Speeds are in input units per second, so `beta` depends
    on the units: normalise inputs (e.g. to frame size) to make one setting fit all. Without
    timestamps, samples are taken to be 1 / `freq` seconds apart.
    """

    def __init__(
        self,
        min_cutoff: float = 1.0,
        beta: float = 0.0,
        d_cutoff: float = 1.0,
        freq: float = 30.0,
    ) -> None:
        if min_cutoff <= 0 or d_cutoff <= 0 or freq <= 0:
            raise ValueError("min_cutoff, d_cutoff and freq must be positive")
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self.freq = float(freq)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample passes through unchanged."""
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(
        self, x: np.ndarray | Sequence[float] | float, t: float | None = None
    ) -> np.ndarray:
        """Filter one sample (timestamp `t` in seconds, optional) and return the estimate."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._dx is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        if x.shape != self._x.shape:
            raise ValueError(f"sample shape {x.shape} differs from the first {self._x.shape}")
        if t is not None and self._t is not None:
            dt = t - self._t
            if dt <= 0:
                return self._x.copy()  # duplicate or out-of-order timestamp: keep the estimate
        else:
            dt = 1.0 / self.freq
        self._t = t
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        return self._x.copy()

    def sequence(self, samples: np.ndarray) -> np.ndarray:
        """Filters samples taken 1 / `freq` apart, in order along axis 0, from this filter's
        state; returns the estimates stacked the same way."""
        return np.stack([self(x) for x in samples])


class FaceTracker:
    """Stable head crop boxes for live video.

    Runs the detector every `detect_every` frames, and on every frame after a miss; in between
    it reuses the last detection. Boxes are smoothed with a One-Euro filter on coordinates
    normalised by the frame's longer side, so settings do not depend on resolution. When the
    face is lost the last box is held for `hold_frames` frames, then `update` returns None.
    """

    def __init__(
        self,
        detector: FaceDetector | None = None,
        detect_every: int = DETECT_EVERY,
        hold_frames: int = 30,
        scale: float = DEFAULT_SCALE,
        shift_y: float = DEFAULT_SHIFT_Y,
        min_cutoff: float = 0.5,
        beta: float = 5.0,
    ) -> None:
        if detect_every < 1 or hold_frames < 0:
            raise ValueError("detect_every must be >= 1 and hold_frames >= 0")
        self.detector = detector if detector is not None else FaceDetector()
        self._owns_detector = detector is None  # a detector passed in is its giver's to close
        self.detect_every = detect_every
        self.hold_frames = hold_frames
        self.scale = scale
        self.shift_y = shift_y
        self.filter = OneEuroFilter(min_cutoff=min_cutoff, beta=beta, d_cutoff=1.0)
        self.detections = 0  # detector runs by this tracker
        self.reset()

    def close(self) -> None:
        """Frees the detector's MediaPipe graphs (native memory) when this tracker made it."""
        if self._owns_detector:
            self.detector.close()

    def reset(self) -> None:
        """Forget the face and the smoothing state (e.g. when the video source changes)."""
        self.filter.reset()
        self._raw: np.ndarray | None = None  # last detected box, normalised
        self._smoothed: CropBox | None = None
        self._since_detect = 0
        self._missed = 0  # consecutive frames without a face
        self.face: FaceBox | None = None  # last detection, in pixels

    def update(self, frame: np.ndarray, timestamp: float | None = None) -> CropBox | None:
        """Feed the next frame; return the smoothed crop box, or None when there is no face."""
        h, w = frame.shape[:2]
        norm = float(max(h, w))
        run = self._raw is None or self._missed > 0 or self._since_detect >= self.detect_every
        if run:
            self.detections += 1
            self._since_detect = 0
            face = self.detector.detect(frame)
            if face is None:
                self._missed += 1
                if self._smoothed is None or self._missed > self.hold_frames:
                    if self._smoothed is not None:
                        self.filter.reset()  # start afresh when the face comes back
                    self._smoothed = None
                    self._raw = None
                    return None
                return self._smoothed  # hold the last box
            self._missed = 0
            self.face = face
            self._raw = face_crop_box(face, self.scale, self.shift_y).as_array() / norm
        self._since_detect += 1
        assert self._raw is not None
        cx, cy, side = self.filter(self._raw, timestamp) * norm
        self._smoothed = CropBox(float(cx), float(cy), float(side))
        return self._smoothed
