"""Implicit warping: one cross-attention layer from driving queries to source keys/values.

A = softmax(Q K^T / sqrt(d)) over every token of every source plus learned extra tokens;
warped = A V + MLP([A P | A K | Q]). One attention call over V' = [V | P | C | K] computes
A V, A P, A C and A K together, so the (queries x keys) matrix is never needed outside the
kernel. P is each token's mean colour; with the flow warp, C carries each token's source and
place (`source_coordinates`), so A C is a per-source mass and expected source coordinate: the
flow (`render_flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iwarp.config import ModelConfig
from iwarp.model.encoders import sincos_position_encoding
from iwarp.model.keypoints import Keypoints


@dataclass
class SourceSet:
    """An avatar's cached source side, everything the per-frame path needs.

    Tokens of all sources are concatenated: source i owns rows [i*T, (i+1)*T).
    keys (B, N*T, d) are projected and position-encoded; values (B, N*T, dv);
    pixels (B, N*T, p) with p = ModelConfig.pixel_dim: each token's RGB patch (flow warp: the
    full-resolution photo itself, `photos_from_pixels`) or its mean RGB; mask
    (B, N*T) is True where a token may be attended to.
    """

    keypoints: Keypoints  # points (B, N, K, 2), strength (B, N, K)
    keys: torch.Tensor
    values: torch.Tensor
    pixels: torch.Tensor
    mask: torch.Tensor
    num_sources: int
    image_size: int

    @property
    def tokens_per_source(self) -> int:
        return self.keys.shape[1] // self.num_sources


def tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major like the positional encoding."""
    return features.flatten(2).transpose(1, 2)


class ImplicitWarp(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, dv, e = config.attn_dim, config.value_dim, config.extra_tokens
        self.residual_branch = config.residual_branch
        self.flow_warp = config.flow_warp
        self.multi_source_mode = config.multi_source_mode
        self.value_dim = dv
        self.query_proj = nn.Linear(d, d)
        self.key_proj = nn.Linear(d, d)
        self.position_scale = config.position_scale
        if config.flow_warp:
            # Start from the identity warp: queries and keys are their features plus the
            # positional code, so untrained attention matches each place with itself.
            for proj in (self.query_proj, self.key_proj):
                nn.init.eye_(proj.weight)
                nn.init.zeros_(proj.bias)
        self.extra_keys = nn.Parameter(torch.randn(e, d) * 0.02)
        self.extra_values = nn.Parameter(torch.randn(e, dv) * 0.02)
        # The extra tokens' colours (the attention carries the sources' mean colours).
        self.extra_pixels = nn.Parameter(torch.full((e, 3), 0.5))
        # Pixels per attention cell; the grid side follows the image (training may run smaller).
        self.cell_size = config.attn_stride * config.spatial_reduction
        if self.residual_branch:
            self.residual = nn.Sequential(
                nn.Linear(3 + d + d, config.residual_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(config.residual_hidden, dv),
            )
        self._pe_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def grid_side(self, source: SourceSet) -> int:
        """Side of the source's attention grid (T = side^2 tokens per source)."""
        return source.image_size // self.cell_size

    def position_encoding(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.shape[-1], str(like.device))
        if key not in self._pe_cache:
            pe = sincos_position_encoding(size, like.shape[-1]) * self.position_scale
            self._pe_cache[key] = pe.to(like.device)
        return self._pe_cache[key].to(like.dtype)

    def project_keys(self, key_features: torch.Tensor) -> torch.Tensor:
        """(B, d, g, g) key features -> (B, g*g, d) projected keys with position encoding."""
        t = tokens(key_features)
        return self.key_proj(t + self.position_encoding(key_features.shape[-1], t))

    def project_queries(self, query_features: torch.Tensor) -> torch.Tensor:
        t = tokens(query_features)
        return self.query_proj(t + self.position_encoding(query_features.shape[-1], t))

    def forward(
        self, queries: torch.Tensor, source: SourceSet, source_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries (B, Nq, d) -> warped features (B, Nq, dv), warped colours (B, Nq, 3) and
        per-source coordinate sums (B, Nq, 3N).

        The warped colours are A P over the tokens' mean colours, which only the residual branch
        reads (without it they are an empty (B, Nq, 0) tensor). The coordinate sums are
        A [1, x, y] per source (flow warp; else (B, Nq, 0)): `render_flow` turns them into
        the warped photos.
        """
        mask = source.mask
        if source_dropout > 0 and self.extra_keys.shape[0] > 0:
            # Teaches the extra tokens to stand in where no source location fits.
            mask = mask & (torch.rand(mask.shape, device=mask.device) >= source_dropout)
        if self.multi_source_mode == "average" and source.num_sources > 1:
            t = source.tokens_per_source
            owner = torch.arange(mask.shape[1], device=mask.device) // t
            outs = [
                self._attend(queries, source, mask & (owner == i))
                for i in range(source.num_sources)
            ]
            return tuple(torch.stack(parts).mean(0) for parts in zip(*outs, strict=True))
        return self._attend(queries, source, mask)

    def _attend(
        self, queries: torch.Tensor, source: SourceSet, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = queries.shape[0]
        e = self.extra_keys.shape[0]
        keys = torch.cat([source.keys, self.extra_keys.expand(b, e, -1)], dim=1)
        parts = [torch.cat([source.values, self.extra_values.expand(b, e, -1)], dim=1)]
        pixels = source.pixels
        if self.flow_warp:  # the patches' mean colours: A (mean P) = mean (A P), 64x narrower
            pixels = pixels.unflatten(-1, (3, -1)).mean(-1)
        if self.residual_branch:
            parts.append(torch.cat([pixels, self.extra_pixels.expand(b, e, -1)], dim=1))
        c = 3 * source.num_sources if self.flow_warp else 0
        if self.flow_warp:
            side = self.grid_side(source)
            coords = source_coordinates(source.num_sources, side, keys, extra_rows=e)
            parts.append(coords.expand(b, -1, -1))
        if self.residual_branch:
            parts.append(keys)
        full_mask = torch.cat([mask, mask.new_ones(b, e)], dim=1)
        out = attention(queries, keys, torch.cat(parts, dim=2), full_mask)
        dv, p = self.value_dim, 3 if self.residual_branch else 0
        warped, colours = out[..., :dv], out[..., dv : dv + p]
        coordinate_sums = out[..., dv + p : dv + p + c]
        if self.residual_branch:
            warped = warped + self.residual(
                torch.cat([colours, out[..., dv + p + c :], queries], dim=2)
            )
        return warped, colours, coordinate_sums


def source_coordinates(
    num_sources: int, grid_side: int, like: torch.Tensor, extra_rows: int = 0
) -> torch.Tensor:
    """(1, N*T + extra_rows, 3N), T = grid_side^2: token j of source i carries [1, x, y] (its
    cell centre in [-1, 1], the grid_sample convention) in columns 3i..3i+2 and zeros
    elsewhere, so attention over these rows gives, per source, its mass and the mass-weighted
    expected source coordinate; the extra tokens' rows are all zeros.

    Built from comparisons and a Where (no torch.eye, no cast, no zeros of a computed shape),
    so that N may be a symbolic size in the exported animator graph (N = tokens / T) and FP16
    converters see no float32 constant they cannot convert.
    """
    t = grid_side * grid_side
    centres = (torch.arange(grid_side, device=like.device, dtype=like.dtype) + 0.5) * (
        2 / grid_side
    ) - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    one = torch.stack([torch.ones_like(x), x, y], dim=-1).reshape(t, 3)
    rows = torch.arange(num_sources * t + extra_rows, device=like.device)
    owner_row = torch.where(rows < num_sources * t, rows // t, -1)  # extra rows: no source
    owner_col = torch.arange(3 * num_sources, device=like.device) // 3
    tiled = torch.cat(
        [one.repeat(num_sources, num_sources), one[:1, :1].expand(extra_rows, 3 * num_sources)]
    )  # the extra rows' values are never picked (their owner matches no column)
    block = owner_row[:, None] == owner_col[None, :]
    return torch.where(block, tiled, 0.0).unsqueeze(0)


def photos_from_pixels(pixels: torch.Tensor, grid_side: int) -> torch.Tensor:
    """Pixel rows (B, N*T, 3 s^2), each token's s x s RGB patch, -> photos (B, N, 3, H, W): the
    inverse of the source encoder's pixel_unshuffle, lossless. N may be symbolic (export)."""
    b, rows, width = pixels.shape
    stride = round((width // 3) ** 0.5)
    n = rows // (grid_side * grid_side)
    grid = pixels.reshape(b * n, grid_side, grid_side, width).permute(0, 3, 1, 2)
    photos = F.pixel_shuffle(grid, stride)
    return photos.reshape(b, n, 3, grid_side * stride, grid_side * stride)


@dataclass
class FlowWarp:
    """The flow warp at full resolution: what the generator sees, and the flow behind it."""

    blended: torch.Tensor  # (B, 3, H, W) the sources warped and blended by mass
    unmatched: torch.Tensor  # (B, 1, H, W) the extra tokens' share: nothing matches here
    flow: torch.Tensor  # (B, N, 2, H, W) per source: the source (x, y) in [-1, 1] per pixel
    mass: torch.Tensor  # (B, N, 1, H, W) per source: its share of the attention


def render_flow(coordinate_sums: torch.Tensor, photos: torch.Tensor, grid_side: int) -> FlowWarp:
    """Per-source attention mass and coordinate sums on the grid -> the full-resolution warp.

    coordinate_sums (B, g*g, 3N), photos (B, N, 3, H, W). Mass and mass-weighted coordinates
    are upsampled separately (bilinear) and divided afterwards, so the flow is a smooth,
    confidence-weighted field with sub-pixel motion. Returns the mass-blended warp of all
    sources and the extra tokens' share: where no source matches.
    """
    b, n, _, h, w = photos.shape
    sums = coordinate_sums.transpose(1, 2).reshape(b, 3 * n, grid_side, grid_side)
    sums = F.interpolate(sums, size=(h, w), mode="bilinear", align_corners=False)
    sums = sums.reshape(b, n, 3, h, w)
    mass = sums[:, :, :1]  # (B, N, 1, H, W)
    flow = sums[:, :, 1:] / mass.clamp_min(1e-4)  # expected source (x, y) per source
    warped = F.grid_sample(
        photos.flatten(0, 1),
        flow.flatten(0, 1).permute(0, 2, 3, 1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    ).reshape(b, n, 3, h, w)
    total = mass.sum(1)
    blended = (warped * mass).sum(1) / total.clamp_min(1e-4)
    return FlowWarp(blended, (1 - total).clamp(0.0, 1.0), flow, mass)


def values_at(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """A field (B, C, H, W) read bilinearly at points (B, P, 2) in [-1, 1] (the grid_sample
    convention) -> (B, P, C): e.g. a source's flow at landmarks."""
    values = F.grid_sample(field, points[:, None], mode="bilinear", align_corners=False)
    return values[:, :, 0].transpose(1, 2)


def attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d), masked) V for (B, Nq, d), (B, Nk, d), (B, Nk, dv), (B, Nk) bool.

    The single place where the network attends: the ONNX export, the TensorRT plugin rewrite
    and the fused CUDA kernel all replace exactly this computation. On CUDA at inference the
    fused kernel (plugins/kernels) runs it where a device measurement found it faster than
    SDPA (`fused_attention.choose_for`), when it builds; it has no backward, so training and
    the CPU use PyTorch's SDPA.
    """
    if queries.is_cuda and not torch.is_grad_enabled():
        from iwarp.model import fused_attention

        if fused_attention.choose_for(queries, keys, values).backend == "fused" and (
            fused_attention.load()
        ):
            return fused_attention.attention(queries, keys, values, mask)
    out = F.scaled_dot_product_attention(
        queries.unsqueeze(1),
        keys.unsqueeze(1),
        values.unsqueeze(1),
        attn_mask=mask[:, None, None, :],
    )
    return out.squeeze(1)
