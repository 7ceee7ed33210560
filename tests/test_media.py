"""Tests for iwarp.media: real files written to tmp_path, no mocks."""

from __future__ import annotations

import itertools
import struct
import warnings
import wave
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from iwarp.errors import InputError
from iwarp.media import (
    VideoInfo,
    VideoWriter,
    iter_video_frames,
    make_test_clip,
    read_image,
    read_video,
    synthetic_driving_frames,
    to_rgb,
    video_info,
    write_video,
    write_y4m,
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth colour image that compresses well (so PSNR thresholds are meaningful)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // (w + h)], axis=2
    ).astype(np.uint8)


# --------------------------------------------------------------------------- images


def test_read_gray_png(tmp_path: Path) -> None:
    gray = smooth_rgb()[:, :, 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_read_rgba_png_composites_transparent_over_white(tmp_path: Path) -> None:
    rgb = smooth_rgb()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:10, :10] = 0
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[10:, 10:], rgb[10:, 10:])
    assert (out[:10, :10] == 255).all()


def test_read_palette_png(tmp_path: Path) -> None:
    im = Image.fromarray(smooth_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_read_16bit_png_scales_to_8bit(tmp_path: Path) -> None:
    g16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    expected = np.round(g16 / 257.0).astype(np.uint8)
    assert np.abs(out[:, :, 0].astype(int) - expected).max() <= 1
    assert out[:, :, 0].max() > 200  # scaled, not clipped to 255 or truncated to 0


def test_read_jpeg_round_trip(tmp_path: Path) -> None:
    rgb = smooth_rgb()
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    assert psnr(read_image(tmp_path / "c.jpg"), rgb) > 35


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = smooth_rgb(48, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (64, 48, 3)
    assert psnr(out, np.rot90(rgb, -1)) > 30


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    Image.fromarray(smooth_rgb(128, 128)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_text_file_named_jpg_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(InputError, match="not an image"):
        read_image(tmp_path / "notes.jpg")


def test_missing_file_and_directory_raise(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as e:
        read_image(tmp_path / "nope.png")
    assert e.value.hint
    with pytest.raises(InputError, match="not a file"):
        read_image(tmp_path)


def test_max_pixels_guard(tmp_path: Path) -> None:
    Image.fromarray(smooth_rgb(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "big.png", max_pixels=5_000)
    assert read_image(tmp_path / "big.png", max_pixels=10_000).shape == (100, 100, 3)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_pillow_decompression_bomb_becomes_input_error(tmp_path: Path) -> None:
    # A tiny file whose header claims 30000 x 30000 pixels: Pillow's own guard fires on open.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(InputError, match=r"bomb\.png"):
        read_image(tmp_path / "bomb.png", max_pixels=10**12)
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "bomb.png")


def test_to_rgb_accepts_common_layouts() -> None:
    rgb = smooth_rgb(8, 10)
    assert to_rgb(rgb) is rgb  # already fine: no copy
    np.testing.assert_array_equal(to_rgb(rgb[:, :, 0])[:, :, 2], rgb[:, :, 0])
    np.testing.assert_array_equal(to_rgb(rgb[:, :, :1])[:, :, 1], rgb[:, :, 0])
    np.testing.assert_array_equal(to_rgb(np.dstack([rgb, rgb[:, :, :1]])), rgb)
    f = to_rgb(rgb.astype(np.float32) / 255.0)
    assert f.dtype == np.uint8 and np.abs(f.astype(int) - rgb).max() <= 1
    assert to_rgb(rgb[:, ::2]).flags.c_contiguous


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((4, 4, 3), np.int32),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_to_rgb_rejects_other_arrays(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        to_rgb(bad)


# --------------------------------------------------------------------------- video


def test_video_round_trip(tmp_path: Path) -> None:
    frames = synthetic_driving_frames(None, frames=12, size=64)
    path = write_video(tmp_path / "sub" / "clip.mp4", frames, fps=25)  # creates sub/
    info = video_info(path)
    assert info == VideoInfo(width=64, height=64, fps=25.0, frames=12)
    back = read_video(path)
    assert len(back) == 12
    assert all(b.shape == (64, 64, 3) and b.dtype == np.uint8 for b in back)
    assert min(psnr(a, b) for a, b in zip(frames, back, strict=True)) > 25


def test_mov_odd_size_step_and_max_frames(tmp_path: Path) -> None:
    frames = [smooth_rgb(33, 41)] * 6
    with VideoWriter(tmp_path / "odd.mov", fps=30000 / 1001) as w:
        for f in frames:
            w.write(f)
    info = video_info(tmp_path / "odd.mov")
    assert (info.width, info.height) == (42, 34)  # padded to even for yuv420p
    assert abs(info.fps - 29.97) < 0.01
    back = read_video(tmp_path / "odd.mov")
    assert psnr(back[0][:33, :41], frames[0]) > 30
    assert len(read_video(tmp_path / "odd.mov", step=2)) == 3
    assert len(read_video(tmp_path / "odd.mov", max_frames=4, step=1)) == 4


def test_writer_rejects_size_change(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "x.mp4", fps=10) as w:
        w.write(smooth_rgb(16, 16))
        with pytest.raises(ValueError, match="differs"):
            w.write(smooth_rgb(32, 32))


def test_truncated_video_yields_frames_then_warns(tmp_path: Path) -> None:
    path = make_test_clip(tmp_path / "full.mp4", frames=40, size=64)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames = read_video(cut)
    except InputError as e:  # acceptable only if nothing at all could be decoded
        assert "cut.mp4" in str(e)
        return
    assert 0 < len(frames) < 40
    assert any("cut.mp4" in str(w.message) for w in caught)


def test_not_a_video_raises(tmp_path: Path) -> None:
    (tmp_path / "fake.mp4").write_bytes(b"definitely not a video" * 10)
    with pytest.raises(InputError, match=r"fake\.mp4") as info:
        read_video(tmp_path / "fake.mp4")
    # FFmpeg's words, without its error number ("[Errno 1094995529]"): noise to a user.
    assert "Errno" not in str(info.value) and "Invalid data" in str(info.value), info.value
    with pytest.raises(InputError, match="not found"):
        iter_video_frames(tmp_path / "missing.mp4")  # raised at call time, before iterating
    with pytest.raises(InputError):
        video_info(tmp_path / "fake.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "tone.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(InputError, match="no video stream"):
        read_video(tmp_path / "tone.wav")


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    # Phone clips carry a display matrix instead of rotated pixels.
    img = np.zeros((32, 64, 3), np.uint8)
    img[:8, :8] = 255  # a white top-left corner
    with av.open(str(tmp_path / "rot.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)  # counter-clockwise
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    out = read_video(tmp_path / "rot.mp4")[0]
    assert out.shape == (64, 32, 3)
    assert out[60, 2].mean() > 200 and out[2, 2].mean() < 50  # top-left went to bottom-left
    info = video_info(tmp_path / "rot.mp4")
    assert (info.width, info.height) == (32, 64)


def test_y4m_header_and_size(tmp_path: Path) -> None:
    frames = [smooth_rgb(48, 64), smooth_rgb(48, 64)[::-1]]
    path = write_y4m(tmp_path / "cam.y4m", frames, fps=30)
    data = path.read_bytes()
    header = data.split(b"\n", 1)[0].decode()
    tokens = header.split()
    assert tokens[0] == "YUV4MPEG2"
    assert {"W64", "H48", "F30:1", "C420jpeg"} <= set(tokens)
    frame_bytes = 64 * 48 * 3 // 2
    assert len(data) == len(header) + 1 + 2 * (len(b"FRAME\n") + frame_bytes)
    assert data[len(header) + 1 :].startswith(b"FRAME\n")
    with av.open(str(path)) as c:  # FFmpeg reads it back with the right colours
        back = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(back) == 2
    assert psnr(back[0], frames[0]) > 30 and psnr(back[1], frames[1]) > 30


def test_y4m_pads_odd_sizes(tmp_path: Path) -> None:
    data = write_y4m(tmp_path / "odd.y4m", [smooth_rgb(15, 21)], fps=25).read_bytes()
    assert b" W22 H16 " in data.split(b"\n", 1)[0]
    assert len(data.split(b"FRAME\n", 1)[1]) == 22 * 16 * 3 // 2


def test_make_test_clip(tmp_path: Path) -> None:
    path = make_test_clip(tmp_path / "t.mp4", frames=10, size=64, fps=20)
    frames = read_video(path)
    assert len(frames) == 10 and frames[0].shape == (64, 64, 3)
    assert video_info(path).fps == 20.0
    assert psnr(frames[0], frames[5]) < 25  # it moves


def test_synthetic_frames_from_image_are_smooth() -> None:
    image = smooth_rgb(80, 120)
    frames = synthetic_driving_frames(image, frames=20, size=48)
    assert len(frames) == 20 and frames[0].shape == (48, 48, 3)
    step = [psnr(a, b) for a, b in itertools.pairwise(frames)]
    assert min(step) > 20  # small, smooth motion between neighbours


def test_writer_falls_back_to_mpeg4(tmp_path: Path) -> None:
    frames = synthetic_driving_frames(None, frames=5, size=64)
    with VideoWriter(tmp_path / "m.mp4", fps=25, codec="no-such-encoder") as w:
        for f in frames:
            w.write(f)
    assert w.codec == "mpeg4"
    back = read_video(tmp_path / "m.mp4")
    assert len(back) == 5 and min(psnr(a, b) for a, b in zip(frames, back, strict=True)) > 25
