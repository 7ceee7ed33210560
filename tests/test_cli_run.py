"""`iwarp animate` and `iwarp bench` run for real (short generated clips, the real network):
the files and numbers they produce, not only their --help."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iwarp.checkpoint import save_checkpoint
from iwarp.cli import main
from iwarp.config import get_config
from iwarp.face import FaceDetector, crop_and_resize, face_crop_box
from iwarp.media import (
    make_test_clip,
    read_image,
    read_video,
    synthetic_driving_frames,
    write_video,
)
from iwarp.model import ImplicitWarpingNetwork
from iwarp.paths import DEFAULT_AVATAR

FRAMES = 8
SIZE = 256  # the shipped weights' size: animate's output frames are the model's face crops


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0**2 / mse))


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """The packaged portrait swaying and turning, and the same portrait standing still."""
    folder = tmp_path_factory.mktemp("clips")
    photo = read_image(DEFAULT_AVATAR)
    moving = make_test_clip(folder / "moving.mp4", frames=FRAMES, size=SIZE, image=photo)
    first = synthetic_driving_frames(photo, FRAMES, SIZE)[0]
    still = write_video(folder / "still.mp4", [first] * FRAMES, 25)
    return {"moving": moving, "still": still}


@pytest.fixture(scope="module")
def animated(clips, tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """`iwarp animate` (shipped weights, the packaged portrait as the avatar) on both clips."""
    out = tmp_path_factory.mktemp("animate")
    frames = {}
    for name, clip in clips.items():
        video = out / f"{name}.mp4"
        argv = ["animate", "--driving", str(clip), "--out", str(video), "--max-frames", "99"]
        argv += ["--backend", "torch"]  # no graph export on first use: keeps the test short
        assert main(argv) == 0
        frames[name] = read_video(video)
    return frames


def test_animate_writes_one_model_size_frame_per_driving_frame(animated):
    for name, frames in animated.items():
        assert len(frames) == FRAMES, name
        assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames), name


def test_animate_moves_the_avatar_as_the_driver_moves(animated):
    photo = read_image(DEFAULT_AVATAR)
    with FaceDetector() as detector:
        crop = crop_and_resize(photo, face_crop_box(detector.detect(photo)), SIZE)
    still, moving = animated["still"], animated["moving"]
    # A driver standing still gives a still avatar (only video coding noise moves)...
    still_motion = max(_mean_abs(a, b) for a, b in itertools.pairwise(still))
    assert still_motion < 1.0, still_motion
    # ...that is the avatar's face: the portrait's own crop, not some other picture (an
    # unrelated image of the same crop, the crop flipped upside down, scores ~8 dB).
    assert _psnr(still[0], crop) > 20.0, _psnr(still[0], crop)
    # A moving driver moves the avatar: every frame changes (tens of times the still clip's
    # change), and every frame is still that face, moved.
    moving_motion = [_mean_abs(a, b) for a, b in itertools.pairwise(moving)]
    assert min(moving_motion) > 2.0 and np.mean(moving_motion) > 10 * max(still_motion, 0.2), (
        moving_motion
    )
    assert all(_psnr(f, crop) > 13.0 for f in moving), [round(_psnr(f, crop), 1) for f in moving]
    # Moved, not copied: the frames away from the driver's start pose are not the photo.
    assert max(_mean_abs(f, still[0]) for f in moving) > 5.0


def test_animate_starts_relative_and_keeps_absolute_behind_a_flag(tmp_path, capsys):
    """A driver whose face is another shape (the portrait stretched 1.3x in height), standing
    still: relative motion, the default as in serve and cam, shows the avatar's own face;
    `--absolute` pastes the driver's face geometry onto it."""
    import cv2

    photo = read_image(DEFAULT_AVATAR)
    with FaceDetector() as detector:
        crop = crop_and_resize(photo, face_crop_box(detector.detect(photo)), SIZE)
    tall = cv2.resize(synthetic_driving_frames(photo, 1, SIZE)[0], (SIZE, int(SIZE * 1.3)))
    top = (tall.shape[0] - SIZE) // 2
    clip = write_video(tmp_path / "stretched.mp4", [tall[top : top + SIZE]] * 4, 25)
    psnr = {}
    for mode, flags in (
        ("default", []),
        ("relative", ["--relative"]),
        ("absolute", ["--absolute"]),
    ):
        video = tmp_path / f"{mode}.mp4"
        argv = ["animate", "--driving", str(clip), "--out", str(video), "--backend", "torch"]
        assert main([*argv, *flags]) == 0, mode
        psnr[mode] = min(_psnr(f, crop) for f in read_video(video))
    # Measured: 28.3 dB relative, 22.9 dB absolute.
    assert psnr["default"] > 26.0 and psnr["absolute"] < psnr["default"] - 3.0, psnr
    assert psnr["relative"] == pytest.approx(psnr["default"], abs=0.01), psnr  # old flag: no-op
    # A neutral frame is for relative motion: asking for both is a user mistake.
    argv = ["animate", "--driving", str(clip), "--out", str(tmp_path / "x.mp4")]
    assert main([*argv, "--absolute", "--reference-frame", "0"]) == 2
    assert "--absolute and --reference-frame" in capsys.readouterr().err


def test_bench_json_reports_plausible_numbers(clips, tmp_path, capsys):
    # A random-init tiny network at 64 px keeps this quick; what is checked is the report.
    torch.manual_seed(0)
    config = get_config("tiny_flow", image_size=64)
    ckpt = save_checkpoint(
        tmp_path / "tiny64.safetensors", config, ImplicitWarpingNetwork(config.model)
    )
    frames = 6
    argv = [
        "bench",
        "--backend",
        "torch",
        "--checkpoint",
        str(ckpt),
        "--clip",
        str(clips["moving"]),
    ]
    argv += ["--frames", str(frames), "--threads", "1", "--accuracy-frames", "0", "--json"]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, lines
    r = json.loads(lines[0])
    assert (r["backend"], r["precision"], r["size"], r["sources"]) == ("torch", "fp32", 64, 1)
    assert r["frames"] == frames and r["clip"] == str(clips["moving"])
    assert isinstance(r["machine"], str) and r["machine"]
    assert set(r["stages"]) == {"face_tracking", "keypoints", "animator"}
    for stage, p in r["stages"].items():
        assert 0.0 <= p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"], (stage, p)
    assert r["stages"]["keypoints"]["p50_ms"] > 0 and r["stages"]["animator"]["p50_ms"] > 0
    f = r["frame_ms"]
    assert 0.0 < f["p50"] <= f["p95"] <= f["p99"] < 60_000, f
    # The stages are parts of a frame; fps is measured on the wall clock over the same frames.
    stage_sum = sum(p["p50_ms"] for p in r["stages"].values())
    assert stage_sum <= 1.5 * f["p50"], (stage_sum, f)
    assert 1000.0 / f["p99"] / 2 <= r["fps"] <= 1000.0 / f["p50"] * 2, (r["fps"], f)
    assert r["avatar_ms"] > 0
