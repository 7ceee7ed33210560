"""Training loop: one process, or `torchrun --nproc_per_node=K` with DistributedDataParallel.

Every random choice in a step is drawn from generators seeded by (seed, step, rank), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from iwarp.checkpoint import Checkpoint, save_checkpoint
from iwarp.config import Config, get_config
from iwarp.errors import CheckpointError, IwarpError
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.keypoints import Keypoints
from iwarp.options import option
from iwarp.train.data import ClipDataset, load_stills
from iwarp.train.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    assign_guided_keypoints,
    equivariance_loss,
    feature_matching_loss,
    flow_smoothness_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    landmark_guidance_loss,
    stillness_loss,
    temporal_loss,
)
from iwarp.train.plots import plot_loss_curves, save_sample_grid


class TrainStep(nn.Module):
    """Network + generator-side losses in one module, so DDP sees one forward per step."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.net = ImplicitWarpingNetwork(config.model)
        w = config.train.loss
        self.perceptual = (
            PerceptualLoss(config.train.perceptual_backbone, config.train.perceptual_scales)
            if w.perceptual > 0
            else None
        )

    def forward(
        self,
        sources: torch.Tensor,
        driving: torch.Tensor,
        generator: torch.Generator,
        landmarks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's output and losses; `landmarks` (B, 68, 2), the driving frames' (NaN
        where unknown), are needed only for landmark guidance."""
        w = self.config.train.loss
        source = self.net.encode_sources(sources)
        kp = self.net.detect(driving)
        output, flow = self.net.animate_with_warp(
            source, self._jittered(kp, generator), self.config.train.source_dropout
        )
        losses = {"l1": (output - driving).abs().mean()}
        if w.warp_l1 > 0 and flow is not None:
            # Where the sources claim the pixel, their warp alone must already be right.
            claimed = 1 - flow.unmatched.detach()
            losses["warp_l1"] = ((flow.blended - driving).abs() * claimed).mean()
        if w.flow_smoothness > 0 and flow is not None:
            losses["flow_smoothness"] = flow_smoothness_loss(
                flow.flow, flow.mass, driving, self.config.model.attn_stride
            )
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(output.float(), driving)
        if w.equivariance > 0:
            losses["equivariance"] = equivariance_loss(
                self.net.keypoint_detector, driving, kp.points, generator
            )
        if w.strength_floor > 0:
            losses["strength_floor"] = torch.relu(0.2 - kp.strength.mean(dim=1)).mean()
        if w.temporal > 0:
            losses["temporal"] = temporal_loss(output, driving)
        if w.stillness > 0:
            losses["stillness"] = stillness_loss(output, driving)
        if w.warp_stillness > 0 and flow is not None:
            losses["warp_stillness"] = stillness_loss(flow.blended, driving)
        if w.landmark_guidance > 0 and landmarks is not None:
            losses["landmark_guidance"] = landmark_guidance_loss(
                kp.points, landmarks, self.config.train.guided_keypoints
            )
        return output, losses

    def _jittered(self, kp: Keypoints, generator: torch.Generator) -> Keypoints:
        """The keypoints with `keypoint_noise` added. Drawn from a generator of its own, so
        that the step's other draws (equivariance) are the same with noise and without."""
        sigma = self.config.train.keypoint_noise
        if sigma == 0:
            return kp
        own = torch.Generator().manual_seed(generator.initial_seed() + 1)
        noise = torch.randn(kp.points.shape, generator=own) * sigma
        return Keypoints(kp.points + noise.to(kp.points), kp.strength)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def seeded_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The torch generator of one training step on one rank (a pure function of the three,
    so that `--resume` and the throughput benchmark draw what training draws)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))
    return g


@dataclass(kw_only=True)
class TrainOptions:
    """`iwarp train`: the run, and overrides of the config's training settings (None: keep)."""

    config: str = option("tiny", help="tiny, paper or paper512")
    data: str = option(help="folder of clips (manifest.csv optional)")
    out: str = option(help="run folder: checkpoints, samples, curves")
    steps: int = option(10_000, help="total steps, resumed ones included")
    resume: bool = option(False, help="continue from OUT/checkpoints/latest")
    init: str | None = option(None, help="start from these weights (a fine-tune), not from scratch")
    size: int | None = option(None, help="training crop size (default: the config's)")
    batch_size: int | None = option(None, help="batch size (default: the config's)")
    lr: float | None = option(None, help="learning rate (default: the config's)")
    seed: int | None = option(None, help="data and initialisation seed (default: the config's)")
    max_sources: int | None = option(
        None, help="most source frames per sample (default: the config's)"
    )
    bf16: bool = option(False, help="bfloat16 autocast")
    keypoint_noise: float | None = option(
        None,
        help="std of noise on the driving keypoints the animator sees, in [-1, 1] units "
        "(default: the config's)",
    )
    temporal_gap: int | None = option(
        None,
        help="temporal and stillness losses: most frames between a pair's two frames "
        "(1..N, uniform; default: the config's)",
    )
    loss: list[str] = option(
        default_factory=list, metavar="NAME=W", help="override a loss weight (repeatable)"
    )
    no_residual: bool = option(False, help="ablation: no residual branch")
    extra_tokens: int | None = option(None, help="ablation: number of extra tokens (0 = off)")
    source_features: bool = option(
        False, help="add frozen ImageNet features of the sources to keys and values"
    )
    device: str | None = option(None, help="cpu or cuda (default: cuda when available)")
    stills: str | None = option(
        None, help="folder of portrait photos mixed in with synthetic motion (still_share)"
    )
    cache: str | None = option(
        None, help="where prepared clips are cached (default ~/.cache/iwarp)"
    )
    sample_every: int | None = option(None, help="steps between sample grids")
    checkpoint_every: int | None = option(None, help="steps between checkpoints")
    val_every: int | None = option(None, help="steps between validation runs")
    select_on: str | None = option(
        None, help="l1 or perceptual: what chooses best.safetensors (default: the config's)"
    )
    log_every: int | None = option(None, help="steps between log lines")

    def to_config(self) -> Config:
        """The named config with these overrides applied."""
        return self.apply(get_config(self.config))

    def apply(self, config: Config) -> Config:
        """`config` (e.g. a checkpoint's own) with these overrides applied, in place."""
        tc = config.train
        for name in ("batch_size", "lr", "seed", "max_sources", "temporal_gap", "keypoint_noise"):
            if getattr(self, name) is not None:
                setattr(tc, name, getattr(self, name))
        if self.size is not None:
            tc.train_size = self.size
        if self.bf16:
            tc.bf16 = True
        tc.loss.override(self.loss)
        for name in ("sample_every", "checkpoint_every", "val_every", "select_on", "log_every"):
            if getattr(self, name) is not None:
                setattr(tc, name, getattr(self, name))
        if self.no_residual:
            config.model.residual_branch = False
        if self.extra_tokens is not None:
            config.model.extra_tokens = self.extra_tokens
        if self.source_features:
            config.model.source_features = True
        return config


def train(
    config: Config,
    data: str | Path | ClipDataset,
    out: str | Path,
    steps: int,
    resume: bool = False,
    device: str | None = None,
    init_checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    val_data: ClipDataset | None = None,
    max_seconds: float | None = None,
    stills: str | Path | None = None,
) -> dict[str, float]:
    """Trains for `steps` total steps (counting any resumed ones); returns the last losses.

    `data` is a folder of clips or clips already in memory (a ClipDataset, e.g. decoded by the
    GPU check; then `val_data` is used as given). `max_seconds` ends the run early, after the
    step that passes it, with the usual last-step log, samples, validation and checkpoint.
    `stills`: a folder of portrait photos, `tc.still_share` of the samples (synthetic motion).
    """
    out = Path(out)
    t_start = time.perf_counter()
    tc = config.train
    if tc.select_on not in ("l1", "perceptual") or (
        tc.select_on == "perceptual" and tc.loss.perceptual <= 0
    ):
        raise IwarpError(
            f"cannot choose checkpoints on {tc.select_on!r}",
            "use select_on l1, or perceptual with a perceptual loss weight above 0",
        )
    if tc.loss.needs_pairs and (tc.batch_size % 2 or tc.temporal_gap < 1):
        raise IwarpError(
            f"the temporal and stillness losses train on pairs of frames at least 1 frame "
            f"apart: batch size {tc.batch_size}{' is odd' if tc.batch_size % 2 else ''}, "
            f"temporal gap {tc.temporal_gap}",
            "use an even --batch-size and --temporal-gap 1 or more",
        )
    if not tc.keypoint_noise >= 0:
        raise IwarpError(
            f"keypoint noise {tc.keypoint_noise} is not a standard deviation",
            "use --keypoint-noise 0 (off) or more, e.g. 0.01",
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ddp = _init_distributed(dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(dev)
    torch.manual_seed(tc.seed)

    if isinstance(data, ClipDataset):
        train_data = data
    else:
        train_data = ClipDataset(
            data,
            tc.train_size,
            split="train",
            cache_dir=cache_dir,
            show_progress=ddp.main and show_progress,
        )
        val_data = _maybe_val_data(data, tc.train_size, cache_dir, ddp.main and show_progress)
    if stills is not None and tc.still_share > 0 and tc.loss.needs_pairs:
        warnings.warn(
            "the temporal and stillness losses train on pairs of neighbouring clip frames: the "
            "stills are not used (drop --stills, or those losses)",
            stacklevel=2,
        )
    elif stills is not None and tc.still_share > 0:
        photos = load_stills(stills, tc.train_size, cache_dir, ddp.main and show_progress)
        train_data.add_stills(photos, tc.still_share)

    module = TrainStep(config).to(dev)
    params = [p for p in module.net.parameters()]
    opt = torch.optim.Adam(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    disc = PatchDiscriminator().to(dev) if tc.loss.gan > 0 else None
    opt_d = (
        torch.optim.Adam(disc.parameters(), lr=tc.lr_discriminator, betas=tc.betas)
        if disc
        else None
    )

    start = 0
    latest = out / "checkpoints" / "latest.safetensors"
    best_val = math.inf
    if resume and latest.is_file():
        ckpt = Checkpoint(latest)
        if ckpt.config.model != config.model:
            raise CheckpointError(
                f"{latest} was trained with another model config", "resume with the same --config"
            )
        ckpt.load_module(module.net)
        ckpt.load_optimizer("generator", opt)
        if disc is not None and "optim.discriminator.param_groups" in ckpt.metadata:
            ckpt.load_module(disc, "discriminator")
            ckpt.load_optimizer("discriminator", opt_d)
        start = ckpt.step
        best_val = ckpt.extra.get("best_val", math.inf)
        tc.guided_keypoints = ckpt.config.train.guided_keypoints  # the run's, not a new choice
    else:
        init_state: dict[str, torch.Tensor] = {}
        if init_checkpoint:
            init = Checkpoint(init_checkpoint)
            init_state = init.state_dict()
            if init.config.model == config.model:
                init.load_module(module.net)
            else:
                adapted = load_compatible(module.net, init_state)
                if ddp.main:
                    print(f"init from {init_checkpoint}: adapted {adapted}")
        if config.model.source_features and not any(
            name.startswith("source_features.") for name in init_state
        ):
            module.net.source_features.load_imagenet_weights()

    if tc.loss.landmark_guidance > 0:
        train_data.load_landmarks(cache_dir, ddp.main and show_progress)
        if not tc.guided_keypoints:
            tc.guided_keypoints = _assign_guided_keypoints(module.net, train_data, tc, dev)
            if ddp.main:
                print(f"landmark guidance: keypoints {tc.guided_keypoints} for the groups")

    ema = EmaWeights(module.net, tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None and resume and latest.is_file():
        ema_state = Checkpoint(latest).state_dict("ema")
        if ema_state:
            ema.load(ema_state)

    if ddp.world > 1:
        model: nn.Module = nn.parallel.DistributedDataParallel(module)
        disc_model = nn.parallel.DistributedDataParallel(disc) if disc else None
    else:
        model, disc_model = module, disc

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())
    log_path = out / "metrics.jsonl"
    if not resume and ddp.main and log_path.exists():
        log_path.unlink()

    progress = tqdm(
        total=steps,
        initial=start,
        desc="train",
        disable=not (ddp.main and show_progress),
        dynamic_ncols=True,
    )
    last: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    for step in range(start, steps):
        module.train()
        num_sources = 1 + int(np.random.default_rng([tc.seed, step]).integers(tc.max_sources))
        sources, driving, landmarks = train_data.batch_with_landmarks(
            tc.seed,
            step,
            tc.batch_size,
            num_sources,
            ddp.rank,
            temporal_gap=tc.temporal_gap if tc.loss.needs_pairs else 0,
        )
        sources, driving = sources.to(dev), driving.to(dev)
        guide = landmarks.to(dev) if tc.loss.landmark_guidance > 0 else None
        gen = seeded_generator(tc.seed, step, ddp.rank)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))

        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.bf16):
            output, losses = model(sources, driving, gen, guide)
            use_gan = disc is not None and step >= tc.gan_start_step
            if use_gan:
                # Generator side: the discriminator is a frozen judge (no DDP, no grads).
                disc.requires_grad_(False)
                fake = disc(output)
                with torch.no_grad():
                    real = disc(driving)
                losses["gan"] = gan_generator_loss(fake)
                if tc.loss.feature_matching > 0:
                    losses["feature_matching"] = feature_matching_loss(real, fake)
        weights = vars(tc.loss)
        total = sum(weights[k] * v.float() for k, v in losses.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 else None
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, step, steps)
        opt.step()
        if ema is not None:
            ema.update(module.net)

        if use_gan:
            disc.requires_grad_(True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.bf16):
                # One forward over real and fake together: DDP wants one forward per backward.
                both = disc_model(torch.cat([driving, output.detach()]))
                b = driving.shape[0]
                d_loss = gan_discriminator_loss(
                    [[f[:b] for f in s] for s in both], [[f[b:] for f in s] for s in both]
                )
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            losses["discriminator"] = d_loss

        last = {k: float(v.detach()) for k, v in losses.items()}
        last["total"] = float(total.detach())
        copy_l1 = float((sources[:, 0] - driving).abs().mean())
        last["copy_source_l1"] = copy_l1
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        window_samples += tc.batch_size * ddp.world
        progress.update(1)
        done = step + 1
        timed_out = max_seconds is not None and time.perf_counter() - t_start > max_seconds
        if timed_out and ddp.world == 1 and done < steps:  # ranks could disagree: one process
            steps = done  # time is up: this step is the last one (logs, checkpoint below)

        if ddp.main and (done % tc.log_every == 0 or done == steps):
            now = time.perf_counter()
            rate = window_samples / max(now - window_start, 1e-9)
            window_start, window_samples = now, 0
            progress.set_postfix(
                l1=f"{last['l1']:.4f}",
                copy=f"{copy_l1:.4f}",
                total=f"{last['total']:.3f}",
                sps=f"{rate:.1f}",
            )
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, "samples_per_s": rate, **last}) + "\n")
        if ddp.main and (done % tc.sample_every == 0 or done == steps):
            save_sample_grid(out / "samples" / f"step_{done:07d}.png", sources, driving, output)
            plot_loss_curves(log_path, out / "loss_curves.png")
        if val_data is not None and (done % tc.val_every == 0 or done == steps):
            shipped = ema.module if ema is not None else module.net
            val = validate(shipped, val_data, tc, dev, module.perceptual)
            if ddp.main:
                with (out / "selection.jsonl").open("a") as f:
                    f.write(json.dumps({"step": done, **val}) + "\n")
                progress.write(
                    f"step {done}: selection l1 {val['l1']:.4f} "
                    f"(copy-source {val['copy_source_l1']:.4f}), "
                    f"psnr {val['psnr']:.2f} dB (copy-source {val['copy_source_psnr']:.2f})"
                )
                if val[tc.select_on] < best_val:
                    best_val = val[tc.select_on]
                    save_checkpoint(
                        out / "checkpoints" / "best.safetensors",
                        config,
                        shipped,
                        done,
                        extra={"val": val},
                    )
        if ddp.main and (done % tc.checkpoint_every == 0 or done == steps):
            save_checkpoint(
                latest,
                config,
                module.net,
                done,
                optimizers={"generator": opt, **({"discriminator": opt_d} if opt_d else {})},
                modules={
                    **({"discriminator": disc} if disc else {}),
                    **({"ema": ema.module} if ema is not None else {}),
                }
                or None,
                extra={"best_val": best_val},
            )
        if done >= steps:
            break
    progress.close()
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def learning_rate(tc, step: int, steps: int) -> float:
    """Constant, or cosine decay from lr to lr * lr_min_ratio over the run."""
    if tc.lr_schedule == "constant":
        return tc.lr
    if tc.lr_schedule != "cosine":
        raise CheckpointError(f"unknown lr_schedule {tc.lr_schedule!r}", "use constant or cosine")
    progress = min(step / max(steps - 1, 1), 1.0)
    low = tc.lr * tc.lr_min_ratio
    return low + 0.5 * (tc.lr - low) * (1 + math.cos(math.pi * progress))


class EmaWeights:
    """An exponential moving average of a network's weights (buffers copied as they are)."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        pairs = zip(self.module.state_dict().values(), net.state_dict().values(), strict=True)
        for mine, theirs in pairs:
            if mine.dtype.is_floating_point:
                mine.lerp_(theirs, 1 - self.decay)
            else:
                mine.copy_(theirs)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def load_compatible(net: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Loads a checkpoint of a related design: equal shapes copy; the pixel skip's extra patch
    rows become their mean colour; a widened input copies the old channels and zeroes the new.
    Returns the names that were adapted or left at their initial values."""
    own = net.state_dict()
    adapted = []
    with torch.no_grad():
        for name, target in own.items():
            value = state.get(name)
            if value is None:
                adapted.append(f"{name} (new)")
            elif value.shape == target.shape:
                target.copy_(value)
            elif (
                name.endswith("extra_pixels")
                and value.shape[0] == target.shape[0]
                and value.shape[1] % 3 == 0
            ):
                target.copy_(value.reshape(value.shape[0], 3, -1).mean(-1)[:, : target.shape[1]])
                adapted.append(f"{name} (patch -> mean colour)")
            elif value.dim() == target.dim() and value.shape[0] == target.shape[0]:
                target.zero_()
                target[:, : value.shape[1]].copy_(value[:, : target.shape[1]])
                adapted.append(f"{name} {tuple(value.shape)} -> {tuple(target.shape)}")
            else:
                adapted.append(f"{name} (shape {tuple(value.shape)}: left new)")
    return adapted


@torch.no_grad()
def _assign_guided_keypoints(
    net: ImplicitWarpingNetwork, data: ClipDataset, tc, device: torch.device, frames: int = 64
) -> tuple[int, ...]:
    """Each landmark group gets the keypoint that sits nearest to it over `frames` driving
    frames (fixed draws, no augmentation)."""
    _, driving, landmarks = data.batch_with_landmarks(20_000 + tc.seed, 0, frames, 1, augment=False)
    was_training = net.training
    net.eval()  # no batch-norm statistics updated by looking
    points = torch.cat(
        [net.detect(chunk.to(device)).points.float().cpu() for chunk in driving.split(16)]
    )
    net.train(was_training)
    return assign_guided_keypoints(points, landmarks)


def _maybe_val_data(data, size, cache_dir, show_progress) -> ClipDataset | None:
    """The selection split (held-out train identities, `data.find_clips`): checkpoints are
    validated and chosen on it; the val split is left for `iwarp eval` to report."""
    if not (Path(data) / "manifest.csv").is_file():
        return None
    try:
        return ClipDataset(
            data, size, split="select", cache_dir=cache_dir, show_progress=show_progress
        )
    except Exception:
        return None


@torch.no_grad()
def validate(
    net: ImplicitWarpingNetwork,
    data: ClipDataset,
    tc,
    device: torch.device,
    perceptual: PerceptualLoss | None = None,
) -> dict[str, float]:
    """Fixed val batches (same every time): model L1/PSNR beside copy-the-source, and the
    training perceptual loss when there is one (a GAN fine-tune is chosen on it)."""
    net.eval()
    l1, copy_l1, psnr, copy_psnr, percept, n = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for i in range(tc.val_batches):
        sources, driving = data.batch(10_000 + tc.seed, i, tc.batch_size, 1, augment=False)
        sources, driving = sources.to(device), driving.to(device)
        output = net(sources, driving)[0]
        copy = sources[:, 0]
        l1 += float((output - driving).abs().mean())
        copy_l1 += float((copy - driving).abs().mean())
        psnr += float(_psnr(output, driving).mean())
        copy_psnr += float(_psnr(copy, driving).mean())
        if perceptual is not None:
            percept += float(perceptual(output.float(), driving))
        n += 1
    return {
        **({"perceptual": percept / n} if perceptual is not None else {}),
        "l1": l1 / n,
        "copy_source_l1": copy_l1 / n,
        "psnr": psnr / n,
        "copy_source_psnr": copy_psnr / n,
    }


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)
