"""The fused CUDA attention kernel as `torch.ops.iwarp.attention`, built on first use.

    from iwarp.model import fused_attention
    if fused_attention.load():                      # compiles once (torch.utils.cpp_extension)
        out = fused_attention.attention(q, k, v, mask)   # == iwarp.model.warp.attention

The sources are plugins/torch/iwarp_attention_op.cpp and plugins/kernels/iwarp_attention.cu of
the source checkout (an editable install), or the folder in $IWARP_PLUGIN_SOURCE. Building needs
a CUDA build of PyTorch, nvcc of a matching CUDA major version and a host compiler; the build is
cached under $IWARP_CACHE/torch_ext (see iwarp.paths.user_cache_dir, duplicated here because the
model package imports nothing of iwarp but config).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

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
    base = os.environ.get("IWARP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "iwarp"
    )
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none')}"
    path = Path(base) / "torch_ext" / tag
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
) -> torch.Tensor:
    """Same contract as iwarp.model.warp.attention, one fused kernel (CUDA tensors)."""
    return torch.ops.iwarp.attention(queries, keys, values, mask, scale)


def attention_out(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    scale: float = 0.0,
) -> torch.Tensor:
    """`attention` into a preallocated (B, Nq, dv) tensor (CUDA-graph friendly, testable)."""
    return torch.ops.iwarp.attention_out(queries, keys, values, mask, scale, out)
