"""The graph contract (iwarp.graphs): shapes from the config, and the image <-> tensor form."""

from __future__ import annotations

import numpy as np
import pytest

from iwarp.config import get_config
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    BATCH,
    GRAPHS,
    INPUTS,
    KEY_MASK,
    OUTPUTS,
    PIXELS,
    TOKENS,
    feeds,
    graph_specs,
    image_to_tensor,
    tensor_to_image,
)


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
        for name, spec in specs.items():
            assert spec.input_names == INPUTS[name]
            assert spec.output_names == OUTPUTS[name]
    # The tiny model's pixel rows are 8x8 RGB patches; without pixel skip, the mean RGB.
    assert graph_specs(tiny)[ANIMATOR_GRAPH].input(PIXELS).shape[-1] == 192
    assert graph_specs(paper)[ANIMATOR_GRAPH].input(PIXELS).shape[-1] == 3


def test_feeds_are_in_input_order_and_counted():
    assert list(feeds(ANIMATOR_GRAPH, *range(6))) == list(INPUTS[ANIMATOR_GRAPH])
    with pytest.raises(ValueError):
        feeds(ANIMATOR_GRAPH, 1, 2)


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
