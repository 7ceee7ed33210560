"""Checkpoints as safetensors: weights, optimiser state, step and the config as metadata.

One file format for everything: training checkpoints (model + optimisers) and the shipped
weights (model only). The config travels inside the file, so loading never guesses a shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from iwarp.config import Config
from iwarp.errors import CheckpointError
from iwarp.paths import DEFAULT_CHECKPOINT


def save_checkpoint(
    path: str | Path,
    config: Config,
    model: nn.Module,
    step: int = 0,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    modules: dict[str, nn.Module] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes atomically (temp file + rename), so a crash never leaves half a checkpoint."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta: dict[str, str] = {"config": config.to_json(), "step": str(step), "format": "iwarp/1"}
    for name, module in (modules or {}).items():
        tensors.update(
            {f"{name}.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        )
    for name, opt in (optimizers or {}).items():
        state = opt.state_dict()
        for idx, param_state in state["state"].items():
            for key, value in param_state.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{name}.{idx}.{key}"] = value.detach().contiguous().cpu()
        meta[f"optim.{name}.param_groups"] = json.dumps(state["param_groups"])
    if extra:
        meta["extra"] = json.dumps(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


class Checkpoint:
    """A loaded checkpoint file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else DEFAULT_CHECKPOINT
        if not self.path.is_file():
            raise CheckpointError(
                f"checkpoint {self.path} not found",
                "give the path of a .safetensors file written by 'iwarp train'",
            )
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
            self.tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path} is not a readable safetensors checkpoint ({exc})",
                "the file may be truncated; use another checkpoint",
            ) from exc
        if "config" not in self.metadata:
            raise CheckpointError(
                f"{self.path} has no iwarp config in its metadata",
                "it was not written by iwarp; use a checkpoint from 'iwarp train'",
            )
        self.config = Config.from_json(self.metadata["config"])
        self.step = int(self.metadata.get("step", 0))
        self.extra = json.loads(self.metadata.get("extra", "{}"))

    def state_dict(self, prefix: str = "model") -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def load_module(self, module: nn.Module, prefix: str = "model") -> None:
        try:
            module.load_state_dict(self.state_dict(prefix))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(
                f"{self.path} does not match the network ({first})",
                "use the config the checkpoint was trained with, or another checkpoint",
            ) from exc

    def load_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        key = f"optim.{name}.param_groups"
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} has no optimiser state for {name}", "cannot resume")
        groups = json.loads(self.metadata[key])
        state: dict[int, dict[str, torch.Tensor]] = {}
        p = f"optim.{name}."
        for k, v in self.tensors.items():
            if k.startswith(p):
                idx, field = k[len(p) :].split(".", 1)
                state.setdefault(int(idx), {})[field] = v
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_network(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """(network in eval mode, Checkpoint). `path=None` loads the weights shipped in the package."""
    from iwarp.model import ImplicitWarpingNetwork

    ckpt = Checkpoint(path)
    net = ImplicitWarpingNetwork(ckpt.config.model)
    ckpt.load_module(net)
    return net.to(device).eval(), ckpt
