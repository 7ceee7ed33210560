"""Relative motion (iwarp.motion): one rule for the live stream and the evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iwarp.motion import Pose, relative_expression, relative_motion, relative_pose

SOURCE = ([[[0.1, 0.2], [-0.5, 0.5]]], [[0.5, 0.9]])
REFERENCE = ([[[0.0, 0.0], [0.3, 0.3]]], [[0.4, 0.4]])
DRIVING = ([[[0.2, -0.1], [0.3, 0.4]]], [[0.1, 0.8]])


def test_arithmetic_numpy_and_torch_agree():
    for kind in (np.asarray, torch.tensor):
        args = [kind(x) for pair in (SOURCE, DRIVING, REFERENCE) for x in pair]
        points, strength = relative_motion(*args)
        assert type(points) is type(args[0]) and type(strength) is type(args[0])
        np.testing.assert_allclose(np.asarray(points), [[[0.3, 0.1], [-0.5, 0.6]]], atol=1e-6)
        # 0.5 + (0.1 - 0.4) = 0.2; 0.9 + (0.8 - 0.4) = 1.3 -> clipped to 1.
        np.testing.assert_allclose(np.asarray(strength), [[0.2, 1.0]], atol=1e-6)


def test_driving_at_the_reference_gives_the_source_back():
    src = [np.asarray(x, np.float32) for x in SOURCE]
    ref = [np.asarray(x, np.float32) for x in REFERENCE]
    points, strength = relative_motion(*src, *ref, *ref)
    np.testing.assert_array_equal(points, src[0])
    np.testing.assert_array_equal(strength, src[1])
    assert points.dtype == np.float32  # float32 in, float32 out: no cast on the frame path


def test_strength_never_leaves_unit_range():
    rng = np.random.default_rng(0)
    s = [rng.uniform(0, 1, (4, 20)).astype(np.float32) for _ in range(3)]
    p = [rng.uniform(-1, 1, (4, 20, 2)).astype(np.float32) for _ in range(3)]
    _, strength = relative_motion(p[0], s[0], p[1], s[1], p[2], s[2])
    assert strength.min() >= 0.0 and strength.max() <= 1.0


def test_relative_pose_moves_points_strength_and_expression_by_the_one_rule():
    src, drv, ref = (
        [np.asarray(x, np.float32) for x in pair] for pair in (SOURCE, DRIVING, REFERENCE)
    )
    expressions = [np.asarray([[e, -e]], np.float32) for e in (0.5, 2.0, 1.0)]  # src, drv, ref
    moved = relative_pose(
        Pose(*src, expressions[0]), Pose(*drv, expressions[1]), Pose(*ref, expressions[2])
    )
    points, strength = relative_motion(*src, *drv, *ref)
    np.testing.assert_array_equal(moved.points, points)
    np.testing.assert_array_equal(moved.strength, strength)
    np.testing.assert_array_equal(moved.expression, relative_expression(*expressions))
    np.testing.assert_allclose(moved.expression, [[1.5, -1.5]])
    # At the reference: the source's own pose, its expression included.
    same = relative_pose(
        Pose(*src, expressions[0]), Pose(*ref, expressions[2]), Pose(*ref, expressions[2])
    )
    np.testing.assert_array_equal(same.expression, expressions[0])
    # A network without an expression: none in, none out; one without the other is refused.
    assert relative_pose(Pose(*src), Pose(*drv), Pose(*ref)).expression is None
    with pytest.raises(ValueError, match="expression"):
        relative_pose(Pose(*src), Pose(*drv, expressions[1]), Pose(*ref))


def test_pose_select_map_and_join_keep_the_batch_axis():
    rng = np.random.default_rng(1)
    pose = Pose(rng.uniform(size=(3, 20, 2)), rng.uniform(size=(3, 20)), rng.normal(size=(3, 4)))
    one = pose.select(1)
    assert one.points.shape == (1, 20, 2) and one.expression.shape == (1, 4)
    assert pose.select(-1).strength.shape == (1, 20)
    np.testing.assert_array_equal(pose.select(-1).expression, pose.expression[2:])
    joined = Pose.join([pose.select(i) for i in range(3)], np.concatenate)
    for name in ("points", "strength", "expression"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(pose, name))
    halves = pose.map(lambda a: a.astype(np.float16))
    assert halves.expression.dtype == np.float16
    assert Pose(pose.points, pose.strength).map(lambda a: a * 2).expression is None
