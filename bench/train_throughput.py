"""Training throughput (samples/s) of a config, fp32 against bf16 autocast, on real clips.

    python bench/train_throughput.py --size 128 --batch-size 8 --steps 6 [--threads 2]

Times full training steps (forward, all losses, backward, Adam) after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iwarp.config import get_config
from iwarp.paths import shared_data_dir
from iwarp.train.data import ClipDataset
from iwarp.train.trainer import TrainStep, seeded_generator


def measure(config_name: str, size: int, batch: int, steps: int, bf16: bool, data) -> float:
    config = get_config(config_name)
    module = TrainStep(config)
    opt = torch.optim.Adam(module.net.parameters(), lr=config.train.lr)
    times = []
    for step in range(steps + 1):
        sources, driving = data.batch(0, step, batch, 2)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, losses = module(sources, driving, seeded_generator(0, step, 0))
        total = sum(losses.values())
        opt.zero_grad()
        total.float().backward()
        opt.step()
        if step:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - t)
    return batch * len(times) / sum(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = shared_data_dir()
    if root is None:
        raise SystemExit("needs ../shared/data/clips (or IWARP_DATA)")
    data = ClipDataset(root / "clips", args.size, "train", show_progress=False)
    result = {
        "config": args.config,
        "size": args.size,
        "batch": args.batch_size,
        "threads": args.threads,
    }
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        result[f"{name}_samples_per_s"] = measure(
            args.config, args.size, args.batch_size, args.steps, bf16, data
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
