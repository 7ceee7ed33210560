"""Time `iwarp.face.crop_and_resize` for face boxes inside and past the frame edges.

    python bench/crop_path.py [--size 256] [--runs 200]

Prints the median per call for frame sizes 512x512 (the benchmark clip), 1280x720 and
1920x1080, a head box of 0.75 x the frame height centred, and past the top / left+bottom /
right edge, and (for comparison) the numpy index-clamping the crop used before.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from iwarp.face import CropBox, crop_and_resize
from iwarp.metrics import median_call_ms


def numpy_clamp_crop(frame: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """The old past-the-edge path: gather the padded square with clamped indices."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = box.as_int()
    rows = np.clip(np.arange(y0, y1), 0, h - 1)
    cols = np.clip(np.arange(x0, x1), 0, w - 1)
    patch = frame[rows[:, None], cols[None, :]]
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| frame | box | crop_and_resize p50 | old numpy clamp p50 |\n|---|---|---|---|")
    for h, w in ((512, 512), (720, 1280), (1080, 1920)):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        side = 0.75 * h
        boxes = {
            "inside": CropBox(w / 2, h / 2, side),
            "past top": CropBox(w / 2, 0.25 * side, side),
            "past left + bottom": CropBox(0.2 * side, h - 0.2 * side, side),
            "past right": CropBox(w - 0.1 * side, h / 2, side),
        }
        for name, box in boxes.items():
            new = median_call_ms(lambda b=box, f=frame: crop_and_resize(f, b, args.size), args.runs)
            old = "-"
            if name != "inside":
                ms = median_call_ms(lambda b=box, f=frame: numpy_clamp_crop(f, b, args.size), 20)
                old = f"{ms:.2f} ms"
            print(f"| {w}x{h} | {name} | {new:.2f} ms | {old} |")


if __name__ == "__main__":
    main()
