"""How hard each loss term pulls, and on which module: per-term gradient norms on real batches.

    python bench/loss_gradients.py --config tiny_expression --size 256 --batch-size 4 \
        --checkpoint training/tiny_expression/expr256e_latest.safetensors --loss output_expression=1

Loss weights are set by hand against values, but the clipped, summed gradient is what trains:
a term whose gradient is ten times the others' steers every module it reaches, whatever its
value. For each term of `TrainStep` (weighted as the config and `--loss` say) this backpropagates
that term alone through the training batches of `--steps` and prints the gradient's norm over the
whole network and per top-level module (keypoint_detector, query_encoder, generator, ...),
averaged over the batches. Issue 28's `output_expression` weight was set from this table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from iwarp.checkpoint import Checkpoint
from iwarp.config import PRESETS, get_config
from iwarp.paths import shared_data_dir
from iwarp.train.data import ClipDataset
from iwarp.train.trainer import (
    TrainStep,
    load_training_landmarks,
    seeded_generator,
    training_batch,
)


def term_gradients(step: TrainStep, losses: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per loss term: the weighted term's gradient norm, whole and per top-level module."""
    weights = vars(step.config.train.loss)
    norms: dict[str, dict[str, float]] = {}
    for name, value in losses.items():
        step.zero_grad()
        (weights[name] * value).backward(retain_graph=True)
        squares: dict[str, float] = defaultdict(float)
        for param_name, param in step.net.named_parameters():
            if param.grad is not None:
                squares[param_name.split(".")[0]] += float((param.grad.double() ** 2).sum())
        norms[name] = {"all": sum(squares.values()) ** 0.5}
        norms[name].update({module: s**0.5 for module, s in sorted(squares.items())})
    step.zero_grad()
    return norms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="weights (or a run's checkpoint)")
    p.add_argument(
        "--config", default=None, help=f"a preset ({', '.join(PRESETS)}); default: the checkpoint's"
    )
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[700, 701, 702],
        help="training steps whose batches are used",
    )
    p.add_argument("--expression-focus", type=float, default=0.5)
    p.add_argument("--loss", action="append", default=[], metavar="NAME=W")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    ckpt = Checkpoint(args.checkpoint)
    config = get_config(args.config) if args.config else ckpt.config
    config.train.train_size, config.train.batch_size = args.size, args.batch_size
    config.train.expression_focus = args.expression_focus
    config.train.loss.override(args.loss)
    root = shared_data_dir()
    if root is None:
        raise SystemExit("needs ../shared/data/clips (or IWARP_DATA)")
    data = ClipDataset(root / "clips", args.size, "train", show_progress=False)
    load_training_landmarks(data, config.train, show_progress=False)

    step = TrainStep(config)
    ckpt.load_module(step.net)
    step.train()
    per_batch = []
    for index in args.steps:
        # The batch and random draws of training step `index` (as `train_step` makes them).
        batch = training_batch(data, config.train, index, 0, torch.device("cpu"))
        generator = seeded_generator(config.train.seed, index, 0)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        _, losses = step(
            batch.sources, batch.driving, generator, batch.landmarks, batch.source_landmarks
        )
        per_batch.append(term_gradients(step, losses))

    modules = sorted({m for b in per_batch for t in b.values() for m in t if m != "all"})
    table = {
        term: {
            m: float(np.mean([b[term].get(m, 0.0) for b in per_batch])) for m in ["all", *modules]
        }
        for term in per_batch[0]
    }
    print("| term | weight | all | " + " | ".join(modules) + " |")
    print("|---|---|---|" + "---|" * len(modules))
    for term, row in table.items():
        weight = vars(config.train.loss)[term]
        cells = " | ".join(f"{row[m]:.2f}" for m in modules)
        print(f"| {term} | {weight:g} | {row['all']:.2f} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"checkpoint": args.checkpoint, "steps": args.steps, "norms": table}, f, indent=1
            )


if __name__ == "__main__":
    main()
