"""Keypoint smoothing settings against flicker and temporal error, on the selection split.

The live paths smooth the driver's keypoints with a One-Euro filter (`iwarp.face.
keypoint_filter`). Stronger smoothing always lowers flicker (the output moves less); the
temporal error (`iwarp.evaluation.metrics.temporal_error`) also counts the motion it then
fails to follow, so it is what a setting should be chosen on. The selection split (held-out
train identities) is used so that the val split stays unreported-on.

    python bench/keypoint_filter_sweep.py [--data ../shared/data/clips] [--checkpoint CK]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from iwarp.checkpoint import load_network
from iwarp.evaluation.metrics import flicker, temporal_error
from iwarp.evaluation.protocol import expand_source, load_eval_clips
from iwarp.face import OneEuroFilter
from iwarp.graphs import image_to_tensor
from iwarp.model.keypoints import Keypoints
from iwarp.system import cpu_name

# (min_cutoff, beta); None = no smoothing. The live setting is (1.5, 8.0).
SETTINGS = [None, (1.5, 8.0), (1.0, 8.0), (0.7, 8.0), (1.0, 4.0), (1.5, 16.0), (0.5, 4.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/clips")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--frames", type=int, default=32, help="consecutive frames per run")
    parser.add_argument("--runs-per-clip", type=int, default=3)
    args = parser.parse_args()
    net = load_network(args.checkpoint)[0]
    size = net.config.image_size
    clips = load_eval_clips(args.data, "select", size, show_progress=False)
    runs = []
    with torch.no_grad():
        for _, _, clip in clips:
            span = args.frames + 1
            for start in range(0, len(clip) - span, max(1, (len(clip) - span) // 3))[
                : args.runs_per_clip
            ]:
                frames = torch.from_numpy(image_to_tensor(clip[start : start + span]))
                source = net.encode_sources(frames[:1][None])
                driving = frames[1:]
                runs.append((source, driving, net.detect(driving)))
        print(f"{cpu_name()}: {len(runs)} runs of {args.frames} frames, selection split")
        for setting in SETTINGS:
            flickers, errors = [], []
            for source, driving, kp in runs:
                points = kp.points.numpy()
                if setting is not None:
                    smooth = OneEuroFilter(min_cutoff=setting[0], beta=setting[1])
                    points = np.stack([smooth(p) for p in points])
                points_t = torch.from_numpy(points).float()
                out = torch.cat(
                    [
                        net.animate(
                            expand_source(source, len(chunk)),
                            Keypoints(chunk, kp.strength[i : i + len(chunk)]),
                        )
                        for i, chunk in zip(
                            range(0, len(points_t), 8), points_t.split(8), strict=True
                        )
                    ]
                )
                flickers.append(flicker(out, driving))
                errors.append(temporal_error(out, driving))
            print(
                json.dumps(
                    {
                        "min_cutoff, beta": setting,
                        "flicker": round(float(np.mean(flickers)), 4),
                        "temporal_error": round(float(np.mean(errors)), 4),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
