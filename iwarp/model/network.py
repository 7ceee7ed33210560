"""The whole network and its split API.

    encode_sources(images)  -> SourceSet        once per avatar
    detect(driving)         -> Keypoints        per frame
    animate(source, kp)     -> image            per frame

`forward(sources, driving)` is exactly their composition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.encoders import KeyEncoder, QueryEncoder, ValueEncoder, downsample_to
from iwarp.model.expression import ExpressionEncoder, expression_planes
from iwarp.model.generator import Generator
from iwarp.model.keypoints import KeypointDetector, Keypoints, keypoint_maps
from iwarp.model.source_features import CHANNELS as SOURCE_FEATURE_CHANNELS
from iwarp.model.source_features import SourceFeatures
from iwarp.model.warp import (
    FlowWarp,
    ImplicitWarp,
    SourceSet,
    photos_from_pixels,
    render_flow,
    tokens,
)

# (warped features, warped colours, coordinate sums) -> the same, changed: animate_with_warp.
AttentionFilter = Callable[
    [tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


@dataclass
class GeneratorInputs:
    """What the generator paints from: the warped features with the driving expression's
    planes, and (flow warp) the full-resolution warp, whose blended photo and unmatched share
    it also sees."""

    features: torch.Tensor  # (B, C + E, g, g)
    flow: FlowWarp | None

    def detached(self) -> GeneratorInputs:
        """The same inputs cut from the graph: a loss on what the generator paints from them
        trains the generator alone."""
        flow = self.flow
        if flow is not None:
            flow = FlowWarp(
                flow.blended.detach(),
                flow.unmatched.detach(),
                flow.flow.detach(),
                flow.mass.detach(),
            )
        return GeneratorInputs(self.features.detach(), flow)


class ImplicitWarpingNetwork(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.keypoint_detector = KeypointDetector(config)
        self.query_encoder = QueryEncoder(config)
        self.key_encoder = KeyEncoder(config)
        self.value_encoder = ValueEncoder(config)
        self.warp = ImplicitWarp(config)
        self.generator = Generator(config)
        self.expression_encoder = ExpressionEncoder(config) if config.expression_dim else None
        if config.expression_dim:
            # The expression planes (query and key encoders, generator) start with no effect:
            # the network begins as the one without them (a fine-tune from such weights,
            # `train.trainer.load_compatible`, zeroes the same weights).
            for stem in (
                self.query_encoder.unet.stem,
                self.key_encoder.unet.stem,
                self.generator.stem,
            ):
                with torch.no_grad():
                    stem[0].weight[:, -config.expression_dim :].zero_()
        if config.source_features:
            self.source_features = SourceFeatures()
            # Zero-initialised: the network starts exactly as the one without the features.
            self.source_key_proj = nn.Conv2d(SOURCE_FEATURE_CHANNELS, config.attn_dim, 1)
            self.source_value_proj = nn.Conv2d(SOURCE_FEATURE_CHANNELS, config.value_dim, 1)
            for proj in (self.source_key_proj, self.source_value_proj):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
        if config.flow_warp:
            # Identity flow at step 0: queries and keys start as the positional code alone, so
            # each query's attention is symmetric around its own cell and its expected source
            # coordinate is its own position; training learns motion as departures from it.
            for encoder in (self.query_encoder, self.key_encoder):
                nn.init.zeros_(encoder.out.weight)
                nn.init.zeros_(encoder.out.bias)

    # -- per frame -------------------------------------------------------------------------
    def detect(self, driving: torch.Tensor) -> Keypoints:
        """Driving frame(s) (B, 3, H, W) in [0, 1] -> keypoints, strength [and expression]."""
        kp = self.keypoint_detector(driving)
        if self.expression_encoder is not None:
            kp.expression = self.expression_encoder(driving)
        return kp

    def animate(
        self, source: SourceSet, driving: Keypoints, source_dropout: float = 0.0
    ) -> torch.Tensor:
        """An avatar's source set + driving keypoints -> image (B, 3, H, W) in [0, 1]."""
        return self.animate_with_warp(source, driving, source_dropout)[0]

    def animate_with_warp(
        self,
        source: SourceSet,
        driving: Keypoints,
        source_dropout: float = 0.0,
        attention_filter: AttentionFilter | None = None,
    ) -> tuple[torch.Tensor, FlowWarp | None]:
        """`animate`, also returning the flow warp (None without flow_warp): training puts a
        loss on the warp itself, evaluation carries landmarks with its flow.

        `attention_filter`, when given, receives the attention's outputs (warped features,
        warped colours, coordinate sums; `ImplicitWarp.forward`) and returns them changed, before
        the flow is rendered: `bench/live_smoothing_sweep.py` smooths them over time with it.
        """
        inputs = self.warp_to_driving(source, driving, source_dropout, attention_filter)
        return self.paint(inputs), inputs.flow

    def warp_to_driving(
        self,
        source: SourceSet,
        driving: Keypoints,
        source_dropout: float = 0.0,
        attention_filter: AttentionFilter | None = None,
    ) -> GeneratorInputs:
        """The attention's half of `animate_with_warp`: the sources warped to the driving
        keypoints, as the generator's inputs."""
        kp_size = source.image_size // self.config.kp_downsample
        maps = keypoint_maps(driving, kp_size, self.config.kp_variance)
        query_features = self.query_encoder(
            torch.cat([maps, expression_planes(driving.expression, maps)], dim=1)
        )
        queries = self.warp.project_queries(query_features)
        attended = self.warp(queries, source, source_dropout)
        if attention_filter is not None:
            attended = attention_filter(attended)
        warped, _, coordinate_sums = attended
        g = query_features.shape[-1]
        warped = warped.transpose(1, 2).reshape(warped.shape[0], -1, g, g)
        # The generator paints what the warp cannot move (a mouth's inside, a shut lid): it
        # sees the driving expression beside the warped features.
        warped = torch.cat([warped, expression_planes(driving.expression, warped)], dim=1)
        if not self.config.flow_warp:
            return GeneratorInputs(warped, None)
        photos = photos_from_pixels(source.pixels, self.warp.grid_side(source))
        return GeneratorInputs(warped, render_flow(coordinate_sums, photos, g))

    def paint(self, inputs: GeneratorInputs) -> torch.Tensor:
        """The generator's half of `animate_with_warp`: its inputs -> image (B, 3, H, W)."""
        if inputs.flow is None:
            return self.generator(inputs.features)
        flow = inputs.flow
        return self.generator(inputs.features, torch.cat([flow.blended, flow.unmatched], dim=1))

    # -- per avatar ------------------------------------------------------------------------
    def encode_sources(self, images: torch.Tensor) -> SourceSet:
        """Source images (B, N, 3, H, W) in [0, 1] -> the avatar's cached source set."""
        b, n = images.shape[:2]
        flat = images.flatten(0, 1)
        kp = self.detect(flat)
        return self.encode_with_keypoints(flat, kp, b, n)

    def encode_with_keypoints(
        self, flat: torch.Tensor, kp: Keypoints, batch: int, num_sources: int
    ) -> SourceSet:
        """`encode_sources` after detection; flat images (B*N, 3, H, W)."""
        cfg = self.config
        kp_size = flat.shape[-1] // cfg.kp_downsample
        grid = flat.shape[-1] // cfg.attn_stride
        maps = keypoint_maps(kp, kp_size, cfg.kp_variance)
        key_features = self.key_encoder(
            torch.cat(
                [maps, downsample_to(flat, kp_size), expression_planes(kp.expression, maps)], dim=1
            )
        )
        value_features = self.value_encoder(flat)
        if cfg.source_features:
            imagenet = self.source_features(flat)
            key_features = key_features + self.source_key_proj(imagenet)
            value_features = value_features + self.source_value_proj(imagenet)
        # Pixel rows: each grid cell's RGB patch (flow warp: the photo the flow resamples, in
        # token layout so an avatar stays keys + values + pixels) or its mean colour.
        pixels = (
            nn.functional.pixel_unshuffle(flat, cfg.attn_stride)
            if cfg.flow_warp
            else downsample_to(flat, grid)
        )
        r = cfg.spatial_reduction
        if r > 1:
            pool = nn.functional.avg_pool2d
            key_features, value_features, pixels = (
                pool(key_features, r),
                pool(value_features, r),
                pool(pixels, r),
            )
        keys = self.warp.project_keys(key_features)
        t = keys.shape[1]

        def join(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, num_sources * t, -1)

        return SourceSet(
            keypoints=Keypoints(
                kp.points.reshape(batch, num_sources, *kp.points.shape[1:]),
                kp.strength.reshape(batch, num_sources, -1),
                None if kp.expression is None else kp.expression.reshape(batch, num_sources, -1),
            ),
            keys=join(keys),
            values=join(tokens(value_features)),
            pixels=join(tokens(pixels)),
            mask=torch.ones(batch, num_sources * t, dtype=torch.bool, device=flat.device),
            num_sources=num_sources,
            image_size=flat.shape[-1],
        )

    # -- both --------------------------------------------------------------------------------
    def forward(
        self, sources: torch.Tensor, driving: torch.Tensor, source_dropout: float = 0.0
    ) -> tuple[torch.Tensor, Keypoints, SourceSet]:
        """sources (B, N, 3, H, W), driving (B, 3, H, W) -> (image, driving kp, source set)."""
        source = self.encode_sources(sources)
        kp = self.detect(driving)
        return self.animate(source, kp, source_dropout), kp, source
