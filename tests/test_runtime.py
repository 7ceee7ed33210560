"""The Animator on the torch backend: avatars, streams, persistence and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from iwarp.checkpoint import save_checkpoint
from iwarp.config import get_config
from iwarp.errors import InputError, NoFaceError
from iwarp.media import read_image, synthetic_driving_frames
from iwarp.model import ImplicitWarpingNetwork
from iwarp.paths import DEFAULT_AVATAR
from iwarp.runtime import Animator, AvatarStore, create_backend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    config = get_config("tiny_flow", image_size=128)
    path = tmp_path_factory.mktemp("ckpt") / "tiny128.safetensors"
    save_checkpoint(path, config, ImplicitWarpingNetwork(config.model).eval())
    return path


@pytest.fixture(scope="module")
def backend(checkpoint):
    return create_backend("torch", checkpoint, device="cpu")


@pytest.fixture(scope="module")
def portrait():
    return read_image(DEFAULT_AVATAR)


@pytest.fixture(scope="module")
def driving(portrait):
    return synthetic_driving_frames(portrait, frames=12, size=256)


def test_animate_returns_model_size_frames(backend, portrait, driving):
    animator = Animator(backend)
    avatar = animator.add_avatar([portrait])
    out = [animator.animate(avatar, f) for f in driving[:4]]
    assert all(o.shape == (128, 128, 3) and o.dtype == np.uint8 for o in out)
    times = animator.default_stream.times
    assert times.keypoints > 0 and times.animator > 0 and times.total >= times.animator


def test_frames_of_any_size_and_format(backend, portrait, driving):
    animator = Animator(backend)
    avatar = animator.add_avatar([portrait])
    stream = animator.stream()
    frame = driving[0]
    gray = frame.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([frame, np.full((*frame.shape[:2], 1), 255, np.uint8)], axis=2)
    wide = np.zeros((300, 640, 3), np.uint8)
    wide[22:278, 192:448] = frame
    for f in (frame, gray, rgba, wide):
        out = stream.animate(avatar, f)
        assert out.shape == (128, 128, 3)


def test_no_face_holds_last_pose(backend, portrait, driving):
    animator = Animator(backend, smoothing=False)
    avatar = animator.add_avatar([portrait])
    stream = animator.stream()
    blank = np.full((240, 320, 3), 90, np.uint8)
    # Before any face: the avatar's own photo crop, never an exception.
    first = stream.animate(avatar, blank)
    np.testing.assert_array_equal(first, animator.get(avatar).crops[0])
    with_face = stream.animate(avatar, driving[3])
    stream.tracker.hold_frames = 0  # make the tracker give up on the face at once
    held = stream.animate(avatar, blank)
    # The same pose again: equal up to rounding (the pixel skip puts outputs on exact 8-bit
    # values, where float noise in the last bit can flip a pixel by one).
    np.testing.assert_allclose(held.astype(int), with_face.astype(int), atol=1)
    assert np.abs(held.astype(int) - first.astype(int)).mean() > 1  # not the photo again


def test_multi_source_avatar_and_remove(backend, portrait, driving):
    animator = Animator(backend)
    avatar = animator.add_avatar([portrait, driving[5], driving[9]])
    assert animator.get(avatar).features.num_sources == 3
    assert animator.animate(avatar, driving[1]).shape == (128, 128, 3)
    animator.remove_avatar(avatar)
    with pytest.raises(InputError, match="unknown avatar"):
        animator.animate(avatar, driving[1])
    with pytest.raises(InputError, match="unknown avatar"):
        animator.remove_avatar(avatar)


def test_relative_motion_uses_source_face(backend, portrait, driving):
    animator = Animator(backend, smoothing=False)
    avatar = animator.add_avatar([portrait])
    stream = animator.stream()
    assert stream.set_reference(driving[0])
    # Driving with the reference frame itself gives the avatar's own keypoints back.
    pose = stream._relative(animator.get(avatar), stream.driving_pose(driving[0]))
    np.testing.assert_allclose(pose.points, animator.get(avatar).features.points[:1], atol=0.02)
    # Another frame moves the avatar's keypoints by that frame's displacement.
    ref_points = stream.reference.points
    moved = stream.driving_pose(driving[6])
    pose = stream._relative(animator.get(avatar), moved)
    expected = animator.get(avatar).features.points[:1] + (moved.points - ref_points)
    np.testing.assert_allclose(pose.points, expected, atol=1e-6)
    stream.clear_reference()
    assert stream._relative(animator.get(avatar), moved) is moved
    # Without a frame, the neutral pose is the raw pose of the last frame animated.
    stream.animate(avatar, driving[6])
    assert stream.set_reference()
    np.testing.assert_array_equal(stream.reference.points, moved.points)


def test_photo_without_face_is_a_clear_error(backend, tmp_path):
    animator = Animator(backend)
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="no face found"):
        animator.add_avatar([noise])
    with pytest.raises(InputError, match="at least one photo"):
        animator.add_avatar([])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(InputError):
        animator.add_avatar([text])


def test_avatars_survive_a_restart(backend, portrait, driving, tmp_path):
    store = tmp_path / "avatars"
    first = Animator(backend, AvatarStore(store))
    avatar = first.add_avatar([portrait, driving[4]], owner="alice", name="me")
    expected = first.stream().animate(avatar, driving[2])

    again = Animator(backend, AvatarStore(store))  # a new process would do just this
    records = {r.avatar_id: r for r in again.avatars()}
    assert records[avatar].owner == "alice" and records[avatar].num_sources == 2
    np.testing.assert_array_equal(again.stream().animate(avatar, driving[2]), expected)

    again.remove_avatar(avatar)
    assert Animator(backend, AvatarStore(store)).avatars() == []


def test_damaged_store_entry_is_skipped(backend, portrait, tmp_path):
    store = AvatarStore(tmp_path / "avatars")
    good = Animator(backend, store).add_avatar([portrait])
    broken = tmp_path / "avatars" / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text('{"avatar_id": "broken", "num_sources": 1}')
    with pytest.warns(UserWarning, match="broken"):
        animator = Animator(backend, AvatarStore(tmp_path / "avatars"))
    assert [r.avatar_id for r in animator.avatars()] == [good]


def test_unknown_backend_is_a_clear_error(checkpoint):
    from iwarp.errors import IwarpError

    with pytest.raises(IwarpError, match="unknown backend"):
        create_backend("cuda-magic", checkpoint)


def test_a_stream_closes_what_it_owns_and_nothing_else(backend, portrait, driving):
    from iwarp.face import FaceDetector, FaceTracker

    animator = Animator(backend, smoothing=False)
    avatar = animator.add_avatar([portrait])
    stream = animator.stream()
    # Through the animator, not its backend: the same keypoints and the same frame.
    crop = stream.face_crop(driving[3])
    pose = animator.detect(crop)
    np.testing.assert_array_equal(pose.points, stream.crop_pose(crop).points)
    frame = animator.render(animator.get(avatar), pose)
    assert frame.shape == (animator.image_size, animator.image_size, 3)
    assert frame.dtype == np.uint8
    stream.animate(avatar, driving[4])
    own = stream.tracker.detector
    assert own._graphs  # MediaPipe graphs made by the stream's first detection
    stream.close()
    assert not own._graphs  # freed now, not at garbage collection
    # A detector given to a tracker stays its giver's: closing the tracker leaves it working.
    with FaceDetector() as shared:
        tracker = FaceTracker(shared)
        assert tracker.update(driving[0]) is not None
        tracker.close()
        assert shared._graphs and shared.detect(driving[1]) is not None
    # The animator's own detector (avatars) was never the stream's to close.
    assert animator.add_avatar([portrait])


def test_every_stream_attribute_travels_or_stays_by_name(backend, portrait, driving):
    """`motion_state` carries exactly `motion_fields` (what a Ray replica gets with each frame);
    an attribute in neither list fails here, so a new field cannot travel silently."""
    animator = Animator(backend)
    avatar = animator.add_avatar([portrait])
    stream = animator.stream(auto_reference=True)
    for frame in driving[:3]:
        stream.animate(avatar, frame)
    motion, local = set(stream.motion_fields), set(stream.local_fields)
    assert not motion & local, motion & local
    assert set(vars(stream)) == motion | local, set(vars(stream)) ^ (motion | local)
    state = stream.motion_state()
    assert set(state) == motion

    other = animator.stream(auto_reference=True)
    other.restore_motion(state)
    assert other.reference_origin == stream.reference_origin
    with pytest.raises(ValueError, match="not motion state"):
        other.restore_motion({"tracker": None})
