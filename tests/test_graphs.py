"""The graph contract (iwarp.graphs): shapes from the config, and the image <-> tensor form."""

from __future__ import annotations

import numpy as np
import pytest

from iwarp.config import get_config
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    BATCH,
    EXPRESSION,
    GRAPHS,
    IMAGE,
    KEY_MASK,
    KEYPOINTS,
    KEYPOINTS_GRAPH,
    KEYS,
    PIXELS,
    SOURCE_ENCODER_GRAPH,
    STRENGTH,
    TOKENS,
    VALUES,
    graph_specs,
    image_to_tensor,
    pose_feeds,
    pose_of,
    tensor_to_image,
)
from iwarp.motion import Pose


def test_shapes_follow_the_config():
    tiny, paper = get_config("tiny_flow", image_size=128).model, get_config("paper").model
    for model in (tiny, paper):
        specs = graph_specs(model)
        assert tuple(specs) == GRAPHS
        anim = specs[ANIMATOR_GRAPH]
        assert anim.input(PIXELS).shape == (BATCH, TOKENS, model.pixel_dim)
        assert anim.input(KEY_MASK).dtype == "bool"
        assert anim.output("image").concrete(batch=2) == (2, 3, model.image_size, model.image_size)
        assert anim.input(PIXELS).dynamic_axes == {0: BATCH, 1: TOKENS}
    # The tiny model's pixel rows are 8x8 RGB patches; without pixel skip, the mean RGB.
    assert graph_specs(tiny)[ANIMATOR_GRAPH].input(PIXELS).shape[-1] == 192
    assert graph_specs(paper)[ANIMATOR_GRAPH].input(PIXELS).shape[-1] == 3


def test_the_expression_is_a_tensor_only_of_networks_that_have_one():
    plain = get_config("tiny_flow").model
    expressive = get_config("tiny_expression").model
    assert plain.expression_dim == 0 and expressive.expression_dim == 4
    rows = (KEYS, VALUES, PIXELS)
    # Without one the graphs are exactly what they always were.
    before = graph_specs(plain)
    assert before[KEYPOINTS_GRAPH].input_names == (IMAGE,)
    assert before[KEYPOINTS_GRAPH].output_names == (KEYPOINTS, STRENGTH)
    assert before[SOURCE_ENCODER_GRAPH].input_names == (IMAGE, KEYPOINTS, STRENGTH)
    assert before[ANIMATOR_GRAPH].input_names == (KEYPOINTS, STRENGTH, *rows, KEY_MASK)
    after = graph_specs(expressive)
    assert after[KEYPOINTS_GRAPH].output_names == (KEYPOINTS, STRENGTH, EXPRESSION)
    assert after[SOURCE_ENCODER_GRAPH].input_names == (IMAGE, KEYPOINTS, STRENGTH, EXPRESSION)
    assert after[ANIMATOR_GRAPH].input_names == (
        KEYPOINTS,
        STRENGTH,
        EXPRESSION,
        *rows,
        KEY_MASK,
    )
    for spec in (
        after[KEYPOINTS_GRAPH].output(EXPRESSION),
        after[ANIMATOR_GRAPH].input(EXPRESSION),
    ):
        assert spec.shape == (BATCH, 4) and spec.dtype == "float32"
    for name in (SOURCE_ENCODER_GRAPH, ANIMATOR_GRAPH):  # their outputs are unchanged
        assert after[name].outputs == before[name].outputs


def test_feeds_are_in_input_order_and_counted():
    spec = graph_specs(get_config("tiny_flow").model)[ANIMATOR_GRAPH]
    assert list(spec.feeds(*range(6))) == list(spec.input_names)
    with pytest.raises(ValueError):
        spec.feeds(1, 2)
    spec = graph_specs(get_config("tiny_expression").model)[ANIMATOR_GRAPH]
    with pytest.raises(ValueError):
        spec.feeds(*range(6))  # one short: the expression


def test_a_pose_as_graph_tensors_and_back():
    points, strength, expression = np.zeros((1, 20, 2)), np.ones((1, 20)), np.full((1, 4), 2.0)
    assert list(pose_feeds(Pose(points, strength))) == [KEYPOINTS, STRENGTH]
    named = pose_feeds(Pose(points, strength, expression))
    assert list(named) == [KEYPOINTS, STRENGTH, EXPRESSION]
    back = pose_of(named)
    assert back.points is points and back.strength is strength and back.expression is expression
    assert pose_of({KEYPOINTS: points, STRENGTH: strength}).expression is None


def test_image_tensor_round_trip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = image_to_tensor(images)
    assert x.shape == (2, 3, 5, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.array_equal(x[1, 2], images[1, :, :, 2] / np.float32(255.0))
    assert np.array_equal(tensor_to_image(x), images)  # exact: rounding, not truncation
    assert image_to_tensor(images[0]).shape == (1, 3, 5, 7)
    assert np.array_equal(tensor_to_image(x[0]), images[0])
    # Out-of-range outputs are clipped, not wrapped.
    assert tensor_to_image(np.full((3, 1, 1), 1.7))[0, 0].tolist() == [255, 255, 255]
    assert tensor_to_image(np.full((3, 1, 1), -0.2))[0, 0].tolist() == [0, 0, 0]


def test_wrong_layouts_are_refused():
    with pytest.raises(ValueError, match="H, W, 3"):
        image_to_tensor(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_image(np.zeros((8, 8, 3), np.float32))
