"""The contract of the three ONNX graphs: names, shapes, dtypes and the image <-> tensor form.

    keypoints       image (B, 3, S, S) in [0, 1]        -> keypoints (B, K, 2), strength (B, K)
    source_encoder  image, keypoints, strength          -> keys (B, T, d), values (B, T, dv),
                                                           pixels (B, T, p)
    animator        keypoints, strength (driving) +
                    keys, values, pixels (B, NT, .),
                    key_mask (B, NT) bool                -> image (B, 3, S, S) in [0, 1]

`pixels` are each source token's RGB patch (3 x stride^2: the pixel skip, and the flow warp,
whose animator reassembles the full-resolution photos from them and resamples them with its
flow) or its mean RGB (3). The animator's number of sources is TOKENS / T, T fixed by the
config, so an avatar is always keys + values + pixels, whatever the design.

Export (`iwarp.engine_build.export`), every backend, the parity check and calibration read
the names and shapes from here, so a change to a graph's inputs is made once. Shapes come
from the model config; the symbolic dims are `BATCH` (every graph) and `TOKENS` (the
animator's avatar rows: N sources x T tokens). This module imports only `iwarp.config` (and
numpy): the torch-free backends use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iwarp.config import ModelConfig

# Graph names, in run order (also the ONNX file stems and the TensorRT stage names).
GRAPHS = KEYPOINTS_GRAPH, SOURCE_ENCODER_GRAPH, ANIMATOR_GRAPH = (
    "keypoints",
    "source_encoder",
    "animator",
)
# Tensor names. An avatar's rows (AVATAR_ROWS) are the source encoder's outputs, joined along
# the token axis for the animator.
IMAGE, KEYPOINTS, STRENGTH, KEY_MASK = "image", "keypoints", "strength", "key_mask"
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


def graph_specs(model: ModelConfig) -> dict[str, GraphSpec]:
    """The three graphs' inputs and outputs for a network of this config."""
    s, k = model.image_size, model.num_keypoints
    t = model.tokens_per_source
    image = TensorSpec(IMAGE, (BATCH, 3, s, s))
    points = TensorSpec(KEYPOINTS, (BATCH, k, 2))
    strength = TensorSpec(STRENGTH, (BATCH, k))

    def rows(tokens: Dim) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(KEYS, (BATCH, tokens, model.attn_dim)),
            TensorSpec(VALUES, (BATCH, tokens, model.value_dim)),
            TensorSpec(PIXELS, (BATCH, tokens, model.pixel_dim)),
        )

    return {
        KEYPOINTS_GRAPH: GraphSpec(KEYPOINTS_GRAPH, (image,), (points, strength)),
        SOURCE_ENCODER_GRAPH: GraphSpec(SOURCE_ENCODER_GRAPH, (image, points, strength), rows(t)),
        ANIMATOR_GRAPH: GraphSpec(
            ANIMATOR_GRAPH,
            (points, strength, *rows(TOKENS), TensorSpec(KEY_MASK, (BATCH, TOKENS), "bool")),
            (image,),
        ),
    }


# Names only (they do not depend on the config), for code that has no config at hand.
_NAMES = graph_specs(ModelConfig())
INPUTS: dict[str, tuple[str, ...]] = {g: spec.input_names for g, spec in _NAMES.items()}
OUTPUTS: dict[str, tuple[str, ...]] = {g: spec.output_names for g, spec in _NAMES.items()}


def feeds(graph: str, *tensors: object) -> dict[str, object]:
    """{input name: tensor} for one graph, tensors given in the graph's input order."""
    return dict(zip(INPUTS[graph], tensors, strict=True))


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
