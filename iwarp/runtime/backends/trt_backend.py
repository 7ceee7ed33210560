"""TensorRT backend: one engine per stage (iwarp.engine_build.tensorrt_build), on one CUDA stream.

Memory: torch CUDA tensors are the device buffers (`data_ptr()` -> `set_tensor_address`); an
avatar's rows (keys, values, pixels, mask) are made once by the source encoder and stay on the
GPU. Per frame only the driving pose (K x 3 floats, and E for a network with an expression) goes
up and the image comes down, both through pinned host buffers with async copies.

Per-frame path: `detect` (keypoints engine) and `animate` (animator engine) each run one
`execute_async_v3` on the backend's stream. After one eager warm-up run for a shape (and, for
`animate`, an avatar), the H2D copy, the engine and the D2H copy are captured into a CUDA graph
and later frames only replay it (TensorRT's recommended pattern: enqueue once before capturing).
Graphs bind the avatar's row addresses, so they are cached per avatar (LRU, `GRAPH_CACHE`
avatars), holding a reference to the rows they use. Each captured graph has its own execution
context: a context holds the input shapes last set on it, and a graph captured for avatar A
(N_A sources) must not replay with the shape state avatar B's binding left behind. The contexts
of one engine share one scratch buffer (user-managed device memory): every step runs on the
backend's one stream, one at a time.

TensorRT 11 API: Runtime.deserialize_cuda_engine, ICudaEngine.get_tensor_name/mode/dtype,
IExecutionContext.set_input_shape/set_tensor_address/execute_async_v3. Not runnable without an
NVIDIA GPU and TensorRT; `tensorrt` is imported only when this backend is created.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from iwarp.config import Config, ModelConfig
from iwarp.errors import IwarpError
from iwarp.graphs import (
    ANIMATOR_GRAPH,
    AVATAR_ROWS,
    IMAGE,
    KEY_MASK,
    KEYPOINTS_GRAPH,
    KEYS,
    SOURCE_ENCODER_GRAPH,
    pose_feeds,
    pose_of,
)
from iwarp.motion import Pose
from iwarp.runtime.backends.base import AvatarFeatures, Backend

GRAPH_CACHE = 8
_ROW_KEYS = (*AVATAR_ROWS, KEY_MASK)  # an avatar's rows, keyed by the animator's input names


def _torch():
    import torch

    if not torch.cuda.is_available():
        raise IwarpError("the TensorRT backend needs a CUDA GPU", "use --backend onnxruntime")
    return torch


class _Engine:
    """One deserialized engine with its execution context and I/O description."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: Any) -> None:
        torch = _torch()
        self.trt = trt
        self.path = path
        self.device = device
        data = path.read_bytes()
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise IwarpError(
                f"TensorRT could not load {path}",
                "rebuild it with 'iwarp build' (engines are tied to a TensorRT version and GPU)",
            )
        self._scratch: Any = None  # device memory shared by this engine's contexts
        self.context = self.new_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {
            n: _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(n))) for n in names
        }

    def new_context(self) -> Any:
        """An execution context of its own (one per captured CUDA graph), on the engine's
        shared scratch memory when this TensorRT lets contexts share it."""
        trt, torch = self.trt, _torch()
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        size = getattr(self.engine, "device_memory_size_v2", None)
        if strategy is None or size is None:
            return self.engine.create_execution_context()
        context = self.engine.create_execution_context(strategy.USER_MANAGED)
        if self._scratch is None:
            self._scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
        context.set_device_memory(self._scratch.data_ptr(), int(size))
        return context

    def bind(
        self, inputs: dict[str, Any], out_buffers: dict[str, Any], context: Any = None
    ) -> dict[str, Any]:
        """Sets input shapes and addresses (device tensors) and the output addresses on
        `context` (default: the engine's own), using and (re)allocating the caller's
        `out_buffers`; returns the output device tensors."""
        torch = _torch()
        context = context or self.context
        for name in self.inputs:
            t = inputs[name]
            if t.dtype != self.dtypes[name] or not t.is_contiguous():
                raise IwarpError(
                    f"{self.path.name}: input {name} must be a contiguous {self.dtypes[name]}",
                    "this is a bug in the TensorRT backend",
                )
            shape = tuple(t.shape)
            if not context.set_input_shape(name, shape):
                raise IwarpError(
                    f"{self.path.name}: shape {shape} of {name} is outside the engine's "
                    "optimisation profile",
                    "rebuild with larger --max-sources / --max-batch (iwarp build)",
                )
            context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            buf = out_buffers.get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                out_buffers[name] = buf
            context.set_tensor_address(name, buf.data_ptr())
        return out_buffers

    def execute(self, stream: Any, context: Any = None) -> None:
        if not (context or self.context).execute_async_v3(stream.cuda_stream):
            raise IwarpError(f"TensorRT execution of {self.path.name} failed", "see the log")


def _torch_dtype(torch: Any, np_dtype: Any) -> Any:
    table = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.bool_): torch.bool,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int8): torch.int8,
        np.dtype(np.uint8): torch.uint8,
    }
    return table[np.dtype(np_dtype)]


class _Step:
    """A captured per-frame step: pinned inputs -> device -> engine -> device -> pinned outputs."""

    def __init__(self, backend: TensorRTBackend, engine: _Engine, host_shapes: dict[str, tuple]):
        torch = _torch()
        self.backend = backend
        self.engine = engine
        self.context = engine.new_context()  # this step's graph replays this context's state
        dev = backend.device
        self.host_in = {
            n: torch.empty(s, dtype=engine.dtypes[n], pin_memory=True)
            for n, s in host_shapes.items()
        }
        self.dev_in = {
            n: torch.empty(s, dtype=engine.dtypes[n], device=dev) for n, s in host_shapes.items()
        }
        self.graph = None
        self.host_out: dict[str, Any] = {}
        self.dev_out: dict[str, Any] = {}

    def _enqueue(self, stream: Any) -> None:
        for n, h in self.host_in.items():
            self.dev_in[n].copy_(h, non_blocking=True)
        self.engine.execute(stream, self.context)
        for n, d in self.dev_out.items():
            self.host_out[n].copy_(d, non_blocking=True)

    def run(self, fixed_inputs: dict[str, Any], host_values: dict[str, np.ndarray]) -> dict:
        """One frame: replays the captured graph, or runs eagerly (first frame / no graphs)."""
        torch = _torch()
        stream = self.backend.stream
        for n, v in host_values.items():
            self.host_in[n].numpy()[...] = v
        if self.graph is not None:
            self.graph.replay()
            stream.synchronize()
            return {n: h.numpy().copy() for n, h in self.host_out.items()}
        with torch.cuda.stream(stream):
            self.engine.bind({**fixed_inputs, **self.dev_in}, self.dev_out, self.context)
            for n, d in self.dev_out.items():
                h = self.host_out.get(n)
                if h is None or tuple(h.shape) != tuple(d.shape):
                    self.host_out[n] = torch.empty(tuple(d.shape), dtype=d.dtype, pin_memory=True)
            self._enqueue(stream)  # eager (the first one also flushes TensorRT's deferred setup)
        stream.synchronize()
        out = {n: h.numpy().copy() for n, h in self.host_out.items()}
        if self.backend.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self._enqueue(stream)
                self.graph = graph
            except RuntimeError as exc:  # capture unsupported here: stay eager, say so once
                self.backend.cuda_graphs = False
                print(f"iwarp: CUDA graph capture failed, running eagerly ({exc})", file=sys.stderr)
        return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        engines: dict[str, str | Path],
        config: ModelConfig,
        plugin_library: str | Path | None = None,
        device: str = "cuda",
        cuda_graphs: bool = True,
        description: str = "",
    ) -> None:
        from iwarp.engine_build.tensorrt_build import import_tensorrt

        torch = _torch()
        trt = import_tensorrt()
        super().__init__(config)
        if plugin_library is not None:
            from iwarp.engine_build.plugin import load_plugin

            load_plugin(plugin_library)
        self.trt = trt
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.cuda_graphs = cuda_graphs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines = {
            stage: _Engine(trt, self._runtime, Path(path), self.device)
            for stage, path in engines.items()
        }
        self._lock = threading.Lock()
        self._detect_steps: dict[tuple, _Step] = {}
        self._animate_steps: OrderedDict[tuple, tuple[_Step, dict]] = OrderedDict()
        self._description = description

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        build_dir: str | Path | None = None,
        show_progress: bool = True,
        precision: str = "fp16",
        plugin: bool | None = None,
        max_sources: int = 4,
        max_batch: int = 1,
    ) -> TensorRTBackend:
        """Engines of `checkpoint` (None: the shipped weights), built on first use and reused
        while they match this TensorRT, GPU and graph (rebuilt in the default cache folder; a
        mismatch in a `build_dir` the user gave raises CheckpointError)."""
        from iwarp.engine_build.tensorrt_build import BuildOptions, build_engines

        results = build_engines(
            BuildOptions(
                precision=precision,
                plugin=plugin,
                max_sources=max_sources,
                max_batch=max_batch,
                checkpoint=None if checkpoint is None else str(checkpoint),
                build_dir=None if build_dir is None else str(build_dir),
                rebuild=build_dir is None,
            ),
            show_progress=show_progress,
        )
        config = Config.from_dict(_checkpoint_config(checkpoint))
        anim = results[ANIMATOR_GRAPH]
        engines = {stage: _engine_path(meta) for stage, meta in results.items()}
        library = None
        if anim.get("plugin"):
            from iwarp.engine_build.plugin import find_plugin_library

            library = find_plugin_library()
        # The sidecar says which attention the build chose and why (measured table, or asked).
        attention = anim.get("attention") or (
            "IWarpAttention plugin" if anim.get("plugin") else "TensorRT attention"
        )
        desc = f"{precision}, {attention}"
        return cls(engines, config.model, library, description=desc)

    # -- stages -------------------------------------------------------------------------------
    def detect(self, images: np.ndarray) -> Pose:
        if images.shape[0] != 1:  # an avatar's photos (once): one at a time, batch-1 engine
            parts = [self.detect(images[i : i + 1]) for i in range(images.shape[0])]
            return Pose.join(parts, np.concatenate)
        engine = self.engines[KEYPOINTS_GRAPH]
        with self._lock:
            key = tuple(images.shape)
            step = self._detect_steps.get(key)
            if step is None:
                step = _Step(self, engine, {IMAGE: key})
                self._detect_steps[key] = step
            out = step.run({}, {IMAGE: images})
        return pose_of(out)

    def encode_source(self, image: np.ndarray, pose: Pose) -> dict:
        """Once per photo: eager, and the rows it returns stay on the GPU."""
        torch = _torch()
        engine = self.engines[SOURCE_ENCODER_GRAPH]
        with self._lock, torch.cuda.stream(self.stream):
            host = {IMAGE: image, **pose_feeds(pose)}
            feeds = {n: self._to_device(v, engine.dtypes[n]) for n, v in host.items()}
            outs = engine.bind(feeds, {})
            engine.execute(self.stream)
            rows = {k: outs[k].clone() for k in AVATAR_ROWS}
        self.stream.synchronize()
        return rows

    def join_sources(self, rows: list[dict]) -> dict[str, Any]:
        torch = _torch()
        anim = self.engines[ANIMATOR_GRAPH]
        with torch.cuda.stream(self.stream):
            joined = {
                k: torch.cat([r[k] for r in rows], dim=1).to(anim.dtypes[k]).contiguous()
                for k in AVATAR_ROWS
            }
            joined[KEY_MASK] = torch.ones(
                joined[KEYS].shape[:2], dtype=anim.dtypes[KEY_MASK], device=self.device
            )
        self.stream.synchronize()
        return joined

    def animate(self, avatar: AvatarFeatures, pose: Pose) -> np.ndarray:
        engine = self.engines[ANIMATOR_GRAPH]
        rows = avatar.rows
        driving = pose_feeds(pose)
        key = (
            *((n, tuple(v.shape)) for n, v in driving.items()),
            *((rows[k].data_ptr(), tuple(rows[k].shape)) for k in _ROW_KEYS),
        )
        with self._lock:
            entry = self._animate_steps.get(key)
            if entry is None:
                step = _Step(self, engine, {n: tuple(v.shape) for n, v in driving.items()})
                entry = (step, rows)  # keeps the rows alive while the graph uses them
                self._animate_steps[key] = entry
                while len(self._animate_steps) > GRAPH_CACHE:
                    self._animate_steps.popitem(last=False)
            else:
                self._animate_steps.move_to_end(key)
            fixed = {k: rows[k] for k in _ROW_KEYS}
            out = entry[0].run(fixed, driving)
        return out[IMAGE].astype(np.float32, copy=False)

    def _to_device(self, array: np.ndarray, dtype: Any) -> Any:
        torch = _torch()
        host = torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
        return host.to(self.device, dtype=dtype, non_blocking=True)

    def label(self) -> str:
        return "TensorRT"

    def describe(self) -> str:
        torch = _torch()
        gpu = torch.cuda.get_device_name(self.device)
        graphs = "CUDA graphs" if self.cuda_graphs else "eager"
        return f"tensorrt {self.trt.__version__} ({gpu}, {self._description}, {graphs})"


def _engine_path(meta: dict[str, Any]) -> Path:
    return Path(meta["engine"])


def _checkpoint_config(checkpoint: str | Path | None) -> dict[str, Any]:
    from iwarp.checkpoint import Checkpoint

    return Checkpoint(checkpoint).config.to_dict()
