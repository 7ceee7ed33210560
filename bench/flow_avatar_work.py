"""How much of the flow warp's per-frame step is per-avatar work done again every frame.

The animator graph gets an avatar as keys + values + pixel rows (`iwarp/graphs.py`), so each
frame it rebuilds, from the pixel rows, the photos (`photos_from_pixels`), their per-token mean
colours, and the per-source coordinate columns (`source_coordinates`). None of it depends on
the driving frame. This times those pieces against the whole `animate` step in PyTorch, to
decide whether moving them into the source encoder (a new avatar output) is worth a contract
change.

    python bench/flow_avatar_work.py [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse

import torch

from iwarp.checkpoint import load_network
from iwarp.metrics import median_call_ms
from iwarp.model.warp import photos_from_pixels, source_coordinates
from iwarp.system import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = load_network()[0]
    if not net.config.flow_warp:
        raise SystemExit("the shipped weights are not a flow warp: nothing to measure")
    size = net.config.image_size
    print(f"{cpu_name()}, {args.threads} thread(s), {size}x{size}, median of {args.repeats}")
    with torch.no_grad():
        for n in (1, 3):
            source = net.encode_sources(torch.rand(1, n, 3, size, size))
            pose = net.detect(torch.rand(1, 3, size, size))
            side = net.warp.grid_side(source)
            extra = net.config.extra_tokens

            def per_avatar(source=source, n=n, side=side, extra=extra) -> None:
                photos_from_pixels(source.pixels, side)
                source.pixels.unflatten(-1, (3, -1)).mean(-1)
                source_coordinates(n, side, source.keys, extra_rows=extra)

            def step(source=source, pose=pose) -> None:
                net.animate(source, pose)

            whole = median_call_ms(step, args.repeats)
            part = median_call_ms(per_avatar, args.repeats)
            print(
                f"{n} source(s): animate {whole:.2f} ms, per-avatar pieces {part:.3f} ms "
                f"({100 * part / whole:.1f} %)"
            )


if __name__ == "__main__":
    main()
