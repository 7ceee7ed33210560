"""Calibration data: real face crops, their keypoints and real avatar key/value sets.

Two sets of frames come from a folder of clips (`iwarp.train.data.ClipDataset`: one
face-centred square crop per clip, resized to the model size, as training sees them):

- the *calibration* set (``--split``, default train) feeds the quantizer;
- the *evaluation* set (the val split; held-out frames of the calibration clips when the
  folder has no val clips) feeds the accuracy gate and the report.

Each set holds driving frames and, per clip, one avatar of M source frames from the same clip
(never one of its driving frames). The FP32 graphs then give every input the three graphs
see at run time: the driving frames' poses (keypoints graph: keypoints, strength and, for a
network with one, expression), the avatars' poses and their key / value / pixel rows
(source_encoder graph). Driving frame i animates avatar `avatar[i]` with
its first `1 + i % M` sources, so 1-source and multi-source avatars are both calibrated.

Everything is kept in one `.npz` (uint8 frames, float32 graph inputs, a JSON header with the
spec and the checkpoint's sha256): a run with the same spec and checkpoint reuses it; a new
checkpoint keeps the frames and recomputes the graph inputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from iwarp import graphs
from iwarp.errors import InputError, NoFaceError
from iwarp.graphs import image_to_tensor
from iwarp.motion import Pose

CACHE_FORMAT = "iwarp-calibration-cache/1"
MIN_FRAMES = 16  # fewer frames than this cannot calibrate activation ranges
_ARRAYS = (
    "driving",
    "driving_index",
    "avatar",
    "sources",
    "source_index",
    "points",
    "strength",
    "source_points",
    "source_strength",
    "expression",
    "source_expression",
    "keys",
    "values",
    "pixels",
)
_FRAME_ARRAYS = ("driving", "driving_index", "avatar", "sources", "source_index")


# --------------------------------------------------------------------------- frame sets


@dataclass
class FrameSet:
    """Face crops from real clips and, once annotated (`iwarp.calibration.evaluate.annotate`),
    the FP32 graphs' inputs for them."""

    driving: np.ndarray  # (N, S, S, 3) uint8
    driving_index: np.ndarray  # (N,) int32: frame number in its clip
    avatar: np.ndarray  # (N,) int32: which avatar (clip) each driving frame animates
    sources: np.ndarray  # (A, M, S, S, 3) uint8
    source_index: np.ndarray  # (A, M) int32
    clips: list[str] = field(default_factory=list)  # (A,) clip of each avatar
    points: np.ndarray | None = None  # (N, K, 2) FP32 keypoints of the driving frames
    strength: np.ndarray | None = None  # (N, K)
    source_points: np.ndarray | None = None  # (A, M, K, 2)
    source_strength: np.ndarray | None = None  # (A, M, K)
    # A network with an expression (E > 0) only; None without one.
    expression: np.ndarray | None = None  # (N, E) of the driving frames
    source_expression: np.ndarray | None = None  # (A, M, E)
    keys: np.ndarray | None = None  # (A, M * T, d)
    values: np.ndarray | None = None  # (A, M * T, dv)
    pixels: np.ndarray | None = None  # (A, M * T, p)

    def __len__(self) -> int:
        return len(self.driving)

    @property
    def sources_per_avatar(self) -> int:
        return int(self.sources.shape[1])

    @property
    def annotated(self) -> bool:
        return self.keys is not None

    def num_sources(self, i: int) -> int:
        """How many of its avatar's sources driving frame i is animated with."""
        return 1 + i % self.sources_per_avatar

    def subset(self, count: int) -> FrameSet:
        """The first `count` driving frames spread over all avatars (same avatars)."""
        if count >= len(self):
            return self
        keep = np.unique(np.linspace(0, len(self) - 1, count).round().astype(int))
        out = FrameSet(**{f.name: getattr(self, f.name) for f in fields(self)})
        for name in ("driving", "driving_index", "avatar", "points", "strength", "expression"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value[keep])
        return out

    # -- poses ---------------------------------------------------------------------------------
    @property
    def poses(self) -> Pose:
        """The driving frames' FP32 poses (N faces)."""
        self._need_annotations()
        return Pose(self.points, self.strength, self.expression)

    @property
    def source_poses(self) -> Pose:
        """The avatars' FP32 poses, (A, M, ...) arrays."""
        self._need_annotations()
        return Pose(self.source_points, self.source_strength, self.source_expression)

    def set_poses(self, driving: Pose, sources: Pose) -> None:
        """Stores the FP32 poses: `driving` (N faces), `sources` (A, M, ...)."""
        self.points, self.strength, self.expression = (
            driving.points,
            driving.strength,
            driving.expression,
        )
        self.source_points, self.source_strength, self.source_expression = (
            sources.points,
            sources.strength,
            sources.expression,
        )

    # -- graph inputs (batch 1, float32, as the runtime feeds them) ----------------------------
    def keypoint_feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for image in self.all_images():
            yield {graphs.IMAGE: image_to_tensor(image)}

    def source_feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Avatar frames first, then driving frames (any face crop is a valid source)."""
        a, m = self.sources.shape[:2]
        sources = self.source_poses
        items = [
            (self.sources[i, j], sources.map(lambda x, i=i, j=j: x[i, j][None]))
            for i in range(a)
            for j in range(m)
        ]
        driving = self.poses
        items += [(image, driving.select(n)) for n, image in enumerate(self.driving)]
        for image, pose in items[:limit]:
            yield {graphs.IMAGE: image_to_tensor(image), **graphs.pose_feeds(pose)}

    def animator_feeds(self) -> Iterator[dict[str, np.ndarray]]:
        poses = self.poses
        for i in range(len(self)):
            yield self.animator_feed(i, poses.select(i))

    def animator_feed(
        self, i: int, pose: Pose, rows: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Animator inputs of driving frame i at `pose` (one face); `rows` replaces the stored
        key/value rows."""
        avatar = self.avatar_rows(i, rows)
        return {
            **graphs.pose_feeds(pose.map(lambda x: np.ascontiguousarray(x, np.float32))),
            **avatar,
            graphs.KEY_MASK: np.ones(avatar[graphs.KEYS].shape[:2], dtype=bool),
        }

    def avatar_rows(
        self, i: int, rows: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """{keys, values, pixels} (1, n*T, .) of the avatar driving frame i animates: its first
        n = `num_sources(i)` sources; `rows` replaces the stored rows."""
        rows = rows or self.rows()
        a = int(self.avatar[i])
        tokens = self.num_sources(i) * (rows[graphs.KEYS].shape[1] // self.sources_per_avatar)
        return {k: np.ascontiguousarray(rows[k][a : a + 1, :tokens]) for k in graphs.AVATAR_ROWS}

    def rows(self) -> dict[str, np.ndarray]:
        """The FP32 source encoder's rows of every avatar, {keys, values, pixels}: (A, M*T, .)."""
        self._need_annotations()
        return {k: getattr(self, k) for k in graphs.AVATAR_ROWS}

    def all_images(self) -> list[np.ndarray]:
        return list(self.driving) + list(self.sources.reshape(-1, *self.sources.shape[2:]))

    def _need_annotations(self) -> None:
        if not self.annotated:
            raise RuntimeError("evaluate.annotate() must run before the graph inputs are read")


# --------------------------------------------------------------------------- collection


@dataclass
class ClipFrames:
    name: str
    frames: np.ndarray  # (T, S, S, 3) uint8 (may be a memory map)


def load_clips(
    data: str | Path,
    split: str | None,
    size: int,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> list[ClipFrames]:
    """Face-cropped clips of one split (`iwarp.train.data.ClipDataset`, its disk cache)."""
    from iwarp.train.data import ClipDataset, find_clips

    find_clips(data, split)  # InputError when the folder or the split has no clips
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = ClipDataset(
                data,
                size,
                split=split,
                cache_dir=cache_dir,
                min_frames=2,
                show_progress=show_progress,
            )
        except InputError as exc:
            reasons = [str(w.message) for w in caught if "skipping clip" in str(w.message)]
            if reasons and all("no face found" in r for r in reasons):
                raise NoFaceError(
                    f"no face found in any clip of {data}"
                    + (f" (split {split!r})" if split else ""),
                    "calibration needs clips that show a face; see iwarp.face for the detector",
                ) from exc
            detail = "; ".join(r.removeprefix("skipping clip ") for r in reasons[:3])
            raise InputError(
                f"none of the clips in {data} could be used" + (f": {detail}" if detail else ""),
                "calibration needs readable clips that show a face",
            ) from exc
    for w in caught:  # pass on what the data set said about the clips it skipped
        print(f"iwarp calibrate: {w.message}", file=sys.stderr)
    return [ClipFrames(n, c) for n, c in zip(dataset.names, dataset.clips, strict=True)]


def sample_frames(
    clips: list[ClipFrames],
    frames: int,
    sources_per_avatar: int,
    seed: int,
    avoid: dict[str, set[int]] | None = None,
    min_frames: int = MIN_FRAMES,
    what: str = "calibration",
) -> FrameSet:
    """`frames` driving frames spread evenly over the clips, and one avatar per clip.

    Source frames are drawn at random; driving frames are spaced evenly over the rest of each
    clip (never a source frame, never a frame in `avoid[clip]`). Clips too short for an
    avatar plus one driving frame are left out. Raises InputError below `min_frames` frames.
    """
    rng = np.random.default_rng(seed)
    avoid = avoid or {}
    picks = []  # (clip, source indices, candidate driving indices)
    for clip in clips:
        banned = avoid.get(clip.name, set())
        free = np.array([i for i in range(len(clip.frames)) if i not in banned], dtype=int)
        if len(free) < sources_per_avatar + 1:
            continue
        src = np.sort(rng.choice(free, size=sources_per_avatar, replace=False))
        rest = np.setdiff1d(free, src)
        picks.append((clip, src, rest))
    available = sum(len(rest) for _, _, rest in picks)
    if available < max(min_frames, 1):
        raise InputError(
            f"only {available} usable frames in {len(clips)} clip(s), {what} needs at "
            f"least {max(min_frames, 1)}",
            "add clips (or longer ones) that show a face",
        )
    if available < frames:
        print(
            f"iwarp calibrate: only {available} {what} frames available, using all of them "
            f"(asked for {frames})",
            file=sys.stderr,
        )
        frames = available
    # Even shares, capped by each clip's length; what a short clip cannot take goes to the rest.
    share = np.zeros(len(picks), dtype=int)
    left = frames
    while left > 0:
        open_ = [k for k, (_, _, rest) in enumerate(picks) if share[k] < len(rest)]
        step = max(1, left // len(open_))
        for k in open_:
            add = min(step, len(picks[k][2]) - share[k], left)
            share[k] += add
            left -= add
            if left == 0:
                break
    driving, driving_index, avatar, sources, source_index, names = [], [], [], [], [], []
    for (clip, src, rest), count in zip(picks, share, strict=True):
        if count == 0:
            continue
        a = len(sources)
        chosen = rest[np.unique(np.linspace(0, len(rest) - 1, count).round().astype(int))]
        sources.append(np.stack([np.asarray(clip.frames[i]) for i in src]))
        source_index.append(src)
        names.append(clip.name)
        for i in chosen:
            driving.append(np.asarray(clip.frames[i]))
            driving_index.append(i)
            avatar.append(a)
    # Interleave avatars, so that any prefix (and `subset`) covers all clips.
    order = np.lexsort((np.arange(len(avatar)), _rank_within(np.array(avatar))))
    return FrameSet(
        driving=np.stack(driving)[order],
        driving_index=np.asarray(driving_index, np.int32)[order],
        avatar=np.asarray(avatar, np.int32)[order],
        sources=np.stack(sources),
        source_index=np.stack(source_index).astype(np.int32),
        clips=names,
    )


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group."""
    rank = np.zeros(len(groups), dtype=int)
    seen: dict[int, int] = {}
    for i, g in enumerate(groups.tolist()):
        rank[i] = seen.get(g, 0)
        seen[g] = rank[i] + 1
    return rank


def used_frames(fs: FrameSet) -> dict[str, set[int]]:
    """Frame numbers of each clip that `fs` uses (sources and driving frames)."""
    used: dict[str, set[int]] = {name: set() for name in fs.clips}
    for a, name in enumerate(fs.clips):
        used[name].update(int(i) for i in fs.source_index[a])
    for a, i in zip(fs.avatar, fs.driving_index, strict=True):
        used[fs.clips[int(a)]].add(int(i))
    return used


# --------------------------------------------------------------------------- the cache


@dataclass
class CalibrationData:
    """What `iwarp calibrate` needs from the clips; saved as one `.npz`."""

    meta: dict[str, Any]
    calib: FrameSet
    eval: FrameSet

    @property
    def checkpoint_sha256(self) -> str:
        return str(self.meta.get("checkpoint_sha256", ""))


def cache_spec(
    data: str | Path,
    split: str | None,
    eval_split: str | None,
    frames: int,
    eval_frames: int,
    sources_per_avatar: int,
    image_size: int,
    seed: int,
) -> dict[str, Any]:
    """What decides which frames a cache holds (the checkpoint decides the rest)."""
    return {
        "format": CACHE_FORMAT,
        "data": str(Path(data).resolve()),
        "split": split,
        "eval_split": eval_split,
        "frames": int(frames),
        "eval_frames": int(eval_frames),
        "sources_per_avatar": int(sources_per_avatar),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def save_cache(path: str | Path, data: CalibrationData) -> Path:
    """Writes atomically; uncompressed (the float rows do not compress, loading is faster)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for prefix, fs in (("calib", data.calib), ("eval", data.eval)):
        for name in _ARRAYS:
            value = getattr(fs, name)
            if value is not None:
                arrays[f"{prefix}.{name}"] = np.asarray(value)
        arrays[f"{prefix}.clips"] = np.asarray(fs.clips, dtype=str)
    meta = {**data.meta, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
    data.meta = meta
    return path


def load_cache(path: str | Path) -> CalibrationData:
    """A cache written by `save_cache`; InputError when it is missing or unreadable."""
    path = Path(path)
    hint = "delete it; 'iwarp calibrate' writes a new one"
    if not path.is_file():
        raise InputError(f"calibration cache {path} not found", "run 'iwarp calibrate' first")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            sets = {}
            for prefix in ("calib", "eval"):
                kwargs = {
                    name: f[f"{prefix}.{name}"] for name in _ARRAYS if f"{prefix}.{name}" in f
                }
                kwargs["clips"] = [str(c) for c in f[f"{prefix}.clips"]]
                sets[prefix] = FrameSet(**kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"calibration cache {path} is not readable ({exc})", hint) from exc
    if meta.get("format") != CACHE_FORMAT:
        raise InputError(
            f"calibration cache {path} has format {meta.get('format')!r}, not {CACHE_FORMAT!r}",
            hint,
        )
    return CalibrationData(meta, sets["calib"], sets["eval"])


def cache_problems(data: CalibrationData, spec: dict[str, Any], checkpoint_sha: str) -> list[str]:
    """Why a loaded cache does not stand for this run (empty: reuse it as it is)."""
    problems = frame_problems(data, spec)
    if data.checkpoint_sha256 != checkpoint_sha:
        problems.append(
            f"made with checkpoint sha256 {data.checkpoint_sha256[:16] or '?'}..., "
            f"not {checkpoint_sha[:16]}..."
        )
    return problems


def frame_problems(data: CalibrationData, spec: dict[str, Any]) -> list[str]:
    """Why the cached frames cannot be reused (their graph inputs may still be stale)."""
    return [
        f"{key} {data.meta.get(key)!r} != {value!r}"
        for key, value in spec.items()
        if data.meta.get(key) != value
    ]


def strip_annotations(fs: FrameSet) -> FrameSet:
    """The frames only (for re-annotating them with another checkpoint's graphs)."""
    return FrameSet(**{name: getattr(fs, name) for name in _FRAME_ARRAYS}, clips=list(fs.clips))
