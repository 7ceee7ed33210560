"""Relative motion (iwarp.motion): one rule for the live stream and the evaluation."""

from __future__ import annotations

import numpy as np
import torch

from iwarp.motion import relative_motion

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
