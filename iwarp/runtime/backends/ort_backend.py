"""ONNX Runtime backend: the three exported graphs (see iwarp.engine_build.export).

Graphs are exported on first use into the user's cache (one folder per checkpoint sha256) and
reused after. An avatar's rows are made into OrtValues once, on the session's device, in
`join_sources` (one per animator input of `iwarp.graphs`: keys, values, pixels, key_mask);
per frame only the driving pose (K x 3 floats, and E for a network with an expression) goes in.

IOBinding with a pre-allocated output was measured against `run()` on the CPU (256 px, 1 and
3 sources, 1 and 2 threads): paired median differences of -1 to +4 ms on a 25-110 ms frame,
i.e. no gain beyond noise, so `run()` is used: it needs no per-session output buffer, so
concurrent streams can share the sessions.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from iwarp import graphs
from iwarp.config import Config
from iwarp.errors import IwarpError
from iwarp.motion import Pose
from iwarp.runtime.backends.base import AvatarFeatures, Backend
from iwarp.runtime.backends.onnx_build import prepared_graphs
from iwarp.system import physical_cores

PRECISIONS = ("fp32", "int8")  # int8: Q/DQ graphs from `iwarp calibrate`
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        build_dir: str | Path,
        device: str | None = None,
        threads: int = 0,
        metadata: dict | None = None,
    ) -> None:
        from iwarp.engine_build.export import graph_path, load_metadata, ort_session

        self.build_dir = Path(build_dir)
        self.metadata = metadata or load_metadata(self.build_dir)
        config = Config.from_dict(self.metadata["config"])
        super().__init__(config.model)
        available = ort.get_available_providers()
        want_cuda = device is None or device.startswith("cuda")
        if want_cuda and _CUDA in available:
            device_id = int(device.split(":")[1]) if device and ":" in device else 0
            providers: list[Any] = [(_CUDA, {"device_id": device_id}), _CPU]
            self.device, self._device_id = "cuda", device_id
        else:
            if device is not None and device.startswith("cuda"):
                warnings.warn(
                    "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); "
                    "running on the CPU",
                    stacklevel=2,
                )
            providers = [_CPU]
            self.device, self._device_id = "cpu", 0
        self.threads = threads or physical_cores()
        self._providers = providers
        self.specs = graphs.graph_specs(self.config)
        self.sessions = {
            g: ort_session(graph_path(self.build_dir, g), self.threads, providers)
            for g in graphs.GRAPHS
        }

    def with_graphs(self, files: dict[str, Path], basic_optimizations: bool = False) -> OrtBackend:
        """This backend with some graphs replaced by other files of the same contract (a
        quantized graph among the FP32 ones: calibration measures each graph alone); the other
        sessions are shared. `basic_optimizations` for FP8 Q/DQ graphs (see `ort_session`)."""
        from iwarp.engine_build.export import ort_session

        variant = copy.copy(self)
        variant.sessions = {
            **self.sessions,
            **{
                g: ort_session(path, self.threads, self._providers, basic_optimizations)
                for g, path in files.items()
            },
        }
        return variant

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        build_dir: str | Path | None = None,
        device: str | None = None,
        threads: int = 0,
        show_progress: bool = True,
        precision: str = "fp32",
    ) -> OrtBackend:
        """Graphs of `checkpoint` (None: the shipped weights), exported on first use.

        In the default cache folder stale graphs are re-exported; in a `build_dir` the user
        gave, graphs from another checkpoint or config raise CheckpointError.
        `precision="int8"` loads the quantized graphs from `<build_dir>/int8/` instead, which
        `iwarp calibrate --out <build_dir>` writes (never made here: they need calibration).
        """
        if precision not in PRECISIONS:
            raise IwarpError(f"unknown precision {precision!r}", f"choose one of {PRECISIONS}")
        folder, metadata = prepared_graphs(checkpoint, build_dir, precision, show_progress)
        return cls(folder, device, threads, metadata)

    # -- stages -------------------------------------------------------------------------------
    def detect(self, images: np.ndarray) -> Pose:
        spec = self.specs[graphs.KEYPOINTS_GRAPH]
        outputs = self.sessions[spec.name].run(None, spec.feeds(_f32(images)))
        return graphs.pose_of(spec.named_outputs(outputs))

    def encode_source(self, image: np.ndarray, pose: Pose) -> dict:
        spec = self.specs[graphs.SOURCE_ENCODER_GRAPH]
        feeds = {graphs.IMAGE: _f32(image), **graphs.pose_feeds(pose.map(_f32))}
        return spec.named_outputs(self.sessions[spec.name].run(None, feeds))

    def join_sources(self, rows: list[dict]) -> dict[str, Any]:
        """One contiguous array per animator input, made into an OrtValue on the session's
        device once; `animate` feeds these OrtValues as they are, every frame."""
        joined = {k: np.concatenate([r[k] for r in rows], axis=1) for k in graphs.AVATAR_ROWS}
        joined[graphs.KEY_MASK] = np.ones(joined[graphs.KEYS].shape[:2], dtype=bool)
        return {k: self._ort_value(v) for k, v in joined.items()}

    def animate(self, avatar: AvatarFeatures, pose: Pose) -> np.ndarray:
        # The avatar's rows are keyed by the animator's own input names (join_sources).
        feeds = {**avatar.rows, **graphs.pose_feeds(pose.map(_f32))}
        return self.sessions[graphs.ANIMATOR_GRAPH].run(None, feeds)[0]

    def _ort_value(self, array: np.ndarray) -> ort.OrtValue:
        array = np.ascontiguousarray(array)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, self._device_id)

    def label(self) -> str:
        return f"ONNX Runtime {self.metadata.get('precision', 'fp32').upper()}"

    def describe(self) -> str:
        providers = self.sessions[graphs.ANIMATOR_GRAPH].get_providers()
        precision = self.metadata.get("precision", "fp32")
        return (
            f"onnxruntime {ort.__version__} ({providers[0]}, {self.threads} threads, {precision})"
        )


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
