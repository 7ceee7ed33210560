"""OpenVINO backend: the exported ONNX graphs (iwarp.graphs) compiled by OpenVINO's CPU plugin.

Why a second CPU engine: on CPUs with AMX or AVX512-BF16 OpenVINO runs the graphs in bf16
(fp32 inputs and outputs, bf16 matrix work), which ONNX Runtime's CPU provider does not; and
its fp32 is on par with ONNX Runtime's. Precisions:

- "fp32": f32 inference precision (any x86 CPU);
- "bf16": bf16 inference precision; offered only where the CPU computes bf16 natively
  (`iwarp.system.has_bf16_compute`), and `auto` takes it only after its accuracy gate
  (`engine_choice`);
- "int8": the calibrated Q/DQ graphs of `iwarp calibrate` (`<build_dir>/int8/`).

Each graph is compiled for static shapes (batch 1; the animator per number of avatar tokens):
measured here, the animator compiled for dynamic shapes ran 1.2-1.8x slower than for static
ones, and a compile takes ~0.2 s. Compiled models are cached per (graph file, precision,
threads, shapes) for the whole process, so several Animators, streams and benchmark runs share
them; each thread gets its own infer request. An avatar's rows become OpenVINO tensors once
(`join_sources`) and are bound to a request only when the avatar changes, so per frame only the
driving pose (K x 3 floats, and E for a network with an expression) is copied in.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from iwarp import graphs
from iwarp.config import Config
from iwarp.errors import IwarpError
from iwarp.motion import Pose
from iwarp.runtime.backends.base import AvatarFeatures, Backend
from iwarp.runtime.backends.denormals import openvino_config
from iwarp.system import has_bf16_compute, physical_cores

PRECISIONS = ("fp32", "bf16", "int8")
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}

_core: Any = None
_compiled: dict[tuple, Any] = {}
_compile_lock = threading.Lock()


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def core() -> Any:
    """The process's one OpenVINO Core (it owns the CPU plugin and its thread pools)."""
    global _core
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def compiled_model(
    path: Path, precision: str, threads: int, shapes: dict[str, tuple[int, ...]]
) -> Any:
    """`path` compiled for these input shapes, from the process-wide cache."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, precision, threads, tuple(shapes.items()))
    with _compile_lock:
        model = _compiled.get(key)
        if model is None:
            ov_core = core()
            graph = ov_core.read_model(str(path))
            graph.reshape({name: list(shape) for name, shape in shapes.items()})
            config = {
                "INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision],
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                # Pinning would put every model's threads on the same cores; the server runs
                # several workers side by side.
                "ENABLE_CPU_PINNING": False,
                **openvino_config(),
            }
            model = _compiled[key] = ov_core.compile_model(graph, "CPU", config)
    return model


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(
        self,
        build_dir: str | Path,
        threads: int = 0,
        precision: str = "fp32",
        metadata: dict | None = None,
    ) -> None:
        import openvino as ov

        from iwarp.engine_build.export import graph_path, load_metadata

        if precision not in PRECISIONS:
            raise IwarpError(f"unknown precision {precision!r}", f"choose one of {PRECISIONS}")
        if precision == "bf16" and not has_bf16_compute():
            raise IwarpError(
                "this CPU has neither AMX nor AVX512-BF16, so OpenVINO would emulate bf16",
                "use --precision fp32 (or --backend auto)",
            )
        self._ov = ov
        self.build_dir = Path(build_dir)
        self.metadata = metadata or load_metadata(self.build_dir)
        super().__init__(Config.from_dict(self.metadata["config"]).model)
        self.precision = precision
        self.threads = threads or physical_cores()
        self.paths = {g: graph_path(self.build_dir, g) for g in graphs.GRAPHS}
        self.specs = graphs.graph_specs(self.config)
        self._local = threading.local()
        # Compile the per-frame graphs now, so the first frame does not pay for it.
        self._request(graphs.KEYPOINTS_GRAPH, batch=1)
        self._request(graphs.ANIMATOR_GRAPH, batch=1, tokens=self.config.tokens_per_source)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        build_dir: str | Path | None = None,
        threads: int = 0,
        show_progress: bool = True,
        precision: str = "fp32",
    ) -> OpenVinoBackend:
        """Graphs of `checkpoint` (None: the shipped weights), exported on first use; int8
        reads the graphs `iwarp calibrate --out <build_dir>` wrote."""
        from iwarp.runtime.backends.onnx_build import prepared_graphs

        if precision not in PRECISIONS:
            raise IwarpError(f"unknown precision {precision!r}", f"choose one of {PRECISIONS}")
        graph_precision = "int8" if precision == "int8" else "fp32"
        folder, metadata = prepared_graphs(checkpoint, build_dir, graph_precision, show_progress)
        return cls(folder, threads, precision, metadata)

    # -- compiled graphs and requests ---------------------------------------------------------
    def _request(self, graph: str, batch: int, tokens: int = 0) -> Any:
        """This thread's infer request for `graph` compiled at these shapes."""
        key = (graph, batch, tokens)
        requests = self._local.__dict__.setdefault("requests", {})
        request = requests.get(key)
        if request is None:
            shapes = {
                t.name: t.concrete(**{graphs.BATCH: batch, graphs.TOKENS: tokens})
                for t in self.specs[graph].inputs
            }
            model = compiled_model(self.paths[graph], self.precision, self.threads, shapes)
            request = requests[key] = _Request(model.create_infer_request())
        return request

    # -- stages -------------------------------------------------------------------------------
    def detect(self, images: np.ndarray) -> Pose:
        if images.shape[0] != 1:
            # An avatar's photos: one at a time through the batch-1 graph (no extra compile).
            parts = [self.detect(images[i : i + 1]) for i in range(images.shape[0])]
            return Pose.join(parts, np.concatenate)
        spec = self.specs[graphs.KEYPOINTS_GRAPH]
        request = self._request(spec.name, batch=1)
        return graphs.pose_of(spec.named_outputs(request.run(spec.feeds(images))))

    def encode_source(self, image: np.ndarray, pose: Pose) -> dict:
        spec = self.specs[graphs.SOURCE_ENCODER_GRAPH]
        request = self._request(spec.name, batch=1)
        feeds = {graphs.IMAGE: image, **graphs.pose_feeds(pose)}
        return spec.named_outputs(request.run(feeds))

    def join_sources(self, rows: list[dict]) -> dict[str, Any]:
        """One OpenVINO tensor per animator input, made once per avatar."""
        joined = {k: np.concatenate([r[k] for r in rows], axis=1) for k in graphs.AVATAR_ROWS}
        joined[graphs.KEY_MASK] = np.ones(joined[graphs.KEYS].shape[:2], dtype=bool)
        return {k: self._ov.Tensor(np.ascontiguousarray(v)) for k, v in joined.items()}

    def animate(self, avatar: AvatarFeatures, pose: Pose) -> np.ndarray:
        rows = avatar.rows
        tokens = int(rows[graphs.KEYS].shape[1])
        request = self._request(graphs.ANIMATOR_GRAPH, batch=1, tokens=tokens)
        request.bind(rows)
        return request.run(graphs.pose_feeds(pose))[0]

    def label(self) -> str:
        return f"OpenVINO {self.precision.upper()}"

    def describe(self) -> str:
        return (
            f"openvino {self._ov.__version__} (CPU, {self.threads} threads, {self.precision}, "
            f"inference precision {_INFERENCE_PRECISION[self.precision]})"
        )


class _Request:
    """An infer request with its inputs written in place (no per-frame tensor objects)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.bound: int | None = None  # id of the avatar rows set on the request

    def bind(self, rows: dict[str, Any]) -> None:
        if self.bound != id(rows):
            for name, tensor in rows.items():
                self.request.set_tensor(name, tensor)
            self.bound = id(rows)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in feeds.items():
            self.request.get_tensor(name).data[...] = value
        self.request.infer()
        outputs = self.request.model_outputs
        return [np.array(self.request.get_tensor(o).data, copy=True) for o in outputs]
