"""Implicit warping: one cross-attention layer from driving queries to source keys/values.

A = softmax(Q K^T / sqrt(d)) over every token of every source plus learned extra tokens;
warped = A V + MLP([A P | A K | Q]). One attention call over V' = [V | P | K] computes A V,
A P and A K together, so the (queries x keys) matrix is never needed outside the kernel.
With the pixel skip, P holds each token's RGB patch and A P is also handed to the generator.
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
    pixels (B, N*T, p) with p = ModelConfig.pixel_dim; mask (B, N*T) is True where a token may
    be attended to.
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
        self.pixel_skip = config.pixel_skip
        self.multi_source_mode = config.multi_source_mode
        self.value_dim = dv
        self.query_proj = nn.Linear(d, d)
        self.key_proj = nn.Linear(d, d)
        self.position_scale = config.position_scale
        if config.pixel_skip:
            # Start from the identity warp: queries and keys are their features plus the
            # positional code, so untrained attention matches each place with itself.
            for proj in (self.query_proj, self.key_proj):
                nn.init.eye_(proj.weight)
                nn.init.zeros_(proj.bias)
        self.extra_keys = nn.Parameter(torch.randn(e, d) * 0.02)
        self.extra_values = nn.Parameter(torch.randn(e, dv) * 0.02)
        self.extra_pixels = nn.Parameter(torch.full((e, config.pixel_dim), 0.5))
        if self.residual_branch:
            self.residual = nn.Sequential(
                nn.Linear(3 + d + d, config.residual_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(config.residual_hidden, dv),
            )
        self._pe_cache: dict[tuple[int, int, str], torch.Tensor] = {}

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nq, d) -> warped features (B, Nq, dv) and warped pixels (B, Nq, p).

        The warped pixels are A P; without the residual branch or the pixel skip nothing
        attends to P and they are an empty (B, Nq, 0) tensor.
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
            return torch.stack([o[0] for o in outs]).mean(0), torch.stack(
                [o[1] for o in outs]
            ).mean(0)
        return self._attend(queries, source, mask)

    def _attend(
        self, queries: torch.Tensor, source: SourceSet, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = queries.shape[0]
        e = self.extra_keys.shape[0]
        keys = torch.cat([source.keys, self.extra_keys.expand(b, e, -1)], dim=1)
        parts = [torch.cat([source.values, self.extra_values.expand(b, e, -1)], dim=1)]
        uses_pixels = self.residual_branch or self.pixel_skip
        if uses_pixels:
            parts.append(torch.cat([source.pixels, self.extra_pixels.expand(b, e, -1)], dim=1))
        if self.residual_branch:
            parts.append(keys)
        full_mask = torch.cat([mask, mask.new_ones(b, e)], dim=1)
        out = attention(queries, keys, torch.cat(parts, dim=2), full_mask)
        dv, p = self.value_dim, source.pixels.shape[-1] if uses_pixels else 0
        warped, warped_pixels = out[..., :dv], out[..., dv : dv + p]
        if self.residual_branch:
            # The MLP sees the warped mean colour: for patches, A (mean P) = mean (A P).
            colour = warped_pixels.unflatten(-1, (3, -1)).mean(-1)
            warped = warped + self.residual(torch.cat([colour, out[..., dv + p :], queries], dim=2))
        return warped, warped_pixels


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
