"""Typed configurations: the network's shape and how it is trained.

A checkpoint stores its `Config` as JSON, so the shape of a network is never guessed from
its weights. Named presets live in `PRESETS`; `get_config("tiny_flow")` returns a fresh copy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from iwarp.errors import CheckpointError, ConfigError

MultiSourceMode = Literal["attention", "average"]


@dataclass
class ModelConfig:
    """The implicit-warping network (DESIGN.md section 2)."""

    image_size: int = 256
    num_keypoints: int = 20
    # Keypoint detector: runs on image_size / kp_downsample; FOMM-style spatial softmax.
    kp_downsample: int = 4
    kp_channels: tuple[int, ...] = (16, 32, 64, 64)
    kp_temperature: float = 0.1
    # Gaussian keypoint maps: variance in [-1, 1] coordinates, drawn at image_size / kp_downsample.
    kp_variance: float = 0.01
    # Query/key UNets run at image_size / kp_downsample and end on the attention grid.
    query_channels: tuple[int, ...] = (16, 32, 64, 64)
    key_channels: tuple[int, ...] = (32, 64, 64, 64)
    # Attention grid = image_size / attn_stride on each side.
    attn_stride: int = 8
    attn_dim: int = 64  # d: query/key width; scale c = sqrt(d)
    value_channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 stage per entry
    value_dim: int = 64
    extra_tokens: int = 32
    residual_branch: bool = True
    residual_hidden: int = 64
    # Multiplies the positional encoding added to query and key features. Large values make the
    # untrained attention pick the same location in the source (with flow_warp: the network
    # starts as copy-the-source, and learns motion from there instead of from a blur).
    position_scale: float = 1.0
    # Flow warp (issue 17, the shipped design): the attention also returns, per source, its mass
    # and the expected source coordinate of every query (values carry [1, x, y] for their own
    # source). Upsampled to full size, that is a sub-pixel flow and a confidence per source: the
    # full-resolution photos are warped with grid_sample and blended by mass; the extra tokens'
    # mass tells the generator where nothing in the sources matches. False stays as the paper's
    # own layout (every pixel decoded from the grid), which the `paper` presets reproduce.
    flow_warp: bool = False
    # Frozen ImageNet features of each source (EfficientNet-Lite0's first blocks) added to its
    # keys and values through zero-initialised projections (`model.source_features`): source
    # side only, computed once per avatar.
    source_features: bool = False
    # Keys/values/pixels average-pooled by this factor before attention (1 = off).
    spatial_reduction: int = 1
    # "attention": one softmax over all sources (the paper). "average": warp each source
    # separately and average the warped features: the paper's multi-source baseline, which
    # `iwarp eval` runs with the same weights (`evaluation.protocol`), so it stays.
    multi_source_mode: MultiSourceMode = "attention"
    # Generator: res blocks at the grid, then one 2x upsampling per entry of up_channels.
    generator_channels: int = 64
    generator_res_blocks: int = 2
    generator_up_channels: tuple[int, ...] = (32, 16, 8)
    # Expression (issue 28): the keypoint detector sees the driving face at 64 px, where an eye
    # is 2 px tall, so the keypoints carry the head's pose and little of the face's. A small
    # CNN (`model.expression`) reads the face at expression_size and gives expression_dim
    # numbers that training ties to the landmarks' mouth and eye openness
    # (`landmarks.EXPRESSION_NAMES`). They enter the query encoder and the generator (the
    # driver's) and the key encoder (each source's own) as constant planes, through
    # zero-initialised weights. The live path moves them like the keypoints
    # (`motion.relative_expression`). 0 = off.
    expression_dim: int = 0
    expression_size: int = 128
    expression_channels: tuple[int, ...] = (8, 16, 32, 64)
    # The expression encoder's head: 0 flattens the last map as it is (64 channels, 4,096
    # numbers into the 64-unit layer); N > 0 first squeezes it to N channels with a 1x1
    # convolution (and drops out 20 % in training). The wide head learned the training faces'
    # identities: it read unseen faces' mouths and eyes with r 0.24-0.43, the squeezed one
    # (`iwarp train-expression`) with 0.61-0.72 (`docs/RESULTS.md`, "round 4").
    expression_head_channels: int = 0
    # Expression as a gain, not only a plane: each of the query and key encoders' last feature
    # maps and the generator's stem is scaled and shifted per channel by a linear map of the
    # expression (FiLM), zero-initialised. A constant plane into a convolution is a bias the
    # same at every place, and the trained weights left it at zero in the query and key
    # encoders (|w| 0.0005 against 0.04): the warp never moved a lid or a lip. A gain acts
    # where a channel is active, i.e. where the eyes or the mouth are (`docs/RESULTS.md`,
    # "round 6").
    expression_film: bool = False

    # Settings of older checkpoints that this version no longer has, with the one value it can
    # still run: the pixel skip (the weights before issue 17) is retired.
    RETIRED: ClassVar[dict[str, Any]] = {"pixel_skip": False}

    @property
    def grid_size(self) -> int:
        return self.image_size // self.attn_stride

    @property
    def kp_size(self) -> int:
        return self.image_size // self.kp_downsample

    @property
    def tokens_per_source(self) -> int:
        side = self.grid_size // self.spatial_reduction
        return side * side

    @property
    def pixel_dim(self) -> int:
        """Width of a source token's pixel row: its RGB patch (flow warp), or its mean RGB."""
        return 3 * self.attn_stride**2 if self.flow_warp else 3

    def validate(self) -> None:
        if self.image_size % (self.attn_stride * self.spatial_reduction):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by attn_stride * "
                f"spatial_reduction = {self.attn_stride * self.spatial_reduction}"
            )
        if 2 ** len(self.generator_up_channels) != self.attn_stride:
            raise ValueError("generator_up_channels needs one entry per 2x step up to image_size")
        if 2 ** len(self.value_channels) != self.attn_stride:
            raise ValueError("value_channels needs one entry per 2x step down to the grid")
        if self.kp_size // 2 ** (len(self.query_channels) - 1) < 1:
            raise ValueError("query/key UNet is too deep for this image size")
        if self.source_features and self.attn_stride != 8:
            raise ValueError("source_features are taken at stride 8: they need attn_stride 8")
        if self.flow_warp and self.spatial_reduction != 1:
            raise ValueError("flow_warp resamples the photos from their pixel rows: no reduction")
        if self.expression_dim and self.image_size % self.expression_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of expression_size "
                f"{self.expression_size}"
            )
        if self.expression_film and not self.expression_dim:
            raise ValueError(
                "expression_film scales features by the expression: needs expression_dim"
            )
        if self.multi_source_mode not in ("attention", "average"):
            raise ValueError(f"unknown multi_source_mode {self.multi_source_mode!r}")


@dataclass
class LossWeights:
    l1: float = 1.0
    perceptual: float = 0.1
    gan: float = 0.0
    feature_matching: float = 0.0
    equivariance: float = 1.0
    # Flow warp: L1 of the blended full-resolution warp against the target, where the sources
    # claim the pixel (the loss sees the warp itself, not only the generator's repair of it).
    warp_l1: float = 0.0
    # Flow warp: edge-aware second-order smoothness of each source's flow (pixels per cell^2):
    # lets affine head motion through, penalises folds (`losses.flow_smoothness_loss`).
    flow_smoothness: float = 0.0
    # Keeps strengths from collapsing to 0 or saturating: penalises mean strength below a floor.
    strength_floor: float = 0.1
    # Ties some learned keypoints to dlib landmark groups of the driving frame (eye lids, lips,
    # nose, chin; `iwarp.landmarks.LANDMARK_GROUPS`), as LivePortrait guides its keypoints:
    # geometry the network need not discover. Landmarks are found once per frame, offline.
    landmark_guidance: float = 0.0
    # Flow warp: each source's flow at the driving frame's inner-face landmarks must point at
    # the same landmarks in that source (`losses.landmark_flow_loss`). The warp otherwise
    # learns head motion and leaves lids and lips to the generator's paint (issue 28).
    landmark_flow: float = 0.0
    # Temporal consistency: batches become pairs of driving frames a few frames apart with the
    # same sources, and the output's change between them is held to the video's change
    # (L1 of the difference), so that error which changes from frame to frame, seen as flicker,
    # costs more than error that stays put.
    temporal: float = 0.0
    # Stillness, on the same pairs: the output's change where the video does not change
    # (`losses.stillness_loss`). Half the flow warp's frame-to-frame error sits in such pixels
    # (background, a head held still) and none of it is motion to follow. Moving parts cost
    # nothing here, but a generator that blurs everything still lowers it.
    stillness: float = 0.0
    # Flow warp: the same, on the blended warp before the generator, so that the flow itself
    # holds still there instead of the generator smoothing over it.
    warp_stillness: float = 0.0

    # Expression (models with expression_dim > 0): mean squared error of the driving
    # expression against the landmarks' standardised openness (`landmarks.EXPRESSION_NAMES`).
    expression: float = 0.0
    # L1 on the eyes and the mouth alone (their landmarks' boxes, padded): the whole-image L1
    # is mostly head pose and background, where a shut mouth costs a few hundred pixels.
    region_l1: float = 0.0
    # The output's expression as the network's own encoder reads it, against the driving
    # frame's (`losses.output_expression_loss`): the region L1 shrinks a shut mouth's cost to
    # the pixels it misses; this term asks whether the mouth is open as much as the driver's.
    output_expression: float = 0.0

    @property
    def needs_landmarks(self) -> bool:
        """Whether batches need the landmarks of their driving frames and sources."""
        return (
            self.landmark_guidance > 0
            or self.landmark_flow > 0
            or self.expression > 0
            or self.region_l1 > 0
        )

    @property
    def needs_pairs(self) -> bool:
        """Whether batches must be temporal pairs of driving frames."""
        return self.temporal > 0 or self.stillness > 0 or self.warp_stillness > 0

    def override(self, specs: Iterable[str]) -> None:
        """Sets weights from "NAME=W" strings (`iwarp train --loss`, the GPU check)."""
        for spec in specs:
            key, _, value = spec.partition("=")
            if key not in vars(self):
                raise ConfigError(f"unknown loss {key!r}", f"choose from {sorted(vars(self))}")
            try:
                setattr(self, key, float(value))
            except ValueError:
                raise ConfigError(
                    f"loss weight {spec!r} is not NAME=NUMBER", f"e.g. {key}=1.0"
                ) from None


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    batch_size: int = 8
    lr: float = 2e-4
    lr_discriminator: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.5, 0.999)
    max_sources: int = 3
    source_dropout: float = 0.2
    # Std of Gaussian noise added to the driving keypoints the animator sees ([-1, 1] units;
    # 0 = off): trains the attention not to turn the detector's frame-to-frame jitter
    # (about 0.005) into flicker. The keypoint losses see the clean keypoints.
    keypoint_noise: float = 0.0
    # Training crops are made at this size (may be smaller than model.image_size: the network is
    # fully convolutional, so a curriculum can start small).
    train_size: int = 256
    # Share of samples made from portrait stills with synthetic motion (`iwarp train --stills`).
    still_share: float = 0.15
    # Perceptual loss backbone: "efficientnet_lite0" (ships offline) or "vgg19:PATH".
    perceptual_backbone: str = "efficientnet_lite0"
    perceptual_scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    gan_start_step: int = 0
    loss: LossWeights = field(default_factory=LossWeights)
    grad_clip: float = 1.0
    bf16: bool = False
    # One of LR_SCHEDULES: "cosine" decays to lr_min_ratio * lr at the run's last step.
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.05
    # Exponential moving average of the weights (0 = off); the EMA is validated and shipped.
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    sample_every: int = 250
    checkpoint_every: int = 250
    val_every: int = 500
    val_batches: int = 4
    # Landmark guidance: the keypoint tied to each landmark group, in LANDMARK_GROUPS order.
    # Empty: chosen when the run starts, each group getting the keypoint that already sits
    # nearest to it (least disruption to trained weights), then kept in the run's config.
    guided_keypoints: tuple[int, ...] = ()
    # What chooses best.safetensors on the selection split: "l1" or "perceptual" (the training
    # perceptual loss; a GAN fine-tune trades L1 for it).
    select_on: str = "l1"
    # Temporal and stillness losses: the most frames between a pair's two driving frames
    # (1..gap, uniform).
    temporal_gap: int = 2
    # Expression models: the share of samples whose animator gets the driving frame's
    # measured expression (its landmarks') instead of the encoder's, so the rest of the network
    # learns to follow the expression before the encoder reads it well.
    expression_teacher: float = 0.0
    # The share of samples whose driving frame is drawn in proportion to how far its mouth and
    # eyes are from the clip's usual (`ClipDataset.focus_on_expression`): most frames of a
    # clip show the same face, so the open mouths and shut eyes are otherwise rarely asked for.
    expression_focus: float = 0.0
    # The share of samples with 2 or more sources where one source is the clip's frame whose
    # mouth and eyes are nearest the driving frame's, at least MATCH_MIN_GAP frames from it
    # (`ClipDataset.match_sources`): the attention learns to take an open mouth or a shut
    # lid from the photo that has one, the paper's premise, instead of painting it.
    matched_source_share: float = 0.0
    # Expression models: the expression encoder (the reader) keeps its weights and runs in
    # eval mode, so that the renderer learns to follow a reader trained apart
    # (`iwarp train-expression`) instead of pulling it back towards its own losses.
    freeze_expression_encoder: bool = False
    # Networks with `expression_film`: its gains learn at lr x this. They start at zero beside
    # trained layers, and at the run's lr (Adam: about lr per step) they had moved 0.01 in 400
    # steps, a 2 % gain for a two-deviation blink (`docs/RESULTS.md`, "round 6").
    film_lr_scale: float = 10.0

    def validate(self) -> None:
        """ConfigError for settings a run cannot use, before any data is read."""
        if self.select_on not in ("l1", "perceptual") or (
            self.select_on == "perceptual" and self.loss.perceptual <= 0
        ):
            raise ConfigError(
                f"cannot choose checkpoints on {self.select_on!r}",
                "use select_on l1, or perceptual with a perceptual loss weight above 0",
            )
        if self.loss.needs_pairs and (self.batch_size % 2 or self.temporal_gap < 1):
            raise ConfigError(
                f"the temporal and stillness losses train on pairs of frames at least 1 frame "
                f"apart: batch size {self.batch_size}{' is odd' if self.batch_size % 2 else ''}, "
                f"temporal gap {self.temporal_gap}",
                "use an even --batch-size and --temporal-gap 1 or more",
            )
        if not self.keypoint_noise >= 0:
            raise ConfigError(
                f"keypoint noise {self.keypoint_noise} is not a standard deviation",
                "use --keypoint-noise 0 (off) or more, e.g. 0.01",
            )
        if not 0 <= self.expression_focus <= 1:
            raise ConfigError(
                f"expression focus {self.expression_focus} is not a share of samples",
                "use --expression-focus between 0 (off) and 1",
            )
        if not 0 <= self.matched_source_share <= 1:
            raise ConfigError(
                f"matched source share {self.matched_source_share} is not a share of samples",
                "use --matched-source-share between 0 (off) and 1",
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {self.lr_schedule!r}", f"use one of {', '.join(LR_SCHEDULES)}"
            )


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))


def _from_dict(kind: type, data: dict[str, Any]) -> Any:
    """Rebuilds nested dataclasses, turning JSON lists back into tuples; unknown keys fail."""
    hints = {f.name: f for f in dataclasses.fields(kind)}
    retired = getattr(kind, "RETIRED", {})
    for name in set(data) & set(retired):
        if data[name] != retired[name]:
            raise CheckpointError(
                f"{kind.__name__}.{name} = {data[name]!r} is retired: this iwarp cannot run it",
                f"use weights of the {SHIPPED_CONFIG} config, e.g. the shipped ones",
            )
    data = {name: value for name, value in data.items() if name not in retired}
    unknown = set(data) - set(hints)
    if unknown:
        raise CheckpointError(
            f"unknown configuration keys {sorted(unknown)} for {kind.__name__}",
            "the checkpoint was written by a newer iwarp; upgrade iwarp",
        )
    values = {}
    for name, value in data.items():
        default = getattr(kind(), name)
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple):
            value = tuple(value)
        values[name] = value
    return kind(**values)


def _paper(size: int = 256) -> Config:
    """The paper's widths: d = 256, attention at 1/8 of the image side."""
    model = ModelConfig(
        image_size=size,
        kp_channels=(64, 128, 256, 512, 512),
        query_channels=(64, 128, 256, 512),
        key_channels=(64, 128, 256, 512),
        attn_dim=256,
        value_channels=(64, 128, 256),
        value_dim=256,
        residual_hidden=256,
        generator_channels=256,
        generator_res_blocks=6,
        generator_up_channels=(128, 64, 32),
    )
    train = TrainConfig(batch_size=16, train_size=size)
    train.loss.gan = 1.0
    train.loss.feature_matching = 10.0
    return Config(name="paper" if size == 256 else f"paper{size}", model=model, train=train)


def _tiny_flow() -> Config:
    config = Config(name="tiny_flow", model=ModelConfig(flow_warp=True, position_scale=3.0))
    config.train.loss.warp_l1 = 1.0
    config.train.loss.flow_smoothness = 0.01
    config.train.lr_schedule = "cosine"
    config.train.ema_decay = 0.999
    return config


def _tiny_expression() -> Config:
    """tiny_flow with the driving side's expression (issue 28) and its losses."""
    config = _tiny_flow()
    config.name = "tiny_expression"
    config.model.expression_dim = 4
    config.train.loss.expression = 1.0
    config.train.loss.region_l1 = 1.0
    config.train.expression_teacher = 0.5
    return config


PRESETS = {
    "tiny_flow": _tiny_flow,
    "tiny_expression": _tiny_expression,
    "paper": _paper,
    "paper512": lambda: _paper(512),
}
# The preset of the shipped weights (`paths.DEFAULT_CHECKPOINT`): what commands default to.
SHIPPED_CONFIG = "tiny_flow"


def get_config(name: str, image_size: int | None = None) -> Config:
    """A fresh copy of a named preset, optionally at another image size."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown config {name!r}", f"choose one of: {', '.join(sorted(PRESETS))}"
        )
    config = PRESETS[name]()
    if image_size is not None:
        config.model.image_size = image_size
    config.model.validate()
    return config
