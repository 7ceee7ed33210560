"""Where a model's flicker and temporal error live: pixels where the video is still between two
frames against pixels where it moves.

The runs `iwarp eval` measures (val split, 32 consecutive frames per clip from frame 1, the
clip's frame 0 as the one source), with the live paths' keypoint smoothing and without. A pixel
is still where the two driving frames agree (`iwarp.evaluation.metrics.temporal_split`, with
the stillness loss's own test). Both measures are sums over pixels divided by the video's mean
change, so the still and moving parts add up to the totals `iwarp eval` prints. Printed for the
output, for the flow warp alone (flow models: the blended warp before the generator) and for
copy-the-source, whose temporal error (1.0) is what a still picture scores: in still pixels it
is the video's own noise, which no model can predict.

    python bench/temporal_split.py [--checkpoint CK] [--data ../shared/data/clips] [--head]

--head (needs dlib, the `eval` extra) also splits the output's still-pixel flicker (smoothed
keypoints) into the head and the background: an ellipse around the first driving frame's 68
landmarks, widened by 30 % and raised to take in the hair.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from iwarp.checkpoint import load_network
from iwarp.evaluation.metrics import temporal_split
from iwarp.evaluation.protocol import (
    expand_source,
    frames_to_tensor,
    live_smoothed,
    load_eval_clips,
    resize_frames,
)
from iwarp.model.keypoints import Keypoints
from iwarp.system import cpu_name

FRAMES = 32  # as `iwarp eval` (EvalSettings.temporal_frames)


def head_mask(points: np.ndarray, size: int) -> torch.Tensor:
    """(1, 1, S, S) 1 inside an ellipse around a face's 68 landmarks (pixels), hair included."""
    from PIL import Image, ImageDraw

    (left, top), (right, bottom) = points.min(0), points.max(0)
    cx, half_w, height = (left + right) / 2, 0.65 * (right - left), bottom - top
    box = (cx - half_w, top - 0.6 * height, cx + half_w, bottom + 0.15 * height)
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).ellipse(box, fill=1)
    return torch.from_numpy(np.array(mask)).float()[None, None]


@torch.no_grad()
def animate(net, source, kp: Keypoints, batch: int = 4):
    """Output frames and, for flow models, the blended flow warp alone."""
    outputs, warps = [], []
    for i in range(0, len(kp.points), batch):
        part = kp.select(slice(i, i + batch))
        image, flow = net.animate_with_warp(expand_source(source, len(part.points)), part)
        outputs.append(image)
        warps.append(flow.blended if flow is not None else None)
    return torch.cat(outputs), (torch.cat(warps) if warps[0] is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    parser.add_argument("--data", default="../shared/data/clips")
    parser.add_argument("--json", default=None, help="write the per-clip numbers here")
    parser.add_argument("--head", action="store_true", help="still flicker: head vs background")
    args = parser.parse_args()
    faces = None
    if args.head:
        from iwarp.landmarks import DlibFaces

        faces = DlibFaces()

    net, _ = load_network(args.checkpoint, "cpu")
    net.eval()
    size = net.config.image_size
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, _, clip in load_eval_clips(args.data, "val", size, show_progress=False):
        frames = resize_frames(clip, size)
        driving = frames_to_tensor(frames[1 : 1 + FRAMES])
        source_photo = frames_to_tensor(frames[:1])
        with torch.no_grad():
            source = net.encode_sources(source_photo[None])
            kp = net.detect(driving)
        landmarks = faces.landmarks(frames[1]) if faces is not None else None
        for path, driven_by in (("raw", kp), ("smoothed", live_smoothed(kp))):
            output, warp = animate(net, source, driven_by)
            rows[f"output, {path}"].append(temporal_split(output, driving))
            if path == "smoothed" and landmarks is not None:
                head = head_mask(landmarks, size)
                rows["head / background, smoothed"].append(
                    {
                        "head": temporal_split(output, driving, head)["flicker_still"],
                        "background": temporal_split(output, driving, 1 - head)["flicker_still"],
                        "head_share": float(head.mean()),
                    }
                )
            if warp is not None:
                rows[f"flow warp, {path}"].append(temporal_split(warp, driving))
        rows["copy-the-source"].append(temporal_split(source_photo.expand_as(driving), driving))
        print(f"{name}: {rows['copy-the-source'][-1]['still_share']:.0%} still", flush=True)

    print(f"\n{cpu_name()}; val split, {FRAMES} frames per clip; mean over clips")
    print("| frames | flicker: still + moving = total | temporal error: still + moving = total |")
    print("|---|---|---|")
    summary = {}
    head_rows = rows.pop("head / background, smoothed", None)
    for label, clips in rows.items():
        mean = {key: float(np.mean([c[key] for c in clips])) for key in clips[0]}
        summary[label] = mean
        cells = [
            f"{mean[f'{m}_still']:.3f} + {mean[f'{m}_moving']:.3f} = "
            f"{mean[f'{m}_still'] + mean[f'{m}_moving']:.3f}"
            for m in ("flicker", "temporal_error")
        ]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    if head_rows:
        head = {key: float(np.mean([c[key] for c in head_rows])) for key in head_rows[0]}
        summary["still flicker, smoothed: head / background"] = head
        print(
            f"still-pixel flicker of the output (smoothed), {len(head_rows)} clips: head "
            f"{head['head']:.3f} + background {head['background']:.3f} (the head "
            f"is {head['head_share']:.0%} of the picture)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mean": summary, "clips": rows}, f, indent=1)


if __name__ == "__main__":
    main()
