"""Image and video I/O: every frame is an RGB uint8 numpy array of shape (H, W, 3).

Reading is defensive (user files: missing, corrupt, truncated, huge) and raises `InputError`;
writing is for our own outputs (results, demos, fake-camera files).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import av
except ImportError:  # a machine without PyAV (the GPU check decodes its clips with OpenCV)
    av = None
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from iwarp.errors import InputError
from iwarp.paths import DEFAULT_AVATAR, shared_data_dir, user_cache_dir

# The driving clip every command uses when none is given (`iwarp animate`, `iwarp bench`, the
# latency benchmarks): a val-split clip (a person never seen in training), 512x512, 30 fps,
# with head motion, from the shared footage.
DEFAULT_DRIVING_CLIP = "clips/liveportrait/driving/d3.mp4"

__all__ = [
    "VideoInfo",
    "VideoWriter",
    "iter_video_frames",
    "make_test_clip",
    "read_image",
    "read_video",
    "synthetic_driving_frames",
    "to_rgb",
    "video_info",
    "write_video",
    "write_y4m",
]

DEFAULT_MAX_PIXELS = 40_000_000

_IMAGE_HINT = "use a JPEG or PNG photo"
_VIDEO_HINT = "use an MP4 or MOV video (H.264 is safest)"


def _reason(error: Exception) -> str:
    """What went wrong, in words: FFmpeg's message without its error number and the path
    ("[Errno 1094995529] Invalid data found when processing input: 'x.mp4'" -> the middle)."""
    return getattr(error, "strerror", None) or str(error)


def _check_file(path: str | Path, kind: str, hint: str) -> Path:
    """Return `path` as a Path if it is an existing regular file, else raise InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{kind} file not found: {p}", f"check the path; {hint}")
    if not p.is_file():
        raise InputError(f"{kind} path is not a file: {p}", f"give a file, not a folder; {hint}")
    return p


# --------------------------------------------------------------------------- images


def read_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> np.ndarray:
    """Read an image file as RGB uint8, upright per its EXIF orientation.

    Grayscale, palette, CMYK and 16-bit images are converted; transparent areas are composited
    over white (transparent pixels often hold garbage colours). Images over `max_pixels` are
    refused before decoding. With `max_side`, the result is downscaled to fit it; JPEGs are
    decoded at a reduced scale to begin with (libjpeg's DCT scaling), so a 25 MP photo never
    exists in memory at full size.
    """
    p = _check_file(path, "image", _IMAGE_HINT)
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(
                    f"image {p} is too large ({w}x{h} = {w * h / 1e6:.0f} MP)",
                    f"resize it below {max_pixels / 1e6:.0f} megapixels",
                )
            if max_side is not None and max(w, h) > max_side:
                im.draft("RGB", (max_side, max_side))  # JPEG only; a no-op for other formats
            im.load()  # decode now so truncation errors surface here
            im = ImageOps.exif_transpose(im)
            if max_side is not None and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return _pil_to_rgb(im)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {p} is too large to decode safely ({e})", "resize it") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{p} is not an image or its format is not supported", _IMAGE_HINT) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError, and some broken headers as the others.
        raise InputError(
            f"image {p} is corrupt or truncated ({e})",
            f"re-export or re-download it; {_IMAGE_HINT}",
        ) from e


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to a contiguous RGB uint8 array."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grayscale: Pillow's convert("L") clips instead of scaling.
        a = np.asarray(im).astype(np.float32)
        if mode == "F" and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        elif mode != "F":
            a = a / 257.0  # 65535 -> 255
        gray = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """Return `frame` as contiguous RGB uint8 (H, W, 3).

    Accepts (H, W) gray, (H, W, 1), (H, W, 3) and (H, W, 4) (alpha dropped), as uint8 or float in
    [0, 1]. No copy is made when the input is already contiguous RGB uint8.
    """
    a = np.asarray(frame)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(
            f"frame has shape {a.shape}, expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)",
            "pass an RGB image array",
        )
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InputError(
            f"frame has dtype {a.dtype}, expected uint8 or float in [0, 1]",
            "convert the frame to uint8",
        )
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- video reading


@dataclass(frozen=True)
class VideoInfo:
    """Basic facts about a video's first video stream.

    `frames` may be an estimate from the container (duration x fps); 0 if unknown.
    """

    width: int
    height: int
    fps: float
    frames: int


def _require_av() -> None:
    if av is None:
        raise InputError(
            "PyAV is not installed: videos cannot be read or written", "pip install av"
        )


def _open_video(p: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open `p` and return (container, first video stream), or raise InputError."""
    _require_av()
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{p} is not a readable video ({_reason(e)})", _VIDEO_HINT) from e
    if not container.streams.video:
        container.close()
        raise InputError(f"{p} has no video stream", _VIDEO_HINT)
    return container, container.streams.video[0]


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _stream_frames(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer, fps: float
) -> int:
    """Frame count from the index if present, else estimated from the duration."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and fps:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration and fps:
        return round(container.duration / av.time_base * fps)
    return 0


def video_info(path: str | Path) -> VideoInfo:
    """Display size, frame rate and (approximate) frame count; decodes only the first frame."""
    p = _check_file(path, "video", _VIDEO_HINT)
    container, stream = _open_video(p)
    with container:
        cc = stream.codec_context
        fps = _stream_fps(stream)
        width, height = cc.width, cc.height
        if width <= 0 or height <= 0:
            raise InputError(f"{p} has a video stream without a frame size", _VIDEO_HINT)
        frames = _stream_frames(stream, container, fps)
        try:
            # The display rotation is only exposed on frames; one decode costs a few ms.
            rotation = next(container.decode(stream)).rotation
        except (StopIteration, av.FFmpegError, OSError, ValueError):
            rotation = 0
        if round(rotation / 90.0) % 2:
            width, height = height, width
        return VideoInfo(width, height, fps, frames)


def _frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    # Phone videos store a display rotation instead of rotated pixels.
    k = round(frame.rotation / 90.0) % 4 if frame.rotation else 0
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def iter_video_frames(
    path: str | Path, max_frames: int | None = None, step: int = 1
) -> Iterator[np.ndarray]:
    """Decode a video and yield every `step`-th frame as RGB uint8, at most `max_frames` of them.

    Opening problems (missing, not a video, no video stream) raise InputError at once. A video
    that breaks part-way yields the frames that decoded, then warns and stops; one that yields
    nothing raises InputError.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    p = _check_file(path, "video", _VIDEO_HINT)
    container, stream = _open_video(p)
    return _decode(p, container, stream, max_frames, step)


def _decode(
    p: Path,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    max_frames: int | None,
    step: int,
) -> Iterator[np.ndarray]:
    with container:
        if max_frames == 0:
            return
        stream.thread_type = "AUTO"
        # Truncated MP4s often end quietly, so remember how many frames the container promised.
        expected = int(stream.frames or 0)
        estimated = 0 if expected else _stream_frames(stream, container, _stream_fps(stream))
        decoded = 0
        yielded = 0
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
                rgb = _frame_to_rgb(frame)
            except StopIteration:
                break
            except (av.FFmpegError, OSError, ValueError) as e:
                if decoded == 0:
                    raise InputError(
                        f"{p} has no decodable frames ({_reason(e)})", _VIDEO_HINT
                    ) from e
                warnings.warn(
                    f"{p}: video is corrupt after frame {decoded} ({_reason(e)}); stopped there",
                    stacklevel=2,
                )
                return
            if decoded % step == 0:
                yield rgb
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
            decoded += 1
        if decoded == 0:
            raise InputError(
                f"{p} has no decodable frames", f"the file may be damaged; {_VIDEO_HINT}"
            )
        # An exact index count is trusted; a duration-based estimate gets slack for VFR streams.
        if (expected and decoded < expected - 1) or (estimated and decoded < 0.8 * estimated - 2):
            warnings.warn(
                f"{p}: only {decoded} of about {expected or estimated} frames could be decoded; "
                "the file looks truncated",
                stacklevel=2,
            )


def read_video(path: str | Path, max_frames: int | None = None, step: int = 1) -> list[np.ndarray]:
    """Decode a whole video (or its first `max_frames` kept frames) into a list of RGB frames."""
    return list(iter_video_frames(path, max_frames=max_frames, step=step))


# --------------------------------------------------------------------------- video writing


def _fps_fraction(fps: float) -> Fraction:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    # Denominators up to 1001 keep NTSC rates (30000/1001) exact and integers stay integers.
    return Fraction(fps).limit_denominator(1001)


def _pad_even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class VideoWriter:
    """Encode RGB frames to a video file (H.264 yuv420p by default; MPEG-4 Part 2 if no x264).

    The first frame fixes the size; odd sizes are padded by one replicated row/column because
    yuv420p needs even dimensions. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        codec: str = "libx264",
        crf: int = 18,
        preset: str = "fast",
    ) -> None:
        self.path = Path(path)
        self.fps = float(fps)
        self._rate = _fps_fraction(fps)
        self.codec = codec
        self.crf = crf
        self.preset = preset
        self.frames_written = 0
        self._size: tuple[int, int] | None = None  # (height, width) of the input frames
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._closed = False

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {}
        if self.path.suffix.lower() in (".mp4", ".mov", ".m4v"):
            options["movflags"] = "+faststart"  # index first: plays while loading, survives cuts
        _require_av()
        try:
            container = av.open(str(self.path), mode="w", options=options)
        except (av.FFmpegError, ValueError) as e:
            raise InputError(
                f"cannot write a video to {self.path} ({_reason(e)})",
                "use a .mp4 or .mov file name",
            ) from e
        pw, ph = width + width % 2, height + height % 2
        codec = self.codec if self.codec in av.codecs_available else "mpeg4"
        try:
            stream = container.add_stream(codec, rate=self._rate)
        except (av.FFmpegError, ValueError):
            codec = "mpeg4"
            stream = container.add_stream(codec, rate=self._rate)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": self.preset}
        else:
            # mpeg4 has no CRF; a generous bit rate keeps test/demo content clean.
            stream.bit_rate = int(max(2_000_000, pw * ph * float(self._rate) * 0.5))
        self._container, self._stream, self.codec = container, stream, codec
        self._size = (height, width)

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB frame (uint8, or anything `to_rgb` accepts) of the first frame's size."""
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is closed")
        rgb = to_rgb(frame)
        if self._size is None:
            self._open(rgb.shape[0], rgb.shape[1])
        elif rgb.shape[:2] != self._size:
            raise ValueError(
                f"frame size {rgb.shape[1]}x{rgb.shape[0]} differs from the first frame's "
                f"{self._size[1]}x{self._size[0]}"
            )
        assert self._container is not None and self._stream is not None
        vf = av.VideoFrame.from_ndarray(_pad_even(rgb), format="rgb24")
        for packet in self._stream.encode(vf.reformat(format="yuv420p")):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (no file is created if nothing was written)."""
        if self._closed:
            return
        self._closed = True
        if self._container is None or self._stream is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, **kwargs: Any) -> Path:
    """Write `frames` to a video file; extra keyword arguments go to `VideoWriter`."""
    with VideoWriter(path, fps, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    if writer.frames_written == 0:
        raise ValueError(f"no frames given for {path}")
    return Path(path)


def _rgb_to_i420(rgb: np.ndarray) -> bytes:
    """BT.601 limited-range I420 planes (Y, then U, V at half resolution) of an even-sized frame."""
    f = rgb.astype(np.float32)
    r, g, b = f[:, :, 0], f[:, :, 1], f[:, :, 2]
    y = 16.0 + 0.256788 * r + 0.504129 * g + 0.097906 * b
    u = 128.0 - 0.148223 * r - 0.290993 * g + 0.439216 * b
    v = 128.0 + 0.439216 * r - 0.367788 * g - 0.071427 * b
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        # 2x2 box average: JPEG/MPEG-1 chroma siting is centred between the four luma samples.
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y, sub(u), sub(v)]
    return b"".join(np.clip(p + 0.5, 0, 255).astype(np.uint8).tobytes() for p in planes)


def write_y4m(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write RGB frames as an uncompressed YUV4MPEG2 4:2:0 file (e.g. Chromium's fake camera).

    Uses BT.601 limited range, which is what consumers assume for I420 without range metadata.
    Odd sizes are padded to even. Chromium reads the rate as integer num/den, so keep fps >= 1,
    and it expects each frame header to be exactly "FRAME\\n", which this writes.
    """
    rate = _fps_fraction(fps)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    size: tuple[int, int] | None = None
    with p.open("wb") as fh:
        for frame in frames:
            rgb = _pad_even(to_rgb(frame))
            if size is None:
                size = rgb.shape[:2]
                header = (
                    f"YUV4MPEG2 W{size[1]} H{size[0]} F{rate.numerator}:{rate.denominator} "
                    "Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED\n"
                )
                fh.write(header.encode("ascii"))
            elif rgb.shape[:2] != size:
                raise ValueError(f"frame size {rgb.shape[:2]} differs from the first {size}")
            fh.write(b"FRAME\n")
            fh.write(_rgb_to_i420(rgb))
            count += 1
    if count == 0:
        p.unlink(missing_ok=True)
        raise ValueError(f"no frames given for {p}")
    return p


# --------------------------------------------------------------------------- synthetic clips


def _test_pattern(size: int) -> np.ndarray:
    """A colourful, textured pattern that makes motion easy to see and to measure."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    img = np.stack([xx, yy, 1.0 - 0.5 * (xx + yy)], axis=2) * 200.0 + 20.0
    checker = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float32)
    img *= (0.75 + 0.25 * checker)[:, :, None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    c = size // 2
    cv2.circle(img, (c, c), size // 5, (250, 230, 60), thickness=-1, lineType=cv2.LINE_AA)
    cv2.rectangle(img, (size // 8, size // 8), (size // 3, size // 4), (30, 30, 30), -1)
    cv2.line(img, (0, size - 1), (size - 1, 0), (255, 255, 255), max(1, size // 64), cv2.LINE_AA)
    return img


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop `image` to a square and resize it to size x size."""
    rgb = to_rgb(image)
    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    sq = rgb[y0 : y0 + s, x0 : x0 + s]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(sq, (size, size), interpolation=interp))


def synthetic_driving_frames(image: np.ndarray | None, frames: int, size: int) -> list[np.ndarray]:
    """Frames in which `image` (centre-cropped, size x size) sways, turns and zooms smoothly.

    Motion is small (up to ~6% shift, 8 degrees, 8% zoom) so a face in the image stays in view.
    With `image=None` a generated pattern is used.
    """
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got {frames} and {size}")
    base = _test_pattern(size) if image is None else _square(image, size)
    out = []
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    for i in range(frames):
        t = 2.0 * math.pi * i / max(frames, 2)  # one full cycle over the clip
        angle = 8.0 * math.sin(t)
        zoom = 1.0 + 0.08 * math.sin(2.0 * t)
        m = cv2.getRotationMatrix2D(centre, angle, zoom)
        m[0, 2] += 0.06 * size * math.sin(t + 0.5)
        m[1, 2] += 0.04 * size * math.cos(t)
        out.append(
            cv2.warpAffine(
                base, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
        )
    return out


def make_test_clip(
    path: str | Path,
    frames: int = 30,
    size: int = 128,
    fps: float = 25,
    image: np.ndarray | None = None,
) -> Path:
    """Write a synthetic clip (see `synthetic_driving_frames`) for tests and demos."""
    return write_video(path, synthetic_driving_frames(image, frames, size), fps)


def default_driving_clip() -> Path:
    """`DEFAULT_DRIVING_CLIP` from the shared data when it is here; else a generated clip of
    the packaged portrait swaying (150 frames, 256 px, 30 fps), made once in the user cache."""
    data = shared_data_dir()
    if data is not None and (data / DEFAULT_DRIVING_CLIP).is_file():
        return data / DEFAULT_DRIVING_CLIP
    path = user_cache_dir() / "default_driving.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"default_driving.{os.getpid()}.tmp.mp4")
        make_test_clip(tmp, frames=150, size=256, fps=30, image=read_image(DEFAULT_AVATAR))
        os.replace(tmp, path)  # concurrent first runs never read a half-written clip
    return path
