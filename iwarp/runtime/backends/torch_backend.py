"""PyTorch backend: the network itself, on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from iwarp.checkpoint import load_network
from iwarp.model import Keypoints, SourceSet
from iwarp.motion import Pose
from iwarp.runtime.backends.base import AvatarFeatures, Backend
from iwarp.runtime.backends.denormals import flush_denormals_torch


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, checkpoint: str | Path | None = None, device: str | None = None, threads: int = 0
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.net, self.checkpoint = load_network(checkpoint, self.device)
        super().__init__(self.checkpoint.config.model)
        self.flush_denormals()

    def flush_denormals(self) -> bool:
        # torch's OpenMP workers keep their own MXCSR: set theirs too (denormals.py).
        return flush_denormals_torch() if self.device.type == "cpu" else True

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _keypoints(self, pose: Pose) -> Keypoints:
        """A numpy pose as the network's keypoints on this device."""
        on_device = pose.map(self._t)
        return Keypoints(on_device.points, on_device.strength, on_device.expression)

    @torch.inference_mode()
    def detect(self, images: np.ndarray) -> Pose:
        kp = self.net.detect(self._t(images))
        return Pose(kp.points, kp.strength, kp.expression).map(lambda t: t.cpu().numpy())

    @torch.inference_mode()
    def encode_source(self, image: np.ndarray, pose: Pose) -> dict:
        s = self.net.encode_with_keypoints(self._t(image), self._keypoints(pose), 1, 1)
        return {"keys": s.keys, "values": s.values, "pixels": s.pixels}

    def join_sources(self, rows: list[dict]) -> dict:
        joined = {k: torch.cat([r[k] for r in rows], dim=1) for k in ("keys", "values", "pixels")}
        joined["mask"] = torch.ones(joined["keys"].shape[:2], dtype=torch.bool, device=self.device)
        return joined

    def encode_avatar(self, images: np.ndarray) -> AvatarFeatures:
        features = super().encode_avatar(images)
        rows = features.rows
        # Built once per avatar: the per-frame path only adds the driving keypoints.
        rows["source_set"] = SourceSet(
            keypoints=self._keypoints(features.pose.map(lambda a: a[None])),  # (1, N, ...)
            keys=rows["keys"],
            values=rows["values"],
            pixels=rows["pixels"],
            mask=rows["mask"],
            num_sources=features.num_sources,
            image_size=self.image_size,
        )
        return features

    @torch.inference_mode()
    def animate(self, avatar: AvatarFeatures, pose: Pose) -> np.ndarray:
        driving = self._keypoints(pose)
        return self.net.animate(avatar.rows["source_set"], driving).float().cpu().numpy()

    def label(self) -> str:
        return f"PyTorch {self.device.type.upper()}"

    def describe(self) -> str:
        return f"torch ({self.device.type}, {torch.get_num_threads()} threads)"
