"""Expression transfer: does the avatar open and shut its mouth and eyes when the driver does?

Per frame, MediaPipe's face mesh (the legacy `solutions.face_mesh` graph with its attention
model for lips and eyes; graph and models ship inside the mediapipe wheel, nothing is
downloaded) gives two numbers:

    mouth openness   inner-lip gap (points 13-14) / mouth width (corners 61-291)
    eye openness     eye aspect ratio (Soukupova & Cech 2016), mean of both eyes:
                     (|p2-p6| + |p3-p5|) / (2 |p1-p4|)

Between the driver's series and the output's over the same frames: the Pearson correlation
(does the output open when the driver opens?) and the spread ratio, std(output) /
std(driver) (how much of the driver's motion it shows). An output that does not move at all
(copy-the-source) scores 0 for both: its correlation is undefined, and reported as 0.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iwarp.face import native_noise_filtered
from iwarp.media import read_video, write_video

OPENNESS_NAME = (
    "MediaPipe face mesh (legacy solutions.face_mesh, refine_landmarks, static images) per "
    "frame: mouth = inner-lip gap (13-14) / mouth width (61-291); eyes = eye aspect ratio, "
    "mean of both eyes. Per clip, between driver and output: Pearson r and std(output) / "
    "std(driver); an output that does not move scores r = 0 (undefined) and spread 0"
)
MEASURES = ("mouth", "eyes")

# Face mesh indices: inner lips (upper, lower), mouth corners; each eye as p1..p6 of the eye
# aspect ratio (corner, upper lid x2, corner, lower lid x2).
_INNER_LIPS = (13, 14)
_MOUTH_CORNERS = (61, 291)
_EYES = ((33, 160, 158, 133, 153, 144), (362, 385, 387, 263, 373, 380))

# The fewest frames with a face in both series for a correlation to mean anything.
MIN_FRAMES = 10
# Below this std a series is taken as still (its correlation is undefined).
_STILL_STD = 1e-6


def openness(points: np.ndarray) -> tuple[float, float]:
    """(mouth, eyes) openness of one face from its mesh points (N >= 468, 2) in pixels."""
    p = np.asarray(points, dtype=np.float64)

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(p[a] - p[b]))

    mouth = dist(*_INNER_LIPS) / max(dist(*_MOUTH_CORNERS), 1e-6)
    ears = [
        (dist(p2, p6) + dist(p3, p5)) / max(2.0 * dist(p1, p4), 1e-6)
        for p1, p2, p3, p4, p5, p6 in _EYES
    ]
    return mouth, float(np.mean(ears))


class FaceMeshOpenness:
    """Mouth and eye openness of RGB uint8 images; NaN where the mesh finds no face. Each image
    is measured on its own (static mode: no tracking carries one frame's fit to the next)."""

    def __init__(self, min_confidence: float = 0.5) -> None:
        from mediapipe.python.solutions import face_mesh  # ~0.7 s to import: only when used

        with native_noise_filtered():
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
            )
            self._mesh.process(np.zeros((16, 16, 3), np.uint8))  # the graph logs as it starts

    def points(self, image: np.ndarray) -> np.ndarray | None:
        """(478, 2) mesh points in pixels, or None when no face is found."""
        image = np.ascontiguousarray(image)
        found = self._mesh.process(image).multi_face_landmarks
        if not found:
            return None
        h, w = image.shape[:2]
        return np.array([(lm.x * w, lm.y * h) for lm in found[0].landmark], dtype=np.float64)

    def __call__(self, image: np.ndarray) -> tuple[float, float]:
        points = self.points(image)
        return (float("nan"), float("nan")) if points is None else openness(points)

    def series(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """{"mouth": (T,), "eyes": (T,)} for a sequence of frames."""
        values = np.array([self(img) for img in images], dtype=np.float64).reshape(-1, 2)
        return {name: values[:, i] for i, name in enumerate(MEASURES)}

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMeshOpenness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expression_positions(frames: int, count: int) -> list[int]:
    """Up to `count` frames spread evenly over a clip, frame 0 (the source) left out."""
    if frames < 2 or count < 1:
        return []
    spread = np.linspace(1, frames - 1, min(count, frames - 1)).round().astype(int)
    return sorted({int(i) for i in spread})


def reencoded(frames: Sequence[np.ndarray], fps: float = 25.0) -> list[np.ndarray]:
    """The frames through the video codec `iwarp animate` writes with (H.264, CRF 18) and back:
    the same faces with coding noise, the ceiling of the measure."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_video(Path(folder) / "frames.mp4", frames, fps)
        return read_video(path)


def transfer_scores(driver: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """Pearson r and spread ratio std(output) / std(driver) over the frames where both series
    have a face; NaN for both when there are too few such frames or the driver is still (no
    motion to follow). An output that does not move scores 0 and 0."""
    driver, output = np.asarray(driver, np.float64), np.asarray(output, np.float64)
    both = np.isfinite(driver) & np.isfinite(output)
    nan = {"r": float("nan"), "spread": float("nan"), "frames": int(both.sum())}
    if both.sum() < MIN_FRAMES:
        return nan
    d, o = driver[both], output[both]
    d_std, o_std = float(d.std()), float(o.std())
    if d_std < _STILL_STD:
        return nan
    if o_std < _STILL_STD:
        return {"r": 0.0, "spread": 0.0, "frames": int(both.sum())}
    r = float(np.mean((d - d.mean()) * (o - o.mean())) / (d_std * o_std))
    return {"r": r, "spread": o_std / d_std, "frames": int(both.sum())}


# What the expression grid shows per clip: the driver's frame with the most extreme value.
EXTREMES = ("mouth widest", "mouth shut", "eyes closed")


def extreme_frames(mouth: np.ndarray, eyes: np.ndarray) -> dict[str, int]:
    """Indices of the driver's widest-open mouth, most shut mouth and most closed eyes (frames
    without a face are ignored; a measure with no face at all is left out)."""
    picks: dict[str, int] = {}
    for label, values, pick in (
        ("mouth widest", mouth, np.nanargmax),
        ("mouth shut", mouth, np.nanargmin),
        ("eyes closed", eyes, np.nanargmin),
    ):
        values = np.asarray(values, np.float64)
        if np.isfinite(values).any():
            picks[label] = int(pick(values))
    return picks


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: the mean over clips of each score (clips where it is defined) and how many
    clips that is."""
    modes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        modes.setdefault(row["mode"], []).append(row)
    results = []
    for mode, rs in modes.items():
        out: dict[str, Any] = {"mode": mode, "clips": len(rs)}
        for m in MEASURES:
            for score in ("r", "spread"):
                values = [r[f"{m}_{score}"] for r in rs if np.isfinite(r[f"{m}_{score}"])]
                out[f"{m}_{score}"] = float(np.mean(values)) if values else float("nan")
            out[f"{m}_clips"] = int(sum(np.isfinite(r[f"{m}_r"]) for r in rs))
        results.append(out)
    return results
