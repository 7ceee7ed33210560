"""The contract of the three ONNX graphs: names, shapes, dtypes and the image <-> tensor form.

    keypoints       image (B, 3, S, S) in [0, 1]        -> keypoints (B, K, 2), strength (B, K)
                                                           [, expression (B, E)]
    source_encoder  image, keypoints, strength
                    [, expression]                      -> keys (B, T, d), values (B, T, dv),
                                                           pixels (B, T, p)
    animator        keypoints, strength [, expression]
                    (driving) + keys, values, pixels
                    (B, NT, .), key_mask (B, NT) bool    -> image (B, 3, S, S) in [0, 1]

`expression` is there only for a network with one (`ModelConfig.expression_dim` E > 0): the
driving face's expression (`model.expression`) beside its keypoints; the source encoder takes
each photo's own. Without one (E = 0, the shipped weights) the graphs have exactly the other
tensors. Keypoints, strength and expression travel together as a `motion.Pose`
(`pose_feeds`, `pose_of`).

`pixels` are each source token's RGB patch (3 x stride^2: the pixel skip, and the flow warp,
whose animator reassembles the full-resolution photos from them and resamples them with its
flow) or its mean RGB (3). The animator's number of sources is TOKENS / T, T fixed by the
config, so an avatar is always keys + values + pixels, whatever the design.

Export (`iwarp.engine_build.export`), every backend, the parity check and calibration read
the names and shapes from here (`graph_specs(config)`: which inputs a graph has depends on the
config), so a change to a graph's inputs is made once. Shapes come from the model config; the
symbolic dims are `BATCH` (every graph) and `TOKENS` (the animator's avatar rows: N sources x
T tokens). This module imports only `iwarp.config`, `iwarp.motion` (and numpy): the torch-free
backends use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from iwarp.config import ModelConfig
from iwarp.motion import Pose

# Graph names, in run order (also the ONNX file stems and the TensorRT stage names).
GRAPHS = KEYPOINTS_GRAPH, SOURCE_ENCODER_GRAPH, ANIMATOR_GRAPH = (
    "keypoints",
    "source_encoder",
    "animator",
)
# Tensor names. An avatar's rows (AVATAR_ROWS) are the source encoder's outputs, joined along
# the token axis for the animator.
IMAGE, KEYPOINTS, STRENGTH, KEY_MASK = "image", "keypoints", "strength", "key_mask"
EXPRESSION = "expression"  # only in the graphs of a network with an expression (E > 0)
AVATAR_ROWS = KEYS, VALUES, PIXELS = "keys", "values", "pixels"
# Symbolic dims.
BATCH, TOKENS = "batch", "tokens"

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (ints and symbolic dim names) and numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """{axis: symbolic dim name} of the axes that are not fixed by the config."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, **dims: int) -> tuple[int, ...]:
        """The shape with the symbolic dims given, e.g. `concrete(batch=1, tokens=1024)`."""
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def as_dict(self) -> dict[str, object]:
        """The form `metadata.json` records for each graph input and output."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no output {name!r}")

    def feeds(self, *tensors: Any) -> dict[str, Any]:
        """{input name: tensor}, tensors given in this graph's input order (all of them)."""
        return dict(zip(self.input_names, tensors, strict=True))

    def named_outputs(self, outputs: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        """{output name: tensor} of a run's outputs, given in this graph's output order."""
        return dict(zip(self.output_names, outputs, strict=True))


def graph_specs(model: ModelConfig) -> dict[str, GraphSpec]:
    """The three graphs' inputs and outputs for a network of this config."""
    s, k = model.image_size, model.num_keypoints
    t = model.tokens_per_source
    image = TensorSpec(IMAGE, (BATCH, 3, s, s))
    pose: tuple[TensorSpec, ...] = (
        TensorSpec(KEYPOINTS, (BATCH, k, 2)),
        TensorSpec(STRENGTH, (BATCH, k)),
    )
    if model.expression_dim > 0:
        pose += (TensorSpec(EXPRESSION, (BATCH, model.expression_dim)),)

    def rows(tokens: Dim) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(KEYS, (BATCH, tokens, model.attn_dim)),
            TensorSpec(VALUES, (BATCH, tokens, model.value_dim)),
            TensorSpec(PIXELS, (BATCH, tokens, model.pixel_dim)),
        )

    return {
        KEYPOINTS_GRAPH: GraphSpec(KEYPOINTS_GRAPH, (image,), pose),
        SOURCE_ENCODER_GRAPH: GraphSpec(SOURCE_ENCODER_GRAPH, (image, *pose), rows(t)),
        ANIMATOR_GRAPH: GraphSpec(
            ANIMATOR_GRAPH,
            (*pose, *rows(TOKENS), TensorSpec(KEY_MASK, (BATCH, TOKENS), "bool")),
            (image,),
        ),
    }


# --------------------------------------------------------------------------- poses


def pose_feeds(pose: Pose) -> dict[str, Any]:
    """A pose as graph tensors: {keypoints, strength[, expression]} (the expression only when
    the pose has one, as only the graphs of a network with one take it)."""
    named = {KEYPOINTS: pose.points, STRENGTH: pose.strength}
    if pose.expression is not None:
        named[EXPRESSION] = pose.expression
    return named


def pose_of(named: Mapping[str, Any]) -> Pose:
    """The pose among named graph tensors (the keypoints graph's outputs); expression None
    when they have none."""
    return Pose(named[KEYPOINTS], named[STRENGTH], named.get(EXPRESSION))


# --------------------------------------------------------------------------- images


def image_to_tensor(images: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1], C-contiguous.

    The one conversion from pictures to graph input: the runtime, calibration, training and
    evaluation all feed the network through it (torch callers wrap it in torch.from_numpy).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) images, got {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def tensor_to_image(tensor: np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) or (3, H, W) in [0, 1] -> uint8 (B, H, W, 3) or (H, W, 3), rounded;
    values outside [0, 1] are clipped."""
    tensor = np.asarray(tensor)
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) tensors, got {tensor.shape}")
    hwc = np.moveaxis(tensor, -3, -1)
    return (np.clip(hwc, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
