"""What the network does with its expression numbers, and how well it reads them.

Checks of an expression checkpoint (`ModelConfig.expression_dim` > 0), for issue 28:

1. **Sweep** (a picture): one photo animated by its own keypoints while one expression number
   at a time is set to -2 .. +3 standard deviations (mouth open, mouth width, both eyes). A
   network that uses its expression opens the mouth and shuts the eyes along the rows; one
   that ignores it shows the same face in every column.
2. **Parts** (`--parts`, a picture and numbers): the same changes split into what the
   attention's warp moves and what the generator paints over it, and how far the warp moves
   the lids and lips: the mean change of its flow, in pixels, at the photo's eye and mouth
   landmarks, against the flow at the same number set to 0.
3. **Reading** (numbers): on the val split's clips, the encoder's expression against the
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
from iwarp.model.warp import values_at
from iwarp.paths import DEFAULT_AVATAR, shared_data_dir
from iwarp.train.data import ClipDataset
from iwarp.train.expression_reader import reading_scores

LEVELS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
# Rows of the sweep: which numbers move together (both eyes shut together).
ROWS = {"mouth open": (0,), "mouth width": (1,), "eyes": (2, 3)}


# dlib's 68 points of each part whose motion `parts` measures.
PART_POINTS = {"eyes": tuple(range(36, 48)), "mouth": tuple(range(48, 68))}


def _crop(photo: np.ndarray, size: int) -> np.ndarray:
    box = clip_crop_box([FaceDetector().detect(photo)], scale=DEFAULT_SCALE)
    return crop_and_resize(photo, box, size)


def _posed(net, face: np.ndarray):
    """A face crop as a source set, and its own keypoints."""
    image = torch.from_numpy(image_to_tensor(face))
    return net.encode_sources(image[None]), net.detect(image)


def _tile(image: torch.Tensor, label: str) -> np.ndarray:
    """(1, 3, S, S) in [0, 1] -> an (S, S, 3) uint8 tile, labelled in its corner."""
    tile = Image.fromarray((image[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())
    ImageDraw.Draw(tile).text((4, 4), label, fill=(255, 255, 0))
    return np.asarray(tile)


@torch.no_grad()
def sweep(net, photo: np.ndarray, size: int) -> np.ndarray:
    """A grid: one row per ROWS entry, one column per LEVELS value, the photo's own pose."""
    source, kp = _posed(net, _crop(photo, size))
    rows = []
    for label, dims in ROWS.items():
        tiles = []
        for level in LEVELS:
            expression = kp.expression.clone()
            expression[:, list(dims)] = level
            out = net.animate(source, Keypoints(kp.points, kp.strength, expression))
            tiles.append(_tile(out, f"{label} {level:+.0f}"))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def parts(net, photo: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, float]]:
    """Where each row's change comes from: for the mouth and the eyes at -2, 0 and +3, the
    output, the photo as the attention alone moves it, and the generator's painted share
    (its colours times how much of the warped photo it replaces). A lid the warp closes shows
    in the middle row; one the generator paints, in the bottom row.

    Also the warp's motion per column ("eyes -2": pixels): the mean distance between its flow
    at that number and at 0, read at the part's landmarks on the photo (dlib)."""
    from iwarp.landmarks import DlibFaces, to_unit

    face = _crop(photo, size)
    found = DlibFaces().landmarks(face)
    if found is None:
        raise SystemExit("dlib finds no face in the photo's crop: pass another --photo")
    landmarks = torch.from_numpy(to_unit(found, size))
    source, kp = _posed(net, face)
    columns, motion = [], {}
    for label, dims in (("mouth", (0,)), ("eyes", (2, 3))):
        at = landmarks[list(PART_POINTS[label])][None]  # (1, P, 2)
        flows = {}
        for level in (-2.0, 0.0, 3.0):
            expression = kp.expression.clone()
            expression[:, list(dims)] = level
            inputs = net.warp_to_driving(source, Keypoints(kp.points, kp.strength, expression))
            # (1, P, 2): where each landmark's pixel comes from in the photo
            flows[level] = values_at(inputs.flow.flow[:, 0], at)
            flow = torch.cat([inputs.flow.blended, inputs.flow.unmatched], dim=1)
            colours, keep = net.generator.blend_parts(net.generator.decode(inputs.features), flow)
            out = net.paint(inputs)  # the network's own blend, not a copy of it
            tiles = [
                _tile(t, f"{label} {level:+.0f}" if i == 0 else "")
                for i, t in enumerate((out, inputs.flow.blended, (1 - keep) * colours))
            ]
            columns.append(np.concatenate(tiles, axis=0))
        for level in (-2.0, 3.0):
            shift = (flows[level] - flows[0.0]).norm(dim=-1).mean() * size / 2
            motion[f"{label} {level:+.0f}"] = round(float(shift), 2)
    return np.concatenate(columns, axis=1), motion


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
    parser.add_argument(
        "--parts", default=None, help="also a picture of the warp's and the paint's shares"
    )
    parser.add_argument("--size", type=int, default=0, help="0: the checkpoint's image size")
    parser.add_argument("--reading-size", type=int, default=0, help="0: skip the reading")
    parser.add_argument("--max-clips", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    net = load_network(args.checkpoint)[0].eval()
    if not net.config.expression_dim:
        raise SystemExit(f"{args.checkpoint} has no expression (expression_dim 0)")
    photo, size = read_image(args.photo), args.size or net.config.image_size
    Image.fromarray(sweep(net, photo, size)).save(args.out, quality=90)
    print(f"sweep: {args.out}")
    if args.parts:
        picture, motion = parts(net, photo, size)
        Image.fromarray(picture).save(args.parts, quality=90)
        print(f"warp and paint: {args.parts}")
        print("the warp's motion at the part's landmarks, pixels:", json.dumps(motion))
    if args.reading_size:
        result = reading(net, args.reading_size, args.max_clips)
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
