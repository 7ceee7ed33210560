"""Landmark guidance: dlib's landmarks follow the training frames' flips and moves, the loss
pulls only the guided keypoints, and a training run finds, caches and uses the landmarks.

Real photos and dlib throughout: the transforms are checked against dlib run again on the
flipped or moved picture, not against a formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iwarp.checkpoint import Checkpoint
from iwarp.config import get_config
from iwarp.face import FaceDetector, clip_crop_box, crop_and_resize
from iwarp.landmarks import (
    LANDMARK_GROUPS,
    MIRROR_68,
    DlibFaces,
    mirror_landmarks,
    move_landmarks,
    to_unit,
)
from iwarp.media import make_test_clip, read_image
from iwarp.paths import DEFAULT_AVATAR
from iwarp.train.data import ClipDataset, move_frames
from iwarp.train.losses import assign_guided_keypoints, landmark_guidance_loss
from iwarp.train.trainer import train

SIZE = 256


@pytest.fixture(scope="module")
def faces() -> DlibFaces:
    return DlibFaces()


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """The packaged portrait, face-cropped as training crops are."""
    image = read_image(DEFAULT_AVATAR)
    box = clip_crop_box([FaceDetector().detect(image)], scale=1.8)
    return crop_and_resize(image, box, SIZE)


def group_centres(landmarks: torch.Tensor) -> torch.Tensor:
    """The reference: each group's mean point, (B, G, 2)."""
    return torch.stack(
        [torch.stack([landmarks[:, i] for i in idx]).mean(0) for idx in LANDMARK_GROUPS.values()],
        dim=1,
    )


def test_mirror_map_swaps_sides_and_is_its_own_inverse() -> None:
    assert sorted(MIRROR_68.tolist()) == list(range(68))
    assert np.array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    assert MIRROR_68[36] == 45 and MIRROR_68[48] == 54 and MIRROR_68[30] == 30  # eyes, mouth, nose


def test_landmarks_follow_a_flip(faces: DlibFaces, portrait: np.ndarray) -> None:
    points = to_unit(faces.landmarks(portrait), SIZE)
    seen = to_unit(faces.landmarks(np.ascontiguousarray(portrait[:, ::-1])), SIZE)
    error_px = np.abs(seen - mirror_landmarks(points)).mean() * SIZE / 2
    unmapped_px = np.abs(seen - points * [-1, 1]).mean() * SIZE / 2  # flipped, not re-indexed
    assert error_px < 1.5, error_px  # measured 0.4 px
    assert unmapped_px > 3 * error_px


def test_landmarks_follow_the_driving_motion(faces: DlibFaces, portrait: np.ndarray) -> None:
    points = to_unit(faces.landmarks(portrait), SIZE)
    frame = torch.from_numpy(portrait).permute(2, 0, 1).float() / 255
    for seed in range(3):
        moved, theta = move_frames(frame, np.random.default_rng(seed))
        picture = (moved.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        seen = to_unit(faces.landmarks(picture), SIZE)
        error_px = np.abs(seen - move_landmarks(points, theta)).mean() * SIZE / 2
        still_px = np.abs(seen - points).mean() * SIZE / 2
        assert error_px < 1.5, error_px  # measured 0.4-0.5 px; not moving them: 4-5 px
        assert still_px > 3 * error_px


def test_guidance_pulls_only_the_guided_keypoints() -> None:
    landmarks = torch.rand(3, 68, 2) * 2 - 1
    targets = group_centres(landmarks)
    guided = tuple(range(19, 19 - len(LANDMARK_GROUPS), -1))
    points = torch.rand(3, 20, 2) * 2 - 1
    points[:, list(guided)] = targets
    assert float(landmark_guidance_loss(points, landmarks, guided)) == pytest.approx(0, abs=1e-6)

    points = (points + 0.1).requires_grad_()
    landmarks[1] = float("nan")  # a frame without a face: left out, no NaN gradient
    loss = landmark_guidance_loss(points, landmarks, guided)
    assert float(loss.detach()) == pytest.approx(0.2, rel=1e-4)  # |0.1| + |0.1| per point
    loss.backward()
    assert torch.isfinite(points.grad).all()
    moved = points.grad.abs().sum(-1) > 0
    assert not moved[1].any()  # the frame with no landmarks
    assert moved[0, list(guided)].all() and moved[0].sum() == len(guided)


def test_assignment_gives_each_group_its_nearest_free_keypoint() -> None:
    landmarks = torch.rand(4, 68, 2) * 2 - 1
    targets = group_centres(landmarks)
    order = torch.randperm(20)[: len(LANDMARK_GROUPS)]
    points = torch.rand(4, 20, 2) * 4 + 3  # far from every target...
    points[:, order] = targets + 0.01  # ...but these, each next to its group
    assert assign_guided_keypoints(points, landmarks) == tuple(order.tolist())
    with pytest.raises(ValueError, match="no frame"):
        assign_guided_keypoints(points, torch.full((4, 68, 2), float("nan")))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps; a loaded machine makes extra threads slower
    yield
    torch.set_num_threads(threads)


def test_training_with_landmark_guidance(tmp_path: Path, portrait: np.ndarray, one_thread) -> None:
    """Landmarks are found once and cached, the keypoints are assigned at the start and kept
    on resume, and the loss is logged and falls as it pulls."""
    clips = tmp_path / "clips"
    clips.mkdir()
    make_test_clip(clips / "portrait.mp4", frames=8, size=SIZE, image=portrait)
    cache = tmp_path / "cache"
    size = 160  # dlib's HOG detector misses the face in much smaller crops
    data = ClipDataset(clips, size, split=None, cache_dir=cache, show_progress=False)

    config = get_config("tiny_flow")
    tc = config.train
    tc.train_size, tc.batch_size, tc.max_sources = size, 2, 1
    tc.loss.perceptual = 0.0
    tc.loss.landmark_guidance = 10.0
    tc.checkpoint_every, tc.sample_every, tc.val_every, tc.log_every = 2, 10_000, 10_000, 1
    tc.lr = 1e-3
    run = tmp_path / "run"
    train(config, data, run, 4, cache_dir=cache, show_progress=False)

    assert len(list(cache.glob("*-lm68.npy"))) == 1
    assert data.landmarks is not None and np.isfinite(data.landmarks[0]).all()
    guided = Checkpoint(run / "checkpoints" / "latest.safetensors").config.train.guided_keypoints
    assert len(guided) == len(LANDMARK_GROUPS) == len(set(guided))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["landmark_guidance"], rows[-1]["landmark_guidance"]
    assert last < first, (first, last)

    config.train.guided_keypoints = ()
    train(config, data, run, 6, resume=True, cache_dir=cache, show_progress=False)
    assert Checkpoint(run / "checkpoints" / "latest.safetensors").config.train.guided_keypoints == (
        guided
    )
