"""The `iwarp` command: dispatch only. Each subcommand's options are the fields of one
dataclass next to the function that runs it (iwarp.options builds argparse from it, and the
dataclass back from the parsed arguments); `main` imports that function and hands it the
dataclass. Nothing here builds a report or prints a result: the command's own package does.

User mistakes (IwarpError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from iwarp import __version__
from iwarp.errors import IwarpError
from iwarp.options import CommandParser, from_args


def _declared(where: str) -> Callable[[], Any]:
    """'module:name' -> a function importing it (when its subcommand is parsed or runs)."""
    module, _, name = where.partition(":")
    return lambda: getattr(importlib.import_module(module), name)


# name: (help, its options dataclass, the function that runs it), as "module:name": imported
# only when that subcommand runs. The dataclass declares every option (iwarp.options); the
# function takes it and returns the exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": (
        "parameters and GFLOP of a config",
        "iwarp.model.stats:InfoOptions",
        "iwarp.model.stats:run_info",
    ),
    "train": (
        "train the network on a folder of clips",
        "iwarp.train.trainer:TrainOptions",
        "iwarp.train.trainer:run_train",
    ),
    "train-expression": (
        "train the expression encoder alone on the clips' landmarks (minutes on a CPU)",
        "iwarp.train.expression_reader:ReaderOptions",
        "iwarp.train.expression_reader:run_train_expression",
    ),
    "animate": (
        "animate source photo(s) with a driving video",
        "iwarp.offline:AnimateOptions",
        "iwarp.offline:run_animate",
    ),
    "bench": (
        "per-stage latency of the runtime on real frames",
        "iwarp.runtime.benchmark:BenchOptions",
        "iwarp.runtime.benchmark:run_bench",
    ),
    "bench-webrtc": (
        "round trip, fps and drops of a running iwarp serve, from 1..N WebRTC clients",
        "iwarp.benchmarks.webrtc:WebrtcOptions",
        "iwarp.benchmarks.webrtc:run_options",
    ),
    "eval": (
        "quality metrics on real clips, with baselines",
        "iwarp.evaluation.protocol:EvalOptions",
        "iwarp.evaluation.command:run_eval",
    ),
    "cam": (
        "the avatar as a camera for call apps (virtual camera)",
        "iwarp.cam.app:CamSettings",
        "iwarp.cam.app:cam_command",
    ),
    "export": (
        "export the ONNX graphs (keypoints, sources, animator)",
        "iwarp.engine_build.export:ExportOptions",
        "iwarp.engine_build.export:run_export",
    ),
    "calibrate": (
        "INT8/FP8 quantization of the graphs from real frames",
        "iwarp.calibration.pipeline:CalibrationConfig",
        "iwarp.calibration.pipeline:run_calibrate",
    ),
    "serve": (
        "WebRTC server: webcam in, animated avatar out",
        "iwarp.streaming.server:ServeOptions",
        "iwarp.streaming.server:serve",
    ),
    "build": (
        "TensorRT engines (GPU, TensorRT 11)",
        "iwarp.engine_build.tensorrt_build:BuildOptions",
        "iwarp.engine_build.tensorrt_build:run_build",
    ),
    "build-plugin": (
        "compile the attention kernel and plugin",
        "iwarp.engine_build.plugin:BuildPluginOptions",
        "iwarp.engine_build.plugin:run_build_plugin",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwarp", description="Real-time avatar animation with implicit warping."
    )
    parser.add_argument("--version", action="version", version=f"iwarp {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for name, (help_text, declared_in, runs) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, declare=_declared(declared_in))
        p.set_defaults(declared_in=declared_in, runs=runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = from_args(_declared(args.declared_in)(), args)  # imported by the parse
    try:
        return _declared(args.runs)()(options)
    except IwarpError as exc:
        print(f"iwarp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iwarp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
