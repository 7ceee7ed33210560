"""Training throughput (samples/s) of a config, fp32 against bf16 autocast, on real clips.

    python bench/train_throughput.py --size 128 --batch-size 8 --steps 6 [--threads 2]

Times `train_step`, the step `iwarp train` runs (forward, the config's weighted losses,
backward, clipping, Adam, the GAN and the weight average when the config has them), on the
batches training draws (1..max_sources sources), after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iwarp.config import PRESETS, SHIPPED_CONFIG, Config, get_config
from iwarp.paths import shared_data_dir
from iwarp.train.data import ClipDataset
from iwarp.train.trainer import Trainer, train_step, training_batch


def measure(config: Config, data: ClipDataset, steps: int, device: torch.device) -> float:
    """Samples per second over `steps` training steps, after one warm-up step."""
    torch.manual_seed(config.train.seed)
    trainer = Trainer.create(config, device)
    trainer.average_weights()
    times = []
    for step in range(steps + 1):
        batch = training_batch(data, config.train, step, 0, device)
        t = time.perf_counter()
        train_step(trainer, batch, step, steps + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - t)
    return config.train.batch_size * len(times) / sum(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=SHIPPED_CONFIG, help=f"a preset: {', '.join(PRESETS)}")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
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
        config = get_config(args.config)
        config.train.train_size, config.train.batch_size = args.size, args.batch_size
        config.train.bf16 = bf16
        result[f"{name}_samples_per_s"] = measure(
            config, data, args.steps, torch.device(args.device)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
