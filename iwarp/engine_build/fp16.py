"""FP16 copies of the ONNX graphs (inputs and outputs stay float32), for TensorRT's FP16
engines (`iwarp.engine_build.tensorrt_build`) and the FP16 column of `iwarp calibrate`.

NVIDIA ModelOpt AutoCast when nvidia-modelopt is importable, else onnxconverter-common's
`convert_float_to_float16`; no TensorRT needed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwarp.errors import IwarpError


@dataclass
class Fp16Result:
    path: Path
    method: str  # "modelopt-autocast" or "onnxconverter-common"


def modelopt_available() -> bool:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: F401
    except Exception:  # ImportError, or its optional dependencies missing
        return False
    quiet_lief_at_exit()
    return True


def quiet_lief_at_exit() -> None:
    """ModelOpt imports LIEF, whose nanobind bindings print thousands of "leaked ..." lines
    when the interpreter exits (harmless: the process is ending). Turn that report off."""
    import sys

    lief = sys.modules.get("lief")
    if lief is not None and hasattr(lief, "disable_leak_warning"):
        lief.disable_leak_warning()


def reference_inputs(graph_path: str | Path) -> dict[str, np.ndarray] | None:
    """`export.example_inputs` for one exported graph (batch 1, one source), from the
    metadata.json beside it; None for a graph that has none."""
    from iwarp.config import Config
    from iwarp.engine_build.export import example_inputs, load_metadata

    graph_path = Path(graph_path)
    if not (graph_path.parent / "metadata.json").is_file():
        return None
    config = Config.from_dict(load_metadata(graph_path.parent)["config"])
    return example_inputs(config, graph_path.stem, 1, 1)


def convert_fp16(src: str | Path, dst: str | Path, method: str = "auto") -> Fp16Result:
    """An FP16 copy of an ONNX graph (inputs/outputs stay float32)."""
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if method == "auto":
        method = "modelopt-autocast" if modelopt_available() else "onnxconverter-common"
    if method == "modelopt-autocast":
        import tempfile

        from modelopt.onnx.autocast import convert_to_mixed_precision

        with tempfile.TemporaryDirectory() as tmp:
            # AutoCast runs the graph once to see its value ranges; left alone it sets every
            # symbolic dim to 1, which the flow warp's animator cannot reshape (its token
            # axis is N whole sources).
            feeds = reference_inputs(src)
            inputs = Path(tmp) / "inputs.npz"
            if feeds is not None:
                np.savez(inputs, **feeds)
            model = convert_to_mixed_precision(
                str(src),
                low_precision_type="fp16",
                keep_io_types=True,
                providers=["cpu"],
                calibration_data=str(inputs) if feeds is not None else None,
            )
        # AutoCast's shape inference can give two tensors of different sizes one symbolic
        # dim (the flow warp's mass and flow slices), which ONNX Runtime then refuses at
        # run time; the types are all that the converted graph needs to carry.
        del model.graph.value_info[:]
    elif method == "onnxconverter-common":
        try:
            from onnxconverter_common import float16
        except ImportError as exc:
            raise IwarpError(
                "FP16 conversion needs nvidia-modelopt or onnxconverter-common",
                "pip install onnxconverter-common (in iwarp[tensorrt])",
            ) from exc
        with warnings.catch_warnings():  # "number ... will be truncated": expected in FP16
            warnings.simplefilter("ignore", UserWarning)
            model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    else:
        raise IwarpError(
            f"unknown FP16 method {method!r}", "auto, modelopt-autocast or onnxconverter-common"
        )
    onnx.checker.check_model(model)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)
    return Fp16Result(dst, method)
