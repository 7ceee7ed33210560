"""Offline animation: source photo(s) + a driving video -> an avatar video (`iwarp animate`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from iwarp.errors import InputError
from iwarp.media import VideoWriter, default_driving_clip, iter_video_frames, video_info
from iwarp.options import option
from iwarp.runtime import Animator

__all__ = ["AnimateOptions", "animate_video", "default_driving_clip"]


@dataclass
class AnimateOptions:
    """`iwarp animate`: `animate_video`'s arguments as command-line options."""

    sources: list[str] = option(
        default_factory=list,
        flag="--source",
        help="avatar photo, repeatable (default: a packaged portrait)",
    )
    driving: str | None = option(
        None, help="driving video (default: a clip from ../shared/data/clips, else a generated one)"
    )
    out: str = option("iwarp_animation.mp4", help="output video (.mp4)")
    checkpoint: str | None = option(None, help="weights (default: the ones shipped in the package)")
    relative: bool = option(False, help="relative motion from a reference frame")
    reference_frame: int = option(0, help="driving frame used as neutral")
    max_frames: int | None = option(None, help="stop after this many driving frames")
    backend: str = option("auto", help="auto, torch, onnxruntime, openvino or tensorrt")


def animate_video(
    sources: Sequence[str | Path],
    driving: str | Path,
    out: str | Path,
    checkpoint: str | Path | None = None,
    relative: bool = False,
    reference_frame: int = 0,
    max_frames: int | None = None,
    backend: str = "auto",
    show_progress: bool = True,
) -> int:
    """Writes one output frame per driving frame; returns the number of frames written."""
    info = video_info(driving)  # fails early, with a clear message, on a bad driving file
    animator = Animator.from_pretrained(backend, checkpoint, show_progress=show_progress)
    avatar = animator.add_avatar(list(sources))
    stream = animator.stream()
    if relative:
        head = list(iter_video_frames(driving, max_frames=reference_frame + 1))
        if len(head) <= reference_frame:
            raise InputError(
                f"{driving} has only {len(head)} frames; --reference-frame {reference_frame} "
                "is past its end",
                "choose a smaller --reference-frame",
            )
        if not stream.set_reference(head[reference_frame]):
            raise InputError(
                f"no face in frame {reference_frame} of {driving}",
                "choose another --reference-frame that shows the face",
            )
        stream.reset()  # the reference pass must not leave the tracker mid-video
    total = (
        min(info.frames, max_frames) if max_frames and info.frames else (max_frames or info.frames)
    )
    written = 0
    with VideoWriter(out, fps=info.fps or 25.0) as writer:
        frames = iter_video_frames(driving, max_frames=max_frames)
        for frame in tqdm(frames, total=total or None, desc="animate", disable=not show_progress):
            writer.write(stream.animate(avatar, frame))
            written += 1
    return written
