"""Live streams start in relative motion: the neutral pose is taken automatically from the
first steady frames with a face (the button / API still set or clear it)."""

from __future__ import annotations

import numpy as np
import pytest

from iwarp.motion import Pose
from iwarp.runtime.animator import AUTO_NEUTRAL_FRAMES, AUTO_NEUTRAL_STEADY, DrivingStream


def _pose(shift: float, expression: bool = False) -> Pose:
    points = np.linspace(-0.5, 0.5, 40, dtype=np.float32).reshape(1, 20, 2) + shift
    openness = np.full((1, 4), shift, np.float32) if expression else None
    return Pose(points, np.full((1, 20), 0.5, np.float32), openness)


def _stream() -> DrivingStream:
    return DrivingStream(animator=None, auto_reference=True)  # no network needed here


def test_first_face_is_neutral_at_once_then_the_steady_mean() -> None:
    stream = _stream()
    moving = [_pose(0.1 * i) for i in range(4)]  # a head turning: not steady
    for pose in moving:
        stream._take_neutral(pose)
    assert stream.reference_origin == "first face"
    assert stream.reference is moving[0]
    still = [_pose(0.5 + 0.2 * AUTO_NEUTRAL_STEADY * i) for i in range(AUTO_NEUTRAL_FRAMES)]
    for pose in still:
        stream._take_neutral(pose)
    assert stream.reference_origin == "steady frames"
    expected = np.mean([p.points for p in still], axis=0)
    assert np.allclose(stream.reference.points, expected)
    # Once taken it stays: later motion does not move the neutral pose.
    for pose in [_pose(0.9)] * (AUTO_NEUTRAL_FRAMES + 1):
        stream._take_neutral(pose)
    assert np.allclose(stream.reference.points, expected)


def test_steps_just_above_the_threshold_never_count_as_steady() -> None:
    stream = _stream()
    for i in range(3 * AUTO_NEUTRAL_FRAMES):
        stream._take_neutral(_pose(1.5 * AUTO_NEUTRAL_STEADY * i))
    assert stream.reference_origin == "first face"


def test_set_and_clear_take_over_from_the_automatic_pose() -> None:
    stream = _stream()
    stream._take_neutral(_pose(0.0))
    stream.last_driving = _pose(0.3)
    assert stream.set_reference()
    assert stream.reference_origin == "set"
    for _ in range(AUTO_NEUTRAL_FRAMES):
        stream._take_neutral(_pose(0.0))
    assert np.allclose(stream.reference.points, _pose(0.3).points)
    stream.clear_reference()
    assert stream.reference is None and not stream.auto_reference


@pytest.mark.parametrize("auto", [True, False])
def test_live_streams_start_relative_offline_streams_do_not(auto: bool) -> None:
    stream = DrivingStream(animator=None, auto_reference=auto)
    stream._take_neutral(_pose(0.2)) if auto else None
    assert (stream.reference is not None) is auto


def test_the_steady_neutral_pose_averages_the_expression_too() -> None:
    stream = _stream()
    still = [
        _pose(0.2 * AUTO_NEUTRAL_STEADY * i, expression=True) for i in range(AUTO_NEUTRAL_FRAMES)
    ]
    for pose in still:
        stream._take_neutral(pose)
    assert stream.reference_origin == "steady frames"
    neutral = stream.reference.expression
    assert neutral.shape == (1, 4) and neutral.dtype == np.float32
    np.testing.assert_allclose(neutral, np.mean([p.expression for p in still], axis=0))
    assert not np.allclose(neutral, still[0].expression)  # the mean, not the first face's
