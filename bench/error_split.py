"""Where a model's 1-source error lives: pixels that stay put between the source photo and the
driving frame (background, still parts of the face) against pixels that change.

Val split, source = each clip's first frame, driving = eval's target frames. A pixel is static
where the source and driving frames differ by under 0.04 (mean over colour, 9x9 average). For
the model and for copy-the-source it prints the PSNR over each part and the share of all
squared error that the static part holds: how much making the static part exact could gain.

    python bench/error_split.py [--checkpoint CK] [--data ../shared/data/clips]
"""

from __future__ import annotations

import argparse

import torch

from iwarp.checkpoint import load_network
from iwarp.evaluation.protocol import (
    expand_source,
    frames_to_tensor,
    load_eval_clips,
    resize_frames,
    target_positions,
)
from iwarp.metrics import psnr_of_mse
from iwarp.train.losses import still_pixels

STATIC_BELOW = 0.04


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    parser.add_argument("--data", default="../shared/data/clips")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    net, _ = load_network(args.checkpoint, "cpu")
    net.eval()
    squared = {"model": [0.0, 0.0], "copy": [0.0, 0.0]}  # static, moving
    pixels = [0.0, 0.0]
    for name, _, clip in load_eval_clips(args.data, "val", args.size, show_progress=False):
        frames = resize_frames(clip, args.size)
        driving = frames_to_tensor(frames[target_positions(len(frames), (1, 3), 16)])
        source = frames_to_tensor(frames[[0]])
        with torch.no_grad():
            avatar = net.encode_sources(source[None])
            output = torch.cat(
                [
                    net.animate(expand_source(avatar, len(chunk)), net.detect(chunk))
                    for chunk in driving.split(4)
                ]
            )
        static = still_pixels(source.expand_as(driving), driving, below=STATIC_BELOW)
        pixels[0] += float(static.sum())
        pixels[1] += float((1 - static).sum())
        for method, image in (("model", output), ("copy", source.expand_as(driving))):
            error = ((image - driving) ** 2).mean(1, keepdim=True)
            squared[method][0] += float((error * static).sum())
            squared[method][1] += float((error * (1 - static)).sum())
        print(f"{name}: {float(static.mean()):.0%} static")

    print(f"static pixels: {pixels[0] / sum(pixels):.0%}")
    for method, (still, moving) in squared.items():
        static_db, moving_db = psnr_of_mse(still / pixels[0]), psnr_of_mse(moving / pixels[1])
        print(
            f"{method}: static {static_db:.2f} dB, moving {moving_db:.2f} dB, "
            f"share of squared error in static pixels {still / (still + moving):.1%}"
        )


if __name__ == "__main__":
    main()
