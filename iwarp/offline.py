"""Offline animation: source photo(s) + a driving video -> an avatar video (`iwarp animate`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tqdm import tqdm

from iwarp.errors import InputError
from iwarp.media import VideoWriter, default_driving_clip, iter_video_frames, video_info
from iwarp.options import option
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime.options import EngineOptions, avatar_photos

__all__ = ["AnimateOptions", "animate_video", "default_driving_clip", "run_animate"]


@dataclass
class AnimateOptions:
    """`iwarp animate`'s settings; each field is its command-line option (iwarp.options)."""

    sources: list[str] = avatar_photos("--source")
    driving: str | None = option(
        None, help="driving video (default: a clip from ../shared/data/clips, else a generated one)"
    )
    out: str = option("iwarp_animation.mp4", help="output video (.mp4)")
    engine: EngineOptions = option(default_factory=EngineOptions)
    absolute: bool = option(
        False,
        help="absolute keypoints: the driver's own face geometry, for a driver who is the "
        "avatar's own person (default: relative motion, as serve and cam)",
    )
    relative: bool = option(
        False, help="relative motion: the default now, accepted for old scripts"
    )
    reference_frame: int | None = option(
        None,
        help="driving frame used as the neutral pose (default: taken automatically from the "
        "first steady frames with a face, as serve and cam do)",
    )
    max_frames: int | None = option(None, help="stop after this many driving frames")

    def resolved(self) -> AnimateOptions:
        """These settings with the defaults filled in: the packaged portrait, the default clip."""
        return replace(
            self,
            sources=self.sources or [str(DEFAULT_AVATAR)],
            driving=self.driving or str(default_driving_clip()),
        )


def run_animate(o: AnimateOptions) -> int:
    """`iwarp animate`: the video, then one line saying what was written from what."""
    o = o.resolved()
    written = animate_video(o)
    print(
        f"wrote {written} frames to {o.out} (avatar: {', '.join(o.sources)}; driving: {o.driving})"
    )
    return 0


def animate_video(o: AnimateOptions, show_progress: bool = True) -> int:
    """Writes one output frame per driving frame; returns the number of frames written.

    Relative motion by default, as the live paths: the avatar's own keypoints move by the
    driver's motion from a neutral pose, taken automatically from the first steady frames
    with a face, or from `reference_frame`. `absolute` puts the driver's keypoints on the
    avatar as they are, which pastes the driver's face geometry onto it: only for a driver who
    is the avatar's own person. `relative` is accepted for old callers (it is the default)."""
    o = o.resolved()
    sources, driving, reference_frame = o.sources, str(o.driving), o.reference_frame
    if o.absolute and (o.relative or reference_frame is not None):
        flag = "--relative" if o.relative else "--reference-frame"
        raise InputError(
            f"--absolute and {flag} contradict each other (a reference frame is for relative "
            "motion)",
            f"drop {flag} for absolute motion, or --absolute for relative motion",
        )
    info = video_info(driving)  # fails early, with a clear message, on a bad driving file
    animator = o.engine.animator(show_progress=show_progress)
    avatar = animator.add_avatar(list(sources))
    # Absolute, or relative from a given frame: the neutral pose is set once, below.
    stream = animator.stream(auto_reference=not o.absolute and reference_frame is None)
    if reference_frame is not None:
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
    max_frames = o.max_frames
    total = (
        min(info.frames, max_frames) if max_frames and info.frames else (max_frames or info.frames)
    )
    written = 0
    with VideoWriter(o.out, fps=info.fps or 25.0) as writer:
        frames = iter_video_frames(driving, max_frames=max_frames)
        for frame in tqdm(frames, total=total or None, desc="animate", disable=not show_progress):
            writer.write(stream.animate(avatar, frame))
            written += 1
    return written
