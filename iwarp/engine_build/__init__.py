"""Engine builds: ONNX export (this package's `export`), later FP16/INT8 and TensorRT."""

from iwarp.engine_build.export import (
    ATTENTION_NODE,
    ATTENTION_SCOPE,
    DEFAULT_OPSET,
    GRAPHS,
    check_build,
    export_onnx,
    graph_path,
    load_metadata,
)

__all__ = [
    "ATTENTION_NODE",
    "ATTENTION_SCOPE",
    "DEFAULT_OPSET",
    "GRAPHS",
    "check_build",
    "export_onnx",
    "graph_path",
    "load_metadata",
]
