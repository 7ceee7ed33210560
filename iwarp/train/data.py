"""A folder of clips as training data: 1..N source frames and one driving frame per sample.

Each clip is decoded once, cropped to one face-centred square for the whole clip (so that the
head moves inside the crop, as in VoxCeleb), resized, and cached as a uint8 array; training
then samples from memory. Sampling is a pure function of (seed, step, rank, index), which makes
`--resume` exact without saving any loader state.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from iwarp.errors import InputError
from iwarp.face import (
    DEFAULT_SCALE,
    DETECT_EVERY,
    FaceDetector,
    clip_crop_box,
    crop_and_resize,
)
from iwarp.graphs import image_to_tensor
from iwarp.landmarks import mirror_landmarks, move_landmarks
from iwarp.media import iter_video_frames, read_image
from iwarp.paths import user_cache_dir

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass(frozen=True)
class ClipEntry:
    path: Path
    split: str
    identity: str


# Share of the train split's frames held out as the selection split: checkpoints are chosen on
# it, so the val split stays a number nothing was tuned on.
SELECTION_SHARE = 0.1


def find_clips(root: str | Path, split: str | None = None) -> list[ClipEntry]:
    """Clips under `root`: from its manifest.csv when there is one, else every video file and
    every folder of frames. `split` filters on the manifest's split column; "select" is the
    selection split (`selection_identities`), which "train" then leaves out."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist", "pass a folder of video clips")
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as f:
            rows = list(csv.DictReader(f))
        clips = [
            ClipEntry(root / r["path"], r.get("split", "train"), r.get("identity", r["path"]))
            for r in rows
        ]
        if split in ("train", "select") and not any(c.split == "select" for c in clips):
            chosen = selection_identities(rows)
            clips = [
                ClipEntry(c.path, "select", c.identity)
                if c.split == "train" and c.identity in chosen
                else c
                for c in clips
            ]
        if split is not None:
            clips = [c for c in clips if c.split == split]
    else:
        clips = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
                clips.append(ClipEntry(path, "train", path.stem))
            elif path.is_dir() and _frame_files(path):
                clips.append(ClipEntry(path, "train", path.name))
    if not clips:
        raise InputError(
            f"no clips found in {root}" + (f" for split {split!r}" if split else ""),
            "the folder needs video files (mp4, mov, ...) or folders of frames",
        )
    return clips


def selection_identities(rows: list[dict[str, str]]) -> set[str]:
    """Whole train identities, in the order of their name's hash (stable, not alphabetical),
    until SELECTION_SHARE of the train frames (the manifest's `frames` column, else clips).
    A manifest with its own "select" rows is used as it is."""
    train = [r for r in rows if r.get("split", "train") == "train"]

    def frames(r: dict[str, str]) -> int:
        return int(r.get("frames") or 1)

    total = sum(frames(r) for r in train)
    names = sorted({r.get("identity", r["path"]) for r in train})
    names.sort(key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    chosen: set[str] = set()
    held = 0
    for name in names[:-1]:  # never the whole split
        if held >= SELECTION_SHARE * total:
            break
        chosen.add(name)
        held += sum(frames(r) for r in train if r.get("identity", r["path"]) == name)
    return chosen


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _iter_clip_frames(path: Path, max_frames: int):
    if path.is_dir():
        for p in _frame_files(path)[:max_frames]:
            yield read_image(p)
    else:
        yield from iter_video_frames(path, max_frames=max_frames)


def prepare_clip(
    path: Path,
    size: int,
    detector: FaceDetector,
    max_frames: int = 2000,
    detect_every: int = DETECT_EVERY,
    crop_scale: float = DEFAULT_SCALE,
) -> np.ndarray:
    """Decode a clip, find one face crop for all of it, return (T, size, size, 3) uint8."""
    frames = list(_iter_clip_frames(path, max_frames))
    if len(frames) < 2:
        raise InputError(f"{path} has fewer than 2 frames", "a training clip needs motion")
    faces = [detector.detect(f) for f in frames[::detect_every]]
    box = clip_crop_box(faces, scale=crop_scale)
    if box is None:
        raise InputError(f"no face found in {path}", "training clips must show a face")
    return np.stack([crop_and_resize(f, box, size) for f in frames])


# A matched source (`ClipDataset.match_sources`) is at least this many frames from the
# driving frame: a neighbour would be the answer copied, not an expression found elsewhere.
MATCH_MIN_GAP = 8


def expression_distance(ratios: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """How far standardised expressions (..., 4) are from `reference`: |mouth open| plus half
    of each eye's distance (the mouth's width left out); NaN where unknown."""
    distance = np.abs(ratios - reference)
    return distance[..., 0] + 0.5 * (distance[..., 2] + distance[..., 3])


class FrameSamples(NamedTuple):
    """Training frames and their dlib landmarks in [-1, 1] (NaN where unknown), per sample or
    stacked into a batch (a leading B)."""

    sources: torch.Tensor  # (N, 3, S, S)
    driving: torch.Tensor  # (3, S, S), or (D, 3, S, S) for a temporal pair
    landmarks: np.ndarray | torch.Tensor  # the driving frames': (68, 2) or (D, 68, 2)
    source_landmarks: np.ndarray | torch.Tensor  # the sources': (N, 68, 2)


class ClipDataset:
    """Face-cropped clips held in memory, cached on disk between runs."""

    # Portrait stills mixed in by `add_stills` (class defaults: subclasses that hold clips
    # already decoded, like the GPU check's, skip __init__).
    stills: np.ndarray | None = None
    still_share: float = 0.0
    # Per clip, dlib's 68 landmarks of every frame, (T, 68, 2) in [-1, 1], NaN where no face
    # was found (`load_landmarks`, for landmark guidance); None: not loaded.
    landmarks: list[np.ndarray] | None = None
    # Per clip, the chance of each frame to be the driving frame of an expression-focused
    # sample, and the share of such samples (`focus_on_expression`); None / 0: off.
    expression_weights: list[np.ndarray] | None = None
    expression_share: float = 0.0
    # Per clip, each frame's standardised expression (T, 4), found once (`_frame_expressions`),
    # and the share of multi-source samples given a source that matches the driving frame's
    # (`match_sources`); 0: off.
    frame_expressions: list[np.ndarray] | None = None
    matched_share: float = 0.0

    def __init__(
        self,
        root: str | Path,
        size: int,
        split: str | None = "train",
        cache_dir: str | Path | None = None,
        max_frames: int = 2000,
        min_frames: int = 4,
        show_progress: bool = True,
    ) -> None:
        self.size = size
        entries = find_clips(root, split)
        cache = Path(cache_dir) if cache_dir else user_cache_dir() / "clips"
        self.clips: list[np.ndarray] = []
        self.names: list[str] = []
        self.cache_files: list[Path] = []
        detector: FaceDetector | None = None
        for entry in tqdm(
            entries, desc=f"preparing clips ({split or 'all'})", disable=not show_progress
        ):
            cache_file = _cache_path(cache, entry.path, size, max_frames)
            try:
                if cache_file.is_file():
                    frames = np.load(cache_file, mmap_mode="r")
                else:
                    detector = detector or FaceDetector()
                    frames = prepare_clip(entry.path, size, detector, max_frames)
                    _save_atomic(cache_file, frames)
            except (InputError, OSError, ValueError) as exc:
                # A bad clip never ends a run: say which one and go on.
                warnings.warn(f"skipping clip {entry.path}: {exc}", stacklevel=2)
                continue
            if len(frames) < min_frames:
                warnings.warn(
                    f"skipping clip {entry.path}: only {len(frames)} frames", stacklevel=2
                )
                continue
            self.clips.append(frames)
            self.names.append(str(entry.path))
            self.cache_files.append(cache_file)
        if not self.clips:
            raise InputError(
                f"none of the clips in {root} could be used", "see the warnings above for why"
            )
        # Sample clips in proportion to sqrt(length): long clips count more, not overwhelmingly.
        weights = np.sqrt([len(c) for c in self.clips])
        self.clip_weights = weights / weights.sum()

    def __len__(self) -> int:
        return sum(len(c) for c in self.clips)

    def add_stills(self, stills: np.ndarray, share: float) -> None:
        """Mixes in portrait stills (K, S, S, 3) uint8 (`load_stills`) as `share` of the
        samples: the still is every source and the driving frame, each moved by its own random
        similarity transform (motion the clips may not hold, on faces they do not show)."""
        if stills.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"stills are {stills.shape[1:]}, the clips {self.size}px")
        self.stills, self.still_share = stills, share

    def load_landmarks(self, cache_dir: str | Path | None = None, show_progress: bool = True):
        """dlib's 68 landmarks of every frame of every clip (`landmarks`), found once and
        cached beside the clip's frames; frames where dlib finds no face get NaN."""
        from iwarp.landmarks import DlibFaces, to_unit

        if len(getattr(self, "cache_files", ())) != len(self.clips):
            raise InputError(
                "these clips were not prepared from a folder, so they have no landmark cache",
                "build the ClipDataset from a folder of clips for landmark guidance",
            )
        faces: DlibFaces | None = None
        self.landmarks, self.frame_expressions = [], None
        for frames, cache_file in tqdm(
            list(zip(self.clips, self.cache_files, strict=True)),
            desc="landmarks",
            disable=not show_progress,
        ):
            lm_file = cache_file.with_name(cache_file.stem + "-lm68.npy")
            if lm_file.is_file():
                self.landmarks.append(np.load(lm_file))
                continue
            faces = faces or DlibFaces()
            # dlib's HOG detector misses faces under about 80 px: small crops are enlarged.
            scale = max(1, -(-200 // self.size))
            points = np.full((len(frames), 68, 2), np.nan, dtype=np.float32)
            for i, frame in enumerate(frames):
                image = np.asarray(frame)
                if scale > 1:
                    image = np.asarray(
                        Image.fromarray(image).resize((self.size * scale,) * 2, Image.BICUBIC)
                    )
                found = faces.landmarks(image)
                if found is not None:
                    points[i] = to_unit(found, self.size * scale)
            _save_atomic(lm_file, points)
            self.landmarks.append(points)

    def focus_on_expression(self, share: float) -> None:
        """Draws `share` of the driving frames in proportion to how far the frame's mouth and
        eyes are from its clip's median (standardised openness: |mouth open| + half of each
        eye's distance, plus 0.25 so that every frame can still be drawn). Needs
        `load_landmarks`."""
        if share <= 0:
            self.expression_weights, self.expression_share = None, 0.0
            return
        self.expression_weights = []
        for ratios in self._frame_expressions("focus_on_expression"):
            score = expression_distance(ratios, np.nanmedian(ratios, axis=0))
            weights = np.nan_to_num(score, nan=0.0) + 0.25
            self.expression_weights.append(weights / weights.sum())
        self.expression_share = share

    def match_sources(self, share: float) -> None:
        """On `share` of the samples with 2 or more sources, the last source becomes the
        clip's frame whose mouth and eyes are nearest the driving frame's (|mouth open|
        plus half of each eye's distance, standardised), among frames at least
        MATCH_MIN_GAP from it: the attention can take the open mouth or shut lid from the
        photo that has one. Needs `load_landmarks`."""
        if share > 0:
            self._frame_expressions("match_sources")
        self.matched_share = max(share, 0.0)

    def _frame_expressions(self, needed_by: str) -> list[np.ndarray]:
        """Each clip's per-frame standardised expression (T, 4), NaN without a face: found
        once from the landmarks, for the expression focus and the matched sources."""
        from iwarp.landmarks import standardised_expression

        if self.landmarks is None:
            raise ValueError(f"{needed_by} needs the landmarks: call load_landmarks first")
        if self.frame_expressions is None:
            self.frame_expressions = [standardised_expression(p) for p in self.landmarks]
        return self.frame_expressions

    def _matched_sources(
        self, rng: np.random.Generator, c: int, sources: np.ndarray, driving: int
    ) -> np.ndarray:
        """`sources` (frame indices), the last replaced by the frame that matches `driving`'s
        expression on `matched_share` of draws (`match_sources`). Nothing is drawn while
        matching is off or with one source, so that such runs keep their batches."""
        if self.matched_share <= 0 or len(sources) < 2 or rng.random() >= self.matched_share:
            return sources
        expressions = self.frame_expressions[c]
        score = expression_distance(expressions, expressions[driving])
        frames = np.arange(len(score))
        score[np.abs(frames - driving) < MATCH_MIN_GAP] = np.nan
        if np.isnan(score).all():  # no face on the driving frame, or a short clip
            return sources
        matched = sources.copy()
        matched[-1] = int(np.nanargmin(score))
        return matched

    def _focused_frame(self, rng: np.random.Generator, c: int, count: int) -> int | None:
        """On `expression_share` of draws, one of clip `c`'s first `count` frames drawn by
        `focus_on_expression`'s weights; otherwise None. Nothing is drawn while the focus is
        off, so that runs without it keep their batches."""
        if not (self.expression_share > 0 and rng.random() < self.expression_share):
            return None
        weights = self.expression_weights[c]
        if count < len(weights):
            weights = weights[:count] / weights[:count].sum()
        return int(rng.choice(count, p=weights))

    def sample(
        self, rng: np.random.Generator, num_sources: int, augment: bool = True
    ) -> FrameSamples:
        """One sample: sources (N, 3, S, S) and driving (3, S, S), float in [0, 1], with the
        driving frame's landmarks (68, 2) and the sources' (N, 68, 2), in [-1, 1] as the
        frames were flipped and moved (NaN when not loaded, not found, or a still)."""
        if augment and self.stills is not None and rng.random() < self.still_share:
            still = self.stills[rng.integers(len(self.stills))]
            x = augment_scene(torch.from_numpy(image_to_tensor(still)), rng)[0][0]
            moved = torch.stack([move_frames(x, rng)[0] for _ in range(num_sources + 1)])
            unknown = np.full((num_sources + 1, 68, 2), np.nan, dtype=np.float32)
            return FrameSamples(moved[:num_sources], moved[num_sources], unknown[-1], unknown[:-1])
        c = rng.choice(len(self.clips), p=self.clip_weights)
        clip = self.clips[c]
        replace = len(clip) < num_sources + 1
        idx = rng.choice(len(clip), size=num_sources + 1, replace=replace)
        focused = self._focused_frame(rng, c, len(clip))
        if focused is not None:
            idx[-1] = focused
        sources = self._matched_sources(rng, c, idx[:num_sources], int(idx[-1]))
        frames = self._clip_frames(rng, c, np.sort(sources).tolist(), [int(idx[-1])], augment)
        return frames._replace(driving=frames.driving[0], landmarks=frames.landmarks[0])

    def sample_pair(
        self, rng: np.random.Generator, num_sources: int, max_gap: int, augment: bool = True
    ) -> FrameSamples:
        """Two samples that share their sources, with driving frames 1..`max_gap` frames apart
        in one clip (for the temporal loss): sources (N, 3, S, S), driving (2, 3, S, S), their
        landmarks (2, 68, 2) and the sources' (N, 68, 2). Flip, colour and any driving-frame
        move are the same for both frames, so the only change between them is the video's.
        Clips only: a still has no neighbouring frame."""
        usable = [i for i, clip in enumerate(self.clips) if len(clip) > max_gap]
        if not usable:
            raise InputError(
                f"no clip is longer than {max_gap} frames, so none gives a temporal pair",
                "use longer clips or a smaller temporal_gap",
            )
        p = self.clip_weights[usable] / self.clip_weights[usable].sum()
        c = usable[rng.choice(len(usable), p=p)]
        clip = self.clips[c]
        gap = int(rng.integers(1, max_gap + 1))
        first = int(rng.integers(len(clip) - gap))
        focused = self._focused_frame(rng, c, len(clip) - gap)  # the pair's first frame
        if focused is not None:
            first = focused
        driving = [first, first + gap]
        idx = rng.choice(len(clip), size=num_sources, replace=len(clip) < num_sources)
        idx = self._matched_sources(rng, c, idx, first)
        return self._clip_frames(rng, c, np.sort(idx).tolist(), driving, augment)

    def _clip_frames(
        self,
        rng: np.random.Generator,
        c: int,
        sources: list[int],
        driving: list[int],
        augment: bool,
    ) -> FrameSamples:
        """Frames of clip `c` as sources (N, 3, S, S) and driving frames (D, 3, S, S), with
        their landmarks. One flip and colour change for all frames (one scene), and on
        DRIVING_MOTION_SHARE of samples one move for all driving frames."""
        frames = np.asarray(self.clips[c][[*sources, *driving]])
        if self.landmarks is not None:
            landmarks = self.landmarks[c][[*sources, *driving]].copy()
        else:
            landmarks = np.full((len(sources) + len(driving), 68, 2), np.nan, dtype=np.float32)
        x = torch.from_numpy(image_to_tensor(frames))
        n = len(sources)
        if augment:
            x, flipped = augment_scene(x, rng)
            if flipped:
                landmarks = mirror_landmarks(landmarks)
            if rng.random() < DRIVING_MOTION_SHARE:
                x[n:], theta = move_frames(x[n:], rng)
                landmarks[n:] = move_landmarks(landmarks[n:], theta)
        return FrameSamples(x[:n], x[n:], landmarks[n:], landmarks[:n])

    def batch(
        self, seed: int, step: int, batch_size: int, num_sources: int, rank: int = 0, augment=True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A deterministic batch for (seed, step, rank): sources (B, N, 3, S, S), driving."""
        return self.batch_with_landmarks(seed, step, batch_size, num_sources, rank, augment)[:2]

    def batch_with_landmarks(
        self,
        seed: int,
        step: int,
        batch_size: int,
        num_sources: int,
        rank: int = 0,
        augment: bool = True,
        temporal_gap: int = 0,
    ) -> FrameSamples:
        """`batch`, with the driving frames' landmarks (B, 68, 2) and the sources' (B, N, 68,
        2) (NaN where unknown).

        `temporal_gap` > 0: the batch is B/2 temporal pairs (`sample_pair`), samples 2i and
        2i+1 sharing their sources, for the temporal loss."""
        rng = np.random.default_rng([seed, step, rank])
        if temporal_gap > 0:
            if batch_size % 2:
                raise ValueError(f"temporal pairs need an even batch size, got {batch_size}")
            pairs = [
                self.sample_pair(rng, num_sources, temporal_gap, augment)
                for _ in range(batch_size // 2)
            ]
            return FrameSamples(
                torch.stack([p.sources for p in pairs for _ in range(2)]),
                torch.cat([p.driving for p in pairs]),
                torch.from_numpy(np.concatenate([p.landmarks for p in pairs])),
                torch.from_numpy(np.stack([p.source_landmarks for p in pairs for _ in range(2)])),
            )
        samples = [self.sample(rng, num_sources, augment) for _ in range(batch_size)]
        return FrameSamples(
            torch.stack([s.sources for s in samples]),
            torch.stack([s.driving for s in samples]),
            torch.from_numpy(np.stack([s.landmarks for s in samples])),
            torch.from_numpy(np.stack([s.source_landmarks for s in samples])),
        )


def load_stills(
    root: str | Path, size: int, cache_dir: str | Path | None = None, show_progress: bool = True
) -> np.ndarray:
    """Every photo under `root` with a face, cropped as the clips are, (K, size, size, 3)
    uint8; cached like the clips. Photos without a face or unreadable are skipped, said."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"no photos under {root}", "pass a folder of portrait photos")
    cache = Path(cache_dir) if cache_dir else user_cache_dir() / "clips"
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}" for p in paths) + f"|{size}|v1"
    cache_file = cache / f"stills-{hashlib.sha1(key.encode()).hexdigest()[:12]}-{size}.npy"
    if cache_file.is_file():
        return np.load(cache_file)
    detector = FaceDetector()
    crops = []
    for path in tqdm(paths, desc="preparing stills", disable=not show_progress):
        try:
            image = read_image(path)
        except (InputError, OSError, ValueError) as exc:
            warnings.warn(f"skipping still {path}: {exc}", stacklevel=2)
            continue
        box = clip_crop_box([detector.detect(image)])
        if box is None:
            warnings.warn(f"skipping still {path}: no face found", stacklevel=2)
            continue
        crops.append(crop_and_resize(image, box, size))
    if not crops:
        raise InputError(f"none of the photos under {root} shows a face", "see the warnings")
    stills = np.stack(crops)
    _save_atomic(cache_file, stills)
    return stills


def augment_scene(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """The same flip and colour jitter for all frames of a sample (they are one scene); also
    says whether it flipped."""
    flipped = bool(rng.random() < 0.5)
    if flipped:
        x = x.flip(-1)
    brightness = rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.85, 1.15)
    saturation = rng.uniform(0.8, 1.2)
    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    return (x * brightness).clamp(0.0, 1.0), flipped


# Share of samples whose driving frame (input and target) is also zoomed, turned and shifted:
# more head motion than the clips hold, the sources unchanged.
DRIVING_MOTION_SHARE = 0.25


def move_frames(
    frame: torch.Tensor,
    rng: np.random.Generator,
    zoom: tuple[float, float] = (0.95, 1.1),
    turn: float = 6.0,
    shift: float = 0.04,
) -> tuple[torch.Tensor, np.ndarray]:
    """A random similarity transform of a (3, S, S) frame, or the same one of each of a stack
    (F, 3, S, S): zoom in `zoom`, turn +-`turn` degrees, shift +-`shift` of the side (by
    default 0.95-1.1, 6 degrees, 4 %); reflected at the border (background, not a smeared
    edge). Also returns theta (2, 3), output -> input coordinates in [-1, 1]
    (`iwarp.landmarks.move_landmarks`)."""
    scale = rng.uniform(*zoom)
    angle = np.deg2rad(rng.uniform(-turn, turn))
    offset = rng.uniform(-shift, shift, size=2)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, offset[0]], [sin, cos, offset[1]]], dtype=frame.dtype)
    stack = frame if frame.dim() == 4 else frame[None]
    grid = torch.nn.functional.affine_grid(
        theta.expand(len(stack), 2, 3), list(stack.shape), align_corners=False
    )
    moved = torch.nn.functional.grid_sample(
        stack, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return (moved if frame.dim() == 4 else moved[0]), theta.numpy().astype(np.float64)


def _cache_path(cache: Path, path: Path, size: int, max_frames: int) -> Path:
    stat = path.stat() if path.exists() else None
    key = f"{path.resolve()}|{stat.st_size if stat else 0}|{stat.st_mtime if stat else 0}"
    key += f"|{size}|{max_frames}|v1"
    return cache / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}-{size}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # ranks may race on a cold cache
    np.save(tmp, array)
    tmp.replace(path)
