"""Where a checkpoint's exported ONNX graphs are, exported on first use: for every backend that
runs the graphs on the CPU (ONNX Runtime, OpenVINO). Torch-free."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from iwarp.config import Config
from iwarp.errors import CheckpointError


def read_config(checkpoint: Path) -> Config:
    """The checkpoint's config from its header only (the weights are not needed here)."""
    from safetensors import safe_open

    from iwarp.checkpoint import Checkpoint

    try:
        with safe_open(str(checkpoint), framework="np") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = {}
    if "config" not in meta:
        return Checkpoint(checkpoint).config  # raises the right CheckpointError
    return Config.from_json(meta["config"])


def default_build_dir(checkpoint: str | Path | None = None) -> Path:
    """The cache folder of a checkpoint's graphs (one per checkpoint sha256)."""
    from iwarp.checkpoint import file_sha256
    from iwarp.paths import DEFAULT_CHECKPOINT, user_cache_dir

    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    return user_cache_dir() / "onnx" / file_sha256(path)[:16]


def prepared_graphs(
    checkpoint: str | Path | None = None,
    build_dir: str | Path | None = None,
    precision: str = "fp32",
    show_progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """(folder, metadata) of the graphs of `checkpoint` (None: the shipped weights).

    In the default cache folder stale graphs are re-exported; in a `build_dir` the user
    gave, graphs from another checkpoint or config raise CheckpointError. A precision other
    than fp32 names the quantized graphs in `<build_dir>/<precision>/`, which
    `iwarp calibrate --out <build_dir>` writes (never made here: they need calibration).
    """
    from iwarp.checkpoint import file_sha256
    from iwarp.engine_build.export import METADATA, check_build, export_onnx, load_metadata
    from iwarp.paths import DEFAULT_CHECKPOINT, user_cache_dir

    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    config = read_config(path)
    sha = file_sha256(path)
    out = Path(build_dir) if build_dir else user_cache_dir() / "onnx" / sha[:16]
    if precision != "fp32":
        folder = out / precision
        problems = check_build(folder, sha, config)
        if problems:
            raise CheckpointError(
                f"no usable {precision} graphs for {path} in {folder}: {'; '.join(problems)}",
                f"make them with 'iwarp calibrate --data CLIPS --checkpoint {path} --out {out}'",
            )
        return folder, load_metadata(folder)
    if (out / METADATA).is_file():
        problems = check_build(out, sha, config)
        if not problems:
            return out, load_metadata(out)
        if build_dir is not None:
            raise CheckpointError(
                f"ONNX graphs in {out} do not match {path}: {'; '.join(problems)}",
                f"re-run 'iwarp export --checkpoint {path} --out {out}', "
                "or use another build folder",
            )
        if show_progress:
            print(f"iwarp: re-exporting {out} ({'; '.join(problems)})", file=sys.stderr)
    return out, export_onnx(path, out, show_progress=show_progress)
