"""Smoothing over time in the live path, against flicker, temporal error and PSNR.

The live paths smooth the driver's keypoints with a One-Euro filter (`iwarp.face.
keypoint_filter`). This sweep compares settings of that filter with the same filter put one
stage later, on the attention's outputs (warped features and per-source coordinate sums, every
element filtered on its own, through `ImplicitWarpingNetwork.animate_with_warp`'s
`attention_filter`): there each place of the picture gets its own cutoff, so a still
background is smoothed hard while a moving mouth passes. The last settings put it on the
output frames' pixels instead (what a video denoiser does): look at frames in motion before
believing those numbers, a lagging pixel filter shows the last frame's mouth beside this one's.

Stronger smoothing always lowers flicker (the output moves less). The temporal error
(`iwarp.evaluation.metrics.temporal_error`) also counts the motion it then fails to follow,
and the PSNR against the driving frames (the same person: the driving frame is the target)
counts the lag, so settings are compared on those. Runs of consecutive frames, the run's first
frame as the one source; the selection split (held-out train identities) by default, so that
settings are not chosen on the val split.

    python bench/live_smoothing_sweep.py [--data ../shared/data/clips] [--checkpoint CK]
        [--split select|val] [--picture PATH]

--picture writes the run whose driving video moves most: its four frames of largest change,
as driving | no smoothing | the live setting | attention outputs (2, 2) | output pixels (2, 2).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from iwarp.checkpoint import load_network
from iwarp.evaluation.metrics import flicker, temporal_error
from iwarp.evaluation.protocol import load_eval_clips
from iwarp.evaluation.report import labelled
from iwarp.face import OneEuroFilter, keypoint_filter
from iwarp.graphs import image_to_tensor
from iwarp.metrics import frame_psnr
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.keypoints import Keypoints
from iwarp.model.warp import SourceSet
from iwarp.system import cpu_name
from iwarp.train.plots import image_grid, to_uint8

# Each setting: {stage: (min_cutoff, beta)} for the stages smoothed; {} = no smoothing.
_live = keypoint_filter()
LIVE = {"keypoints": (_live.min_cutoff, _live.beta)}  # the live paths' setting
SETTINGS: list[dict[str, tuple[float, float]]] = [
    {},
    LIVE,
    {"keypoints": (1.0, 8.0)},
    {"keypoints": (0.7, 8.0)},
    {"keypoints": (1.0, 4.0)},
    {"keypoints": (1.5, 16.0)},
    {"keypoints": (0.5, 4.0)},
    {"attention": (2.0, 5.0)},
    {"attention": (2.0, 2.0)},
    {"attention": (1.0, 5.0)},
    {"attention": (1.0, 2.0)},
    {"output": (4.0, 5.0)},
    {"output": (2.0, 5.0)},
    {"output": (2.0, 2.0)},
    {"output": (1.0, 5.0)},
    {"output": (2.0, 0.5)},
    {"output": (2.0, 20.0)},
    {**LIVE, "output": (2.0, 5.0)},
]
PICTURE_SETTINGS = [{}, LIVE, {"attention": (2.0, 2.0)}, {"output": (2.0, 2.0)}]


class AttentionSmoothing:
    """One-Euro filter over one stream's attention outputs (batch 1, frames in order)."""

    def __init__(self, min_cutoff: float, beta: float) -> None:
        self.filter = OneEuroFilter(min_cutoff=min_cutoff, beta=beta)

    def __call__(self, attended: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        widths = [t.shape[-1] for t in attended]
        joined = torch.cat(attended, dim=-1)
        smoothed = torch.from_numpy(self.filter(joined.numpy())).to(joined.dtype)
        return tuple(smoothed.split(widths, dim=-1))


@torch.no_grad()
def animate_run(
    net: ImplicitWarpingNetwork,
    source: SourceSet,
    kp: Keypoints,
    setting: dict[str, tuple[float, float]],
) -> torch.Tensor:
    """One run's output frames (T, 3, S, S) with a setting's smoothing, frame by frame."""

    def one_euro(stage: str) -> OneEuroFilter | None:
        if stage not in setting:
            return None
        min_cutoff, beta = setting[stage]
        return OneEuroFilter(min_cutoff=min_cutoff, beta=beta)

    points = kp.points.numpy()
    keypoint_smoothing = one_euro("keypoints")
    if keypoint_smoothing is not None:
        points = keypoint_smoothing.sequence(points)
    attention = AttentionSmoothing(*setting["attention"]) if "attention" in setting else None
    output_smoothing = one_euro("output")
    frames = []
    for t in range(len(points)):
        frame_kp = Keypoints(torch.from_numpy(points[t : t + 1]).float(), kp.strength[t : t + 1])
        image = net.animate_with_warp(source, frame_kp, attention_filter=attention)[0]
        if output_smoothing is not None:
            image = torch.from_numpy(output_smoothing(image.numpy())).float()
        frames.append(image)
    return torch.cat(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/clips")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--split", default="select", help="select (default) or val")
    parser.add_argument("--frames", type=int, default=32, help="consecutive frames per run")
    parser.add_argument("--runs-per-clip", type=int, default=3)
    parser.add_argument("--picture", default=None, help="write the fastest run's frames (PNG)")
    args = parser.parse_args()
    net = load_network(args.checkpoint)[0]
    size = net.config.image_size
    clips = load_eval_clips(args.data, args.split, size, show_progress=False)
    runs = []
    with torch.no_grad():
        for name, _, clip in clips:
            span = args.frames + 1
            for start in range(0, len(clip) - span, max(1, (len(clip) - span) // 3))[
                : args.runs_per_clip
            ]:
                frames = torch.from_numpy(image_to_tensor(clip[start : start + span]))
                source = net.encode_sources(frames[:1][None])
                driving = frames[1:]
                runs.append((f"{name} from frame {start}", source, driving, net.detect(driving)))
    print(f"{cpu_name()}: {len(runs)} runs of {args.frames} frames, {args.split} split")
    # The raw detector's frame-to-frame keypoint change: jitter plus motion, an upper bound on
    # the jitter (what `iwarp train --keypoint-noise` is sized against).
    change = np.mean([float((kp.points[1:] - kp.points[:-1]).abs().mean()) for *_, kp in runs])
    print(f"driving keypoints' mean frame-to-frame change: {change:.4f} ([-1, 1] units)")
    for setting in SETTINGS:
        scores = {"flicker": [], "temporal_error": [], "psnr": []}
        for _, source, driving, kp in runs:
            out = animate_run(net, source, kp, setting)
            scores["flicker"].append(flicker(out, driving))
            scores["temporal_error"].append(temporal_error(out, driving))
            scores["psnr"].append(float(frame_psnr(out.numpy(), driving.numpy()).mean()))
        row: dict[str, object] = {"smoothing (min_cutoff, beta)": setting or "none"}
        row.update({k: round(float(np.mean(v)), 4) for k, v in scores.items()})
        print(json.dumps(row), flush=True)
    if args.picture:
        save_picture(net, runs, args.picture)


def save_picture(
    net: ImplicitWarpingNetwork,
    runs: list[tuple[str, SourceSet, torch.Tensor, Keypoints]],
    path: str,
) -> None:
    """The run whose driving video moves most, its four frames of largest change, as driving |
    each of PICTURE_SETTINGS: a lagging filter shows there as doubled eyes or mouths."""
    name, source, driving, kp = max(runs, key=lambda r: float((r[2][1:] - r[2][:-1]).abs().mean()))
    outputs = [animate_run(net, source, kp, setting) for setting in PICTURE_SETTINGS]
    change = (driving[1:] - driving[:-1]).abs().mean((1, 2, 3))
    frames = sorted((change.argsort(descending=True)[:4] + 1).tolist())
    labels = ["driving"] + [
        ", ".join(f"{stage} {p[0]:g}/{p[1]:g}" for stage, p in s.items()) or "none"
        for s in PICTURE_SETTINGS
    ]
    columns = list(zip([driving, *outputs], labels, strict=True))
    rows = [[labelled(to_uint8(image[t]), label) for image, label in columns] for t in frames]
    Image.fromarray(image_grid(rows)).save(path)
    print(f"wrote {path}: {name}, frames {frames}")


if __name__ == "__main__":
    main()
