"""Backends, chosen by name or by model file type; each import is lazy (TensorRT may be absent)."""

from __future__ import annotations

from pathlib import Path

from iwarp.errors import IwarpError
from iwarp.runtime.backends.base import AvatarFeatures, Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def create_backend(
    name: str = "auto",
    checkpoint: str | Path | None = None,
    device: str | None = None,
    build_dir: str | Path | None = None,
    threads: int = 0,
    show_progress: bool = True,
    precision: str | None = None,
) -> Backend:
    """`auto`: TensorRT where it and a GPU are present, else ONNX Runtime, else torch.

    `precision`: None for each backend's default (torch and onnxruntime fp32, TensorRT fp16);
    onnxruntime also takes "int8" (the graphs `iwarp calibrate` made), TensorRT fp32/fp16/int8.
    """
    if name == "auto":
        name = _auto_name()
    if name == "torch":
        from iwarp.runtime.backends.torch_backend import TorchBackend

        if precision not in (None, "fp32"):
            raise IwarpError(
                f"the torch backend runs fp32 only, not {precision}",
                "use --backend onnxruntime or tensorrt for other precisions",
            )
        return TorchBackend(checkpoint, device, threads)
    if name == "onnxruntime":
        from iwarp.runtime.backends.ort_backend import OrtBackend

        return OrtBackend.from_checkpoint(
            checkpoint, build_dir, device, threads, show_progress, precision=precision or "fp32"
        )
    if name == "tensorrt":
        from iwarp.runtime.backends.trt_backend import TensorRTBackend

        return TensorRTBackend.from_checkpoint(
            checkpoint, build_dir, show_progress=show_progress, precision=precision or "fp16"
        )
    raise IwarpError(f"unknown backend {name!r}", f"choose one of: auto, {', '.join(BACKENDS)}")


def _auto_name() -> str:
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            return "tensorrt"
    except ImportError:
        pass
    try:
        import onnxruntime  # noqa: F401

        return "onnxruntime"
    except ImportError:
        return "torch"


__all__ = ["BACKENDS", "AvatarFeatures", "Backend", "create_backend"]
