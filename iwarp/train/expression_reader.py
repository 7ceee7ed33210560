"""`iwarp train-expression`: the expression encoder trained alone on the clips' landmarks.

The expression encoder (`model.expression`) is taught dlib's openness ratios
(`landmarks.EXPRESSION_NAMES`). Inside the whole network's training it sees 75 faces with the
light augmentation the warp needs, and its wide head learned them: it reads the train clips
with r 0.76-0.84 and unseen faces with 0.24-0.43. Alone it costs a few milliseconds per
sample, so thousands of steps fit in minutes on a CPU, with what a reader of unseen faces
needs: stronger moves than the warp's training uses (zoom 0.85-1.2, +-12 degrees, +-8 %),
colour and sensor noise, and a squeezed head (`ModelConfig.expression_head_channels`).

The rest of the network is kept as it is. The renderer has been trained to follow the
landmarks' own numbers (`TrainConfig.expression_teacher`), which is what a better reader gives
it. Checkpoints are chosen on the selection split's clips (held-out train identities); the val
split is left for `iwarp eval` and `bench/expression_sweep.py`.

    iwarp train-expression --checkpoint W.safetensors --data ../shared/data/clips \
        --out R.safetensors
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from iwarp.checkpoint import load_network, save_checkpoint
from iwarp.config import Config
from iwarp.errors import ConfigError, InputError
from iwarp.graphs import image_to_tensor
from iwarp.landmarks import EXPRESSION_NAMES, mirror_landmarks, standardised_expression
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.expression import ExpressionEncoder
from iwarp.options import option
from iwarp.train.data import ClipDataset, augment_scene, move_frames

# The moves a webcam reader must not mind: the face crop follows the face, but not exactly.
READER_ZOOM = (0.85, 1.2)
READER_TURN = 12.0
READER_SHIFT = 0.08
READER_NOISE = 0.03  # most per-pixel noise (standard deviation, of [0, 1])


@dataclass
class ReaderSettings:
    steps: int = option(3000, help="training steps (0: put the reader in as it starts)")
    batch_size: int = option(32, help="face crops per step")
    lr: float = option(1e-3, help="peak learning rate (cosine to 0)")
    head_channels: int = option(
        8, help="squeeze the last map to this many channels before the head (0: the wide head)"
    )
    select_every: int = option(500, help="score the reader on the selection split every N steps")
    seed: int = option(0, help="batch and initialisation seed")


@dataclass(kw_only=True)
class ReaderOptions:
    """`iwarp train-expression`: the weights to start from, the clips, where to write."""

    checkpoint: str = option(help="weights of a network with an expression (its rest is kept)")
    data: str = option(help="folder of clips (manifest.csv with train and select splits)")
    out: str = option(help="write the network with the trained encoder here (.safetensors)")
    reader_from: str | None = option(
        None,
        help="start the encoder from these weights' (e.g. an earlier train-expression's) "
        "instead of --checkpoint's: a reader trained beside a renderer that went on training",
    )
    settings: ReaderSettings = option(default_factory=ReaderSettings)
    cache: str | None = option(None, help="clip and landmark cache (default: ~/.cache/iwarp)")
    quiet: bool = option(False, help="no progress bars")


# ------------------------------------------------------------------------------ the reading
@torch.no_grad()
def reading_scores(
    encoder: nn.Module, clips: list[np.ndarray], landmarks: list[np.ndarray], every: int = 1
) -> dict[str, Any]:
    """The encoder's numbers against the landmarks' on every `every`-th frame with a face:
    Pearson r per number, per clip (averaged over the clips where the number moves: what
    `iwarp eval` scores, one clip at a time) and pooled over all frames."""
    was_training = encoder.training
    encoder.eval()
    per_clip: list[list[float]] = []
    read, taught = [], []
    for frames, points in zip(clips, landmarks, strict=True):
        picked = np.arange(0, len(frames), every)
        target = standardised_expression(points[picked])
        known = np.isfinite(target).all(1)
        if known.sum() < 3:
            continue
        x = torch.from_numpy(image_to_tensor(np.asarray(frames[picked[known]])))
        numbers = torch.cat([encoder(chunk) for chunk in x.split(64)]).numpy()
        read.append(numbers)
        taught.append(target[known])
        per_clip.append([_pearson(numbers[:, j], target[known][:, j]) for j in range(4)])
    encoder.train(was_training)
    if not read:
        raise InputError("no clip has 3 frames with a face", "check the clips and landmarks")
    scores = np.asarray(per_clip, dtype=np.float64)
    p, t = np.concatenate(read), np.concatenate(taught)
    return {
        "per_clip": {n: _mean_known(scores[:, j]) for j, n in enumerate(EXPRESSION_NAMES)},
        "pooled": {n: _pearson(p[:, j], t[:, j]) for j, n in enumerate(EXPRESSION_NAMES)},
        "clips": len(read),
        "frames": len(p),
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """r, NaN where either does not move (left out of the per-clip mean)."""
    if a.std() < 1e-9 or b.std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _mean_known(values: np.ndarray) -> float:
    """The mean of the numbers that are not NaN; NaN when none is."""
    known = values[np.isfinite(values)]
    return float(known.mean()) if len(known) else float("nan")


def mean_reading(scores: dict[str, Any]) -> float:
    """One number to choose checkpoints on: the per-clip r averaged over the numbers that
    move in these clips."""
    return _mean_known(np.asarray(list(scores["per_clip"].values())))


# ------------------------------------------------------------------------------ the batches
class ReaderBatches:
    """Face crops with their standardised openness: every frame where dlib found a face,
    flipped (the eyes swapped with the landmarks), colour-jittered, moved and noised."""

    def __init__(self, clips: list[np.ndarray], landmarks: list[np.ndarray]) -> None:
        self.clips, self.landmarks = clips, landmarks
        self.index = [
            (c, int(i))
            for c, points in enumerate(landmarks)
            for i in np.flatnonzero(np.isfinite(points).all((1, 2)))
        ]
        if not self.index:
            raise InputError(
                "no training frame has landmarks", "the clips need faces dlib can find"
            )

    def __call__(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        for j in rng.integers(len(self.index), size=size):
            c, i = self.index[j]
            x = torch.from_numpy(image_to_tensor(np.asarray(self.clips[c][i : i + 1])))
            points = self.landmarks[c][i : i + 1]
            x, flipped = augment_scene(x, rng)
            if flipped:
                points = mirror_landmarks(points)
            # The ratios do not change under a similarity move: the targets stay.
            x, _ = move_frames(x, rng, READER_ZOOM, READER_TURN, READER_SHIFT)
            x = (x + torch.randn_like(x) * float(rng.uniform(0, READER_NOISE))).clamp(0, 1)
            images.append(x)
            targets.append(standardised_expression(points))
        return torch.cat(images), torch.from_numpy(np.concatenate(targets)).float()


# ------------------------------------------------------------------------------ the training
def squeezed_encoder(encoder: ExpressionEncoder, head_channels: int) -> ExpressionEncoder:
    """A copy of `encoder` with a new head of `head_channels` (its body's weights kept); the
    same head's weights too when `head_channels` is what it has."""
    config = copy.deepcopy(encoder.config)
    config.expression_head_channels = head_channels
    fresh = ExpressionEncoder(config)
    fresh.body.load_state_dict(encoder.body.state_dict())
    if head_channels == encoder.config.expression_head_channels:
        fresh.head.load_state_dict(encoder.head.state_dict())
    return fresh


def train_reader(
    encoder: ExpressionEncoder,
    batches: ReaderBatches,
    select: tuple[list[np.ndarray], list[np.ndarray]],
    settings: ReaderSettings,
    show_progress: bool = True,
) -> tuple[ExpressionEncoder, list[dict[str, Any]]]:
    """Trains `encoder` (in place) on `batches`, scoring it on the `select` clips and landmarks
    every `select_every` steps; returns the best-scoring weights and the history."""
    s = settings
    torch.manual_seed(s.seed)
    rng = np.random.default_rng([s.seed, 29])
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=s.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.steps)
    history = [{"step": 0, **reading_scores(encoder, *select, every=2)}]
    best, best_score = copy.deepcopy(encoder.state_dict()), mean_reading(history[0])
    encoder.train()
    bar = tqdm(range(1, s.steps + 1), desc="train-expression", disable=not show_progress)
    for step in bar:
        images, targets = batches(rng, s.batch_size)
        loss = ((encoder(images) - targets) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % s.select_every == 0 or step == s.steps:
            scores = reading_scores(encoder, *select, every=2)
            history.append({"step": step, "loss": float(loss.item()), **scores})
            bar.write(
                f"step {step}: selection r per clip "
                + ", ".join(f"{n} {r:.3f}" for n, r in scores["per_clip"].items())
            )
            if mean_reading(scores) > best_score:
                best, best_score = copy.deepcopy(encoder.state_dict()), mean_reading(scores)
    encoder.load_state_dict(best)
    return encoder.eval(), history


def with_expression_encoder(
    net: ImplicitWarpingNetwork, config: Config, encoder: ExpressionEncoder
) -> Config:
    """Puts `encoder` into `net` (the rest unchanged) and returns a copy of `config` that
    describes the network now, to be saved with it."""
    config = copy.deepcopy(config)
    config.model.expression_head_channels = encoder.config.expression_head_channels
    net.config = config.model
    net.expression_encoder = encoder
    return config


def run_train_expression(o: ReaderOptions) -> int:
    net, ckpt = load_network(o.checkpoint)
    if net.expression_encoder is None:
        raise ConfigError(
            f"{o.checkpoint} has no expression encoder (config {ckpt.config.name!r})",
            "start from weights of a network with an expression, e.g. config tiny_expression",
        )
    start = net.expression_encoder
    if o.reader_from:
        start = _reader_of(o.reader_from, net)
    if o.settings.steps < 0:
        raise ConfigError(f"--steps {o.settings.steps}", "use 0 or more steps")
    has = start.config.expression_head_channels
    if o.settings.steps == 0 and o.settings.head_channels != has:
        raise ConfigError(
            f"--steps 0 puts the reader in as it is, but its head has {has} channels and "
            f"--head-channels asks for {o.settings.head_channels} (an untrained head)",
            f"pass --head-channels {has}, or train it (--steps N)",
        )
    show = not o.quiet
    size = net.config.image_size
    train = ClipDataset(o.data, size, split="train", cache_dir=o.cache, show_progress=show)
    select = ClipDataset(o.data, size, split="select", cache_dir=o.cache, show_progress=show)
    for data in (train, select):
        data.load_landmarks(o.cache, show)
    selection = (select.clips, select.landmarks)
    before = reading_scores(net.expression_encoder, *selection, every=2)
    encoder = squeezed_encoder(start, o.settings.head_channels)
    encoder, history = train_reader(
        encoder,
        ReaderBatches(train.clips, train.landmarks),
        selection,
        o.settings,
        show,
    )
    config = with_expression_encoder(net, ckpt.config, encoder)
    out = Path(o.out)
    save_checkpoint(
        out,
        config,
        net,
        step=ckpt.step,
        extra={"expression_reader": _summary(o, before, history)},
    )
    record = {"before": before, "history": history}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    chosen = max(history, key=mean_reading)
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    print("| selection split, r per clip | " + " | ".join(EXPRESSION_NAMES) + " |")
    print("|---|" + "---|" * len(EXPRESSION_NAMES))
    for label, row in (("the encoder it had", before), (f"step {chosen['step']} (kept)", chosen)):
        print(f"| {label} | " + " | ".join(f"{r:.3f}" for r in row["per_clip"].values()) + " |")
    return 0


def _reader_of(path: str, net: ImplicitWarpingNetwork) -> ExpressionEncoder:
    """The expression encoder of the weights at `path`, checked to give what `net` reads."""
    other, _ = load_network(path)
    theirs, ours = other.config, net.config
    if other.expression_encoder is None or (theirs.expression_dim, theirs.expression_size) != (
        ours.expression_dim,
        ours.expression_size,
    ):
        raise ConfigError(
            f"{path}'s expression encoder does not fit: expression_dim / expression_size "
            f"{theirs.expression_dim} / {theirs.expression_size}, the network's "
            f"{ours.expression_dim} / {ours.expression_size}",
            "pass weights of the same design (e.g. both config tiny_expression)",
        )
    return other.expression_encoder


def _summary(
    o: ReaderOptions, before: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    chosen = max(history, key=mean_reading)
    return {
        "from": str(o.checkpoint),
        "reader_from": o.reader_from,
        "settings": vars(o.settings),
        "step": chosen["step"],
        "selection_r_per_clip": chosen["per_clip"],
        "selection_r_per_clip_before": before["per_clip"],
    }
