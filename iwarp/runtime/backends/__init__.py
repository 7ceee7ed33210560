"""Backends, chosen by name or by `auto`; each import is lazy (TensorRT, OpenVINO may be absent)."""

from __future__ import annotations

from pathlib import Path

from iwarp.errors import IwarpError
from iwarp.runtime.backends.base import AvatarFeatures, Backend

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


def create_backend(
    name: str = "auto",
    checkpoint: str | Path | None = None,
    device: str | None = None,
    build_dir: str | Path | None = None,
    threads: int = 0,
    show_progress: bool = True,
    precision: str | None = None,
) -> Backend:
    """`auto`: TensorRT where it and a GPU are present; on the CPU the fastest installed engine
    and precision that pass the accuracy gate on this machine (`engine_choice`, measured once
    and cached); with a CUDA `device` and no TensorRT, ONNX Runtime.

    `precision`: None for each backend's default (torch, onnxruntime and openvino fp32,
    TensorRT fp16; with auto, the chosen one); onnxruntime also takes "int8" (the graphs
    `iwarp calibrate` made), openvino "bf16" and "int8", TensorRT fp32/fp16/int8.
    """
    chosen_by = ""
    if name == "auto":
        name = _auto_name(device)
        if name == "cpu":
            from iwarp.runtime.backends import engine_choice

            name, fastest, _ = engine_choice.choose(checkpoint, build_dir, threads, show_progress)
            chosen_by = (
                f"auto: the fastest engine passing the {engine_choice.MIN_PSNR_DB:g} dB gate "
                "on this CPU"
            )
            if precision is None:
                precision = fastest
            else:
                chosen_by += f", precision {precision} as asked"
    engine = _create(name, checkpoint, device, build_dir, threads, show_progress, precision)
    engine.chosen_by = chosen_by
    return engine


def _create(
    name: str,
    checkpoint: str | Path | None,
    device: str | None,
    build_dir: str | Path | None,
    threads: int,
    show_progress: bool,
    precision: str | None,
) -> Backend:
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
    if name == "openvino":
        from iwarp.runtime.backends import openvino_backend

        if not openvino_backend.available():
            raise IwarpError(
                "the openvino backend needs the openvino package", "pip install openvino"
            )
        if device is not None and device != "cpu":
            raise IwarpError(f"the openvino backend runs on the CPU, not {device}", "drop --device")
        return openvino_backend.OpenVinoBackend.from_checkpoint(
            checkpoint, build_dir, threads, show_progress, precision=precision or "fp32"
        )
    if name == "tensorrt":
        from iwarp.runtime.backends.trt_backend import TensorRTBackend

        return TensorRTBackend.from_checkpoint(
            checkpoint, build_dir, show_progress=show_progress, precision=precision or "fp16"
        )
    raise IwarpError(f"unknown backend {name!r}", f"choose one of: auto, {', '.join(BACKENDS)}")


def _auto_name(device: str | None = None) -> str:
    """ "tensorrt", "onnxruntime" (CUDA device, no TensorRT) or "cpu" (measure the CPU engines)."""
    if device == "cpu":
        return "cpu"
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            return "tensorrt"
    except ImportError:
        pass
    return "onnxruntime" if device is not None and device.startswith("cuda") else "cpu"


__all__ = ["BACKENDS", "AvatarFeatures", "Backend", "create_backend"]
