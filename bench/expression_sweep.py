"""What the network does with its expression numbers, and how well it reads them.

Two checks of an expression checkpoint (`ModelConfig.expression_dim` > 0), for issue 28:

1. **Sweep** (a picture): one photo animated by its own keypoints while one expression number
   at a time is set to -2 .. +3 standard deviations (mouth open, mouth width, both eyes). A
   network that uses its expression opens the mouth and shuts the eyes along the rows; one
   that ignores it shows the same face in every column.
2. **Reading** (numbers): on the val split's clips, the encoder's expression against the
   dlib landmarks' standardised ratios it was taught (Pearson r per number, over all frames
   with a face). The landmarks are found once and cached, as for training.

    python bench/expression_sweep.py --checkpoint runs/expr128/checkpoints/best.safetensors \
        --out sweep.jpg --size 256 --reading-size 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from iwarp.checkpoint import load_network
from iwarp.face import DEFAULT_SCALE, FaceDetector, clip_crop_box, crop_and_resize
from iwarp.graphs import image_to_tensor
from iwarp.media import read_image
from iwarp.model import Keypoints
from iwarp.paths import DEFAULT_AVATAR, shared_data_dir
from iwarp.train.data import ClipDataset
from iwarp.train.expression_reader import reading_scores

LEVELS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
# Rows of the sweep: which numbers move together (both eyes shut together).
ROWS = {"mouth open": (0,), "mouth width": (1,), "eyes": (2, 3)}


@torch.no_grad()
def sweep(net, photo: np.ndarray, size: int) -> np.ndarray:
    """A grid: one row per ROWS entry, one column per LEVELS value, the photo's own pose."""
    box = clip_crop_box([FaceDetector().detect(photo)], scale=DEFAULT_SCALE)
    face = crop_and_resize(photo, box, size)
    image = torch.from_numpy(image_to_tensor(face))
    source = net.encode_sources(image[None])
    kp = net.detect(image)
    rows = []
    for label, dims in ROWS.items():
        tiles = []
        for level in LEVELS:
            expression = kp.expression.clone()
            expression[:, list(dims)] = level
            out = net.animate(source, Keypoints(kp.points, kp.strength, expression))[0]
            tile = Image.fromarray((out.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())
            ImageDraw.Draw(tile).text((4, 4), f"{label} {level:+.0f}", fill=(255, 255, 0))
            tiles.append(np.asarray(tile))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def reading(net, size: int, max_clips: int | None) -> dict:
    """Pearson r of the encoder's numbers against the landmarks' on the val split's frames,
    per clip (averaged) and pooled (`train.expression_reader.reading_scores`)."""
    root = shared_data_dir()
    if root is None:
        raise SystemExit("the reading needs the val clips: ../shared/data or $IWARP_DATA")
    data = ClipDataset(root / "clips", size, split="val")
    if max_clips:
        data.clips, data.cache_files = data.clips[:max_clips], data.cache_files[:max_clips]
    data.load_landmarks()
    return reading_scores(net.expression_encoder, data.clips, data.landmarks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--photo", default=str(DEFAULT_AVATAR))
    parser.add_argument("--out", default="expression_sweep.png")
    parser.add_argument("--size", type=int, default=0, help="0: the checkpoint's image size")
    parser.add_argument("--reading-size", type=int, default=0, help="0: skip the reading")
    parser.add_argument("--max-clips", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    net = load_network(args.checkpoint)[0].eval()
    if not net.config.expression_dim:
        raise SystemExit(f"{args.checkpoint} has no expression (expression_dim 0)")
    grid = sweep(net, read_image(args.photo), args.size or net.config.image_size)
    Image.fromarray(grid).save(args.out, quality=90)
    print(f"sweep: {args.out}")
    if args.reading_size:
        result = reading(net, args.reading_size, args.max_clips)
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
