"""Parameter and FLOP counts of a config (`iwarp info`), counted with torch's FlopCounterMode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from iwarp.config import PRESETS, SHIPPED_CONFIG, get_config
from iwarp.model.network import ImplicitWarpingNetwork
from iwarp.options import option


@dataclass
class InfoOptions:
    """`iwarp info`: what `model_stats` counts, and how it is printed."""

    config: str = option(SHIPPED_CONFIG, help=f"a preset: {', '.join(PRESETS)}")
    size: int | None = option(None, help="image side (default: the config's)")
    sources: int = option(1, help="source images for the per-frame cost")
    json: bool = option(False, help="print one JSON object")


def _gflop(fn) -> tuple[float, dict[str, float]]:
    with FlopCounterMode(display=False, depth=1) as counter:
        fn()
    by_module = {
        name: sum(ops.values()) / 1e9
        for name, ops in counter.get_flop_counts().items()
        if name != "Global" and "." not in name  # top-level stages only
    }
    return counter.get_total_flops() / 1e9, by_module


@torch.no_grad()
def model_stats(config_name: str, size: int | None = None, sources: int = 1) -> dict[str, Any]:
    """Parameters, GFLOP per source image and per driving frame (with `sources` sources)."""
    config = get_config(config_name, size)
    net = ImplicitWarpingNetwork(config.model).eval()
    s = config.model.image_size
    src = torch.rand(1, sources, 3, s, s)
    drv = torch.rand(1, 3, s, s)
    one_source = torch.rand(1, 1, 3, s, s)
    g_source, _ = _gflop(lambda: net.encode_sources(one_source))
    source_set = net.encode_sources(src)
    g_frame, by_stage = _gflop(lambda: net.animate(source_set, net.detect(drv)))
    return {
        "config": config.name,
        "size": s,
        "sources": sources,
        "parameters": sum(p.numel() for p in net.parameters()),
        "parameters_by_module": {
            name: sum(p.numel() for p in m.parameters()) for name, m in net.named_children()
        },
        "gflop_per_source": g_source,
        "gflop_per_frame": g_frame,
        "gflop_per_frame_by_stage": by_stage,
        "query_tokens": config.model.grid_size**2,
        "key_tokens": source_set.keys.shape[1] + config.model.extra_tokens,
    }


def run_info(o: InfoOptions) -> int:
    """`iwarp info`: the numbers as JSON, or as an indented summary."""
    stats = model_stats(o.config, o.size, o.sources)
    if o.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"config {stats['config']} at {stats['size']}x{stats['size']}")
    print(f"  parameters            {stats['parameters'] / 1e6:.3f} M")
    for name, count in stats["parameters_by_module"].items():
        print(f"    {name:<20s}{count / 1e6:.3f} M")
    print(f"  GFLOP per source image  {stats['gflop_per_source']:.3f}")
    print(f"  GFLOP per driving frame {stats['gflop_per_frame']:.3f} ({o.sources} source(s))")
    for name, g in stats["gflop_per_frame_by_stage"].items():
        print(f"    {name:<20s}{g:.3f}")
    print(f"  attention tokens        {stats['query_tokens']} queries x {stats['key_tokens']} keys")
    return 0
