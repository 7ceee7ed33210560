"""dlib's 68 face landmarks: the detector, the named groups that guide learned keypoints in
training, and how the landmarks follow a mirrored or moved training frame.

The same detector measures AKD, MKR, landmark transfer and identity in `iwarp eval`, and is
run once per training frame, offline, for landmark guidance (`iwarp.train.data`). It needs the
`eval` extra: the `dlib-bin` wheel and the models of `face_recognition_models`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from iwarp.errors import IwarpError


def _face_model_dir() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources (setuptools<81).
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise IwarpError(
            "face metrics (AKD, MKR, identity) need dlib's models",
            "pip install 'iwarp[eval]' (dlib-bin, face_recognition_models)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaces:
    """Face detection, 68 landmarks and a 128-d identity descriptor for RGB uint8 images."""

    detector_name = "dlib HOG frontal face detector + 68-point shape predictor (iBUG 300-W)"
    identity_name = (
        "dlib ResNet face descriptor (128-d, face_recognition_models); cosine similarity "
        "to the source photo, and the Euclidean distance whose same-person threshold is 0.6"
    )

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise IwarpError(
                "face metrics (AKD, MKR, identity) need dlib",
                "pip install 'iwarp[eval]' (installs the dlib-bin wheel)",
            ) from exc
        models = _face_model_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def _face(self, image: np.ndarray):
        faces = self.detector(np.ascontiguousarray(image), 0)
        if not faces:
            return None
        return max(faces, key=lambda r: r.width() * r.height())

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(68, 2) pixel coordinates, or None when no face is detected."""
        face = self._face(image)
        if face is None:
            return None
        shape = self.shape68(np.ascontiguousarray(image), face)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def descriptor(self, image: np.ndarray) -> np.ndarray:
        """128-d identity descriptor; the whole image is the face box when none is detected."""
        image = np.ascontiguousarray(image)
        face = self._face(image)
        if face is None:  # face crops: the face fills most of the frame anyway
            h, w = image.shape[:2]
            face = self._dlib.rectangle(w // 8, h // 8, w - w // 8, h - h // 8)
        return np.asarray(self.encoder.compute_face_descriptor(image, self.shape68(image, face)))


# Landmark groups (iBUG 300-W indices) that learned keypoints are tied to by the guidance loss:
# the parts whose motion carries expression (lids, lips) and the head's pose (eyes, nose, chin).
# A group's target is the mean of its points.
LANDMARK_GROUPS: dict[str, tuple[int, ...]] = {
    "right_eye_upper_lid": (37, 38),
    "right_eye_lower_lid": (40, 41),
    "left_eye_upper_lid": (43, 44),
    "left_eye_lower_lid": (46, 47),
    "nose_tip": (30,),
    "mouth_right_corner": (48,),
    "mouth_left_corner": (54,),
    "upper_lip": (62,),
    "lower_lip": (66,),
    "chin": (8,),
}


# The expression the network is taught to read from a driving face (`model.expression`), as
# ratios of dlib landmarks that do not depend on the face's size or place: the inner lips' gap
# over the mouth's width, the mouth's width over the eyes' outer corners, and each eye's aspect
# ratio (lid gap over eye width; "right" is the person's right, image left).
EXPRESSION_NAMES = ("mouth_open", "mouth_width", "right_eye", "left_eye")
# Their mean and standard deviation over the 19,169 frames with a face of the 82 train clips
# at 128 px (the eyes' averaged, so that a mirrored face gives the mirrored numbers): the
# network's expression numbers are these ratios, standardised.
EXPRESSION_MEAN = (0.1286, 0.5928, 0.2965, 0.2965)
EXPRESSION_STD = (0.1057, 0.0716, 0.0776, 0.0776)


def expression_ratios(points):
    """(..., 68, 2) landmarks (numpy or torch) -> (..., 4) ratios in EXPRESSION_NAMES order;
    NaN where the landmarks are."""

    def dist(a: int, b: int):
        d = points[..., a, :] - points[..., b, :]
        return ((d * d).sum(-1) + 1e-12) ** 0.5

    width = dist(48, 54)
    gap = (dist(61, 67) + dist(62, 66) + dist(63, 65)) / 3
    right_eye = (dist(37, 41) + dist(38, 40)) / (2 * dist(36, 39))
    left_eye = (dist(43, 47) + dist(44, 46)) / (2 * dist(42, 45))
    parts = [gap / width, width / dist(36, 45), right_eye, left_eye]
    stack = np.stack if isinstance(points, np.ndarray) else _torch_stack
    return stack(parts, -1)


def _torch_stack(parts, dim):
    import torch

    return torch.stack(parts, dim)


def standardised_expression(points):
    """`expression_ratios`, standardised with EXPRESSION_MEAN / EXPRESSION_STD: the numbers
    the network's expression is trained to give."""
    ratios = expression_ratios(points)
    mean = np.asarray(EXPRESSION_MEAN, dtype=np.float32)
    std = np.asarray(EXPRESSION_STD, dtype=np.float32)
    if not isinstance(ratios, np.ndarray):
        mean, std = ratios.new_tensor(mean), ratios.new_tensor(std)
    return (ratios - mean) / std


def _mirror_68() -> np.ndarray:
    """Index map of the 68 points under a horizontal flip: point i of the mirrored face is
    point MIRROR_68[i] of the original (left and right swap, the midline stays)."""
    pairs = [(i, 16 - i) for i in range(17)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31 + i, 35 - i) for i in range(5)]  # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48 + i, 54 - i) for i in range(7)]  # outer lips, top
    pairs += [(55 + i, 59 - i) for i in range(5)]  # outer lips, bottom
    pairs += [(60 + i, 64 - i) for i in range(5)]  # inner lips, top
    pairs += [(65, 67), (66, 66)]  # inner lips, bottom
    mirror = np.arange(68)
    for a, b in pairs:
        mirror[a], mirror[b] = b, a
    return mirror


MIRROR_68 = _mirror_68()


def to_unit(points: np.ndarray, size: int) -> np.ndarray:
    """Pixel coordinates (pixel centres at i + 0.5) of a size x size image -> [-1, 1], the
    convention of keypoints and grid_sample (align_corners=False)."""
    return (np.asarray(points, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0


def mirror_landmarks(points: np.ndarray) -> np.ndarray:
    """(..., 68, 2) landmarks in [-1, 1] of a frame -> those of the frame flipped left-right."""
    flipped = np.array(points, dtype=np.float32, copy=True)
    flipped[..., 0] *= -1
    return flipped[..., MIRROR_68, :]


def move_landmarks(points: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(..., 68, 2) landmarks in [-1, 1] -> where they land in a frame resampled with
    `affine_grid(theta)` (theta (2, 3) maps output coordinates to input coordinates)."""
    a, t = theta[:, :2], theta[:, 2]
    return ((np.asarray(points) - t) @ np.linalg.inv(a).T).astype(np.float32)
