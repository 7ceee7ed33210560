"""The fused CUDA attention kernel as `torch.ops.iwarp.attention`, built on first use.

    from iwarp.model import fused_attention
    if fused_attention.load():                      # compiles once (torch.utils.cpp_extension)
        out = fused_attention.attention(q, k, v, mask)   # == iwarp.model.warp.attention

The sources are plugins/torch/iwarp_attention_op.cpp and plugins/kernels/iwarp_attention.cu of
the source checkout (an editable install), or the folder in $IWARP_PLUGIN_SOURCE. Building needs
a CUDA build of PyTorch, nvcc of a matching CUDA major version and a host compiler; the build is
cached under $IWARP_CACHE/torch_ext (see iwarp.paths.user_cache_dir, duplicated here because the
model package imports nothing of iwarp but config).

Which one runs (`choose`): the fused kernel only where a device measurement found it faster
than PyTorch's SDPA for that GPU, dtype and shape. The measurements are a small JSON table
(`iwarp/assets/attention_dispatch.json`, or $IWARP_ATTENTION_TABLE) that `bench/device_check.sh`
writes; the shipped table is empty, so SDPA runs until a GPU has been measured.
$IWARP_ATTENTION=fused|sdpa overrides the table (`forced()` does so in code). Every choice is
logged once per shape and listed by `describe()`. The TensorRT build uses the same table to
decide whether the animator gets the IWarpAttention plugin (`iwarp.engine_build.tensorrt_build`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iwarp.paths import ASSETS_DIR, user_cache_dir

log = logging.getLogger(__name__)

TABLE_FORMAT = "iwarp-attention-dispatch/1"
TABLE_ENV = "IWARP_ATTENTION_TABLE"
MODE_ENV = "IWARP_ATTENTION"
BACKENDS = ("fused", "sdpa")
# A measured entry stands for shapes within this factor of its query and key counts.
NEAREST_FACTOR = 2.0

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class FusedAttentionUnavailable(RuntimeError):
    """The op cannot be built or loaded here (no CUDA, no nvcc, no sources)."""


def source_dir() -> Path:
    """plugins/ of the checkout (or $IWARP_PLUGIN_SOURCE)."""
    env = os.environ.get("IWARP_PLUGIN_SOURCE")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "plugins"
    if not (root / "torch" / "iwarp_attention_op.cpp").is_file():
        raise FusedAttentionUnavailable(
            f"the kernel sources are not at {root} (an installed wheel has no plugins/ folder): "
            "use a source checkout (pip install -e .) or set IWARP_PLUGIN_SOURCE=<checkout>/plugins"
        )
    return root


def _build_dir() -> Path:
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none')}"
    path = user_cache_dir() / "torch_ext" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_loaded() -> bool:
    try:
        return hasattr(torch.ops.iwarp, "attention")
    except (AttributeError, RuntimeError):
        return False


def load(verbose: bool = False, raise_errors: bool = False) -> bool:
    """Builds (once) and loads the op; False (or FusedAttentionUnavailable) when it cannot."""
    with _LOCK:
        if is_loaded():
            return True
        if "error" in _STATE and not raise_errors:
            return False
        try:
            if torch.version.cuda is None or not torch.cuda.is_available():
                raise FusedAttentionUnavailable("PyTorch has no CUDA device here")
            from torch.utils.cpp_extension import CUDA_HOME
            from torch.utils.cpp_extension import load as load_ext

            if CUDA_HOME is None:
                raise FusedAttentionUnavailable("no CUDA toolkit (nvcc) found: set CUDA_HOME")
            src = source_dir()
            major, minor = torch.cuda.get_device_capability()
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
            load_ext(
                name="iwarp_attention_op",
                sources=[
                    str(src / "torch" / "iwarp_attention_op.cpp"),
                    str(src / "kernels" / "iwarp_attention.cu"),
                ],
                extra_include_paths=[str(src / "kernels")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
                build_directory=str(_build_dir()),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:
            _STATE["error"] = exc
            if raise_errors:
                if isinstance(exc, FusedAttentionUnavailable):
                    raise
                raise FusedAttentionUnavailable(
                    f"building the iwarp attention op failed: {exc}"
                ) from exc
            return False
        _STATE.pop("error", None)
        return is_loaded()


def attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float = 0.0,
    kernel: int = 0,
) -> torch.Tensor:
    """Same contract as iwarp.model.warp.attention, one fused kernel (CUDA tensors).
    kernel: 0 auto (tensor cores for float16/bfloat16 on sm_80+), 1 SIMT, 2 tensor cores."""
    return torch.ops.iwarp.attention(queries, keys, values, mask, scale, kernel)


def attention_out(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    scale: float = 0.0,
    kernel: int = 0,
) -> torch.Tensor:
    """`attention` into a preallocated (B, Nq, dv) tensor (CUDA-graph friendly, testable)."""
    return torch.ops.iwarp.attention_out(queries, keys, values, mask, scale, out, kernel)


KERNEL_NAMES = {1: "SIMT (CUDA cores)", 2: "tensor cores (mma.sync)", -1: "none"}


def kernel_name(queries: torch.Tensor, values: torch.Tensor, kernel: int = 0) -> str:
    """Which kernel of the op runs this q/v shape and dtype on this GPU."""
    return KERNEL_NAMES.get(int(torch.ops.iwarp.selected_kernel(queries, values, kernel)), "?")


# --------------------------------------------------------------------------- fused or SDPA


@dataclass(frozen=True)
class Choice:
    """Which attention runs a shape, and why (for logs and `describe`)."""

    backend: str  # "fused" or "sdpa"
    reason: str


def default_table_path() -> Path:
    return ASSETS_DIR / "attention_dispatch.json"


def table_path() -> Path:
    env = os.environ.get(TABLE_ENV)
    return Path(env) if env else default_table_path()


_TABLE_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}


def load_table(path: str | Path | None = None) -> dict[str, Any]:
    """The dispatch table (empty entries when the file is missing or unreadable: SDPA)."""
    p = Path(path) if path else table_path()
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return {"format": TABLE_FORMAT, "entries": [], "error": f"{p} does not exist"}
    cached = _TABLE_CACHE.get(str(p))
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        table = json.loads(p.read_text())
        if table.get("format") != TABLE_FORMAT or not isinstance(table.get("entries"), list):
            raise ValueError(f"not an {TABLE_FORMAT} table")
    except (OSError, ValueError) as exc:
        table = {"format": TABLE_FORMAT, "entries": [], "error": f"{p}: {exc}"}
    _TABLE_CACHE[str(p)] = (mtime, table)
    return table


def make_entry(
    gpu: str,
    dtype: str,
    batch: int,
    queries: int,
    keys: int,
    head_dim: int,
    value_dim: int,
    fused_ms: float | None,
    sdpa_ms: float | None,
) -> dict[str, Any]:
    """One measured row of the table; `choice` is the faster (SDPA when fused failed)."""
    fused_ok = fused_ms is not None and math.isfinite(fused_ms)
    sdpa_ok = sdpa_ms is not None and math.isfinite(sdpa_ms)
    faster = fused_ok and (not sdpa_ok or fused_ms < sdpa_ms)
    return {
        "gpu": gpu,
        "dtype": dtype,
        "batch": batch,
        "queries": queries,
        "keys": keys,
        "head_dim": head_dim,
        "value_dim": value_dim,
        "fused_ms": fused_ms,
        "sdpa_ms": sdpa_ms,
        "choice": "fused" if faster else "sdpa",
    }


def choose(
    gpu: str,
    dtype: str,
    batch: int,
    queries: int,
    keys: int,
    head_dim: int,
    value_dim: int,
    table: dict[str, Any] | None = None,
) -> Choice:
    """The measured choice for a shape: the entry of this GPU, dtype and widths nearest in
    (queries, keys) within NEAREST_FACTOR; SDPA when there is none."""
    mode = _FORCED.get("mode") or os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode in BACKENDS:
        return Choice(mode, f"forced ({MODE_ENV}={mode})")
    table = table if table is not None else load_table()
    best, best_dist = None, math.inf
    for e in table.get("entries", []):
        if (e.get("gpu"), e.get("dtype"), e.get("head_dim"), e.get("value_dim")) != (
            gpu,
            dtype,
            head_dim,
            value_dim,
        ):
            continue
        dist = abs(math.log2(max(queries, 1) / max(int(e["queries"]), 1))) + abs(
            math.log2(max(keys, 1) / max(int(e["keys"]), 1))
        )
        if int(e.get("batch", 1)) != batch:
            dist += 0.5  # another batch size: a weaker match
        if dist < best_dist:
            best, best_dist = e, dist
    shape = f"{dtype} B={batch} Nq={queries} Nk={keys} d={head_dim} dv={value_dim}"
    if best is None or best_dist > math.log2(NEAREST_FACTOR):
        why = table.get("error") or "no device measurement"
        return Choice("sdpa", f"SDPA for {shape} on {gpu}: {why} (the default until measured)")
    backend = best["choice"] if best["choice"] in BACKENDS else "sdpa"
    return Choice(
        backend,
        f"{'fused kernel' if backend == 'fused' else 'SDPA'} for {shape} on {gpu}: measured "
        f"fused {best.get('fused_ms')} ms vs SDPA {best.get('sdpa_ms')} ms at "
        f"Nq={best['queries']} Nk={best['keys']}",
    )


_FORCED: dict[str, str] = {}
_CHOICES: dict[tuple, Choice] = {}


@contextlib.contextmanager
def forced(backend: str | None) -> Iterator[None]:
    """Runs the block with `backend` ("fused", "sdpa"; None: the table) for every shape."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, not {backend!r}")
    old = _FORCED.get("mode")
    _FORCED.pop("mode", None)
    if backend is not None:
        _FORCED["mode"] = backend
    _CHOICES.clear()
    try:
        yield
    finally:
        _FORCED.pop("mode", None)
        if old is not None:
            _FORCED["mode"] = old
        _CHOICES.clear()


def choose_for(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> Choice:
    """`choose` for CUDA tensors (cached per shape, logged once per shape)."""
    key = (
        queries.device.index,
        queries.dtype,
        *queries.shape,
        keys.shape[1],
        values.shape[2],
    )
    choice = _CHOICES.get(key)
    if choice is None:
        gpu = torch.cuda.get_device_name(queries.device)
        dtype = str(queries.dtype).removeprefix("torch.")
        b, nq, d = queries.shape
        choice = choose(gpu, dtype, b, nq, keys.shape[1], d, values.shape[2])
        _CHOICES[key] = choice
        log.info("iwarp attention: %s", choice.reason)
    return choice


def describe() -> str:
    """The attention choices made in this process so far, one per line."""
    if not _CHOICES:
        return "attention: no CUDA attention has run yet"
    return "\n".join(f"attention: {c.reason}" for c in _CHOICES.values())


def attention_widths(model: Any, num_sources: int = 1) -> tuple[int, int]:
    """(d, dv') of a ModelConfig's attention call for an avatar of `num_sources` photos: keys
    are d wide; V' = [V | P | C | K] holds the values, the mean colours (residual branch), 3
    coordinate columns per source (flow warp) and the keys (residual branch), as
    `iwarp.model.warp.ImplicitWarp._attend` concatenates them."""
    dv = model.value_dim
    if model.flow_warp:
        dv += 3 * num_sources
    if model.residual_branch:
        dv += 3 + model.attn_dim
    return model.attn_dim, dv
