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
from iwarp.graphs import TOKENS


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


def reference_inputs(graph_path: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs for one exported graph: batch 1, and one source's tokens (the export's
    metadata.json beside it says how many; 1 without it). Images and pixel rows in [0, 1]."""
    import json

    import onnx

    graph_path = Path(graph_path)
    meta_file = graph_path.with_name("metadata.json")
    tokens = json.loads(meta_file.read_text())["tokens_per_source"] if meta_file.is_file() else 1
    model = onnx.load(str(graph_path), load_external_data=False)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (tokens if d.dim_param == TOKENS else 1)
            for d in tensor.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = (
            np.ones(shape, dtype) if dtype == np.bool_ else rng.uniform(size=shape).astype(dtype)
        )
    return feeds


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
            inputs = Path(tmp) / "inputs.npz"
            np.savez(inputs, **reference_inputs(src))
            model = convert_to_mixed_precision(
                str(src),
                low_precision_type="fp16",
                keep_io_types=True,
                providers=["cpu"],
                calibration_data=str(inputs),
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
