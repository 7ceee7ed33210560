"""Flush-to-zero / denormals-are-zero for every CPU engine the runtime uses.

Why: the attention's softmax is very peaked (on real frames a row of logits spans ~135, and
1-2 % of the shipped model's probabilities fall below 1.2e-38, the smallest normal float).
Intel cores take a slow microcode path on every subnormal operand or result: on a Sapphire
Rapids-class Xeon the ONNX Runtime animator ran 41 ms instead of 26 (1 source) and 162 instead
of 44 (3 sources) until subnormals were flushed (DESIGN.md). With FTZ (a result that would be
subnormal becomes 0) and DAZ (a subnormal input reads as 0) every probability is either 0 or
normal; an output moves by at most (tokens x 1.2e-38) x |value|, i.e. not at all in float32.

Clamping the logits inside the model instead (probabilities below exp(-C) x max set to 0) was
measured and is not cheap: it needs the logits outside the fused attention kernels, which made
the ONNX Runtime attention 1.4x (1 source) to 1.6x (3 sources) slower and torch's 7-70 %, so
the exported graph keeps its one fused `Attention` node and the engines flush instead:

- ONNX Runtime: the session option `session.set_denormal_as_zero` (its pool threads);
- OpenVINO: the CPU property `CPU_DENORMALS_OPTIMIZATION` (its pool threads);
- torch: `torch.set_flush_denormal` sets only the calling thread's MXCSR, and torch's OpenMP
  workers keep their own; `flush_denormals_torch` also sets them (see there);
- and in all three the thread that calls the engine, which runs a share of the work: each
  backend stage calls `flush_denormals_here()` (once per thread, then a flag check).

FTZ/DAZ are per-thread CPU state (x86 MXCSR). Setting them on a thread also applies to numpy
code that runs on it afterwards; for this application a value below 1.2e-38 is 0 anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
import warnings
from pathlib import Path

_FTZ = 1 << 15  # MXCSR flush-to-zero
_DAZ = 1 << 6  # MXCSR denormals-are-zero
_FENV_SIZE = 32  # glibc x86-64 fenv_t: x87 environment (28 bytes), then MXCSR
_MXCSR_OFFSET = 28

_local = threading.local()


def _libm() -> ctypes.CDLL | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name or "libm.so.6")
        lib.fegetenv.argtypes = lib.fesetenv.argtypes = [ctypes.c_void_p]
        return lib
    except (OSError, AttributeError):
        return None


_LIBM = _libm()


def _numpy_limits_first() -> None:
    """numpy computes (and caches) each float type's limits on first use, and warns when the
    smallest subnormal reads as 0, as it does on a flushing thread: compute them now, when
    this module is imported, before anything flushes."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for dtype in (np.float16, np.float32, np.float64, np.longdouble):
            str(np.finfo(dtype))  # every limit, with the lazily made strings


_numpy_limits_first()


def _mxcsr() -> int | None:
    if _LIBM is None:
        return None
    env = (ctypes.c_uint8 * _FENV_SIZE)()
    if _LIBM.fegetenv(env) != 0:
        return None
    return int.from_bytes(bytes(env[_MXCSR_OFFSET : _MXCSR_OFFSET + 4]), "little")


def thread_flushes_denormals() -> bool:
    """Whether FTZ and DAZ are both on for the calling thread (False off x86-64 glibc)."""
    value = _mxcsr()
    return value is not None and value & (_FTZ | _DAZ) == (_FTZ | _DAZ)


def _set_here() -> bool:
    """Turns FTZ and DAZ on for the calling thread through glibc's fenv (torch-free)."""
    if _LIBM is None:
        return False
    env = (ctypes.c_uint8 * _FENV_SIZE)()
    if _LIBM.fegetenv(env) != 0:
        return False
    value = int.from_bytes(bytes(env[_MXCSR_OFFSET : _MXCSR_OFFSET + 4]), "little")
    env[_MXCSR_OFFSET : _MXCSR_OFFSET + 4] = (value | _FTZ | _DAZ).to_bytes(4, "little")
    return _LIBM.fesetenv(env) == 0 and thread_flushes_denormals()


def flush_denormals_here() -> bool:
    """FTZ + DAZ on the calling thread; after the first call on a thread only a flag check.
    Returns whether the thread flushes."""
    done = getattr(_local, "flushes", None)
    if done is None:
        done = _local.flushes = _set_here()
    return done


def flush_denormals_torch() -> bool:
    """FTZ + DAZ for torch's CPU work started from the calling thread; True when it flushes.

    `torch.set_flush_denormal(True)` sets the calling thread only. libgomp keeps one pool of
    worker threads per thread that opens parallel regions; workers created later copy the
    creator's MXCSR, but existing ones keep theirs (measured: half of a parallel product of
    subnormals stayed nonzero on 2 threads). So one OpenMP region is run on torch's own libgomp
    whose body sets FTZ + DAZ on every member of this thread's team. Once per thread.
    """
    if getattr(_local, "torch_flushes", False):
        return True
    import torch

    torch.set_flush_denormal(True)
    flush_denormals_here()
    threads = torch.get_num_threads()
    if threads > 1 and not torch_flushes_denormals():
        _run_on_openmp_team(threads)
    _local.torch_flushes = ok = torch_flushes_denormals()
    return ok


def _run_on_openmp_team(threads: int) -> None:
    import torch

    libs = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    libs += sorted((Path(torch.__file__).parent.parent / "torch.libs").glob("libgomp*.so*"))
    if not libs:
        return  # another OpenMP runtime: nothing portable to call
    try:
        gomp = ctypes.CDLL(str(libs[0]))
        body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        gomp.GOMP_parallel.argtypes = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel.restype = None
    except (OSError, AttributeError):
        return
    # ctypes releases the GIL for the call; each team member takes it to run the body.
    body = body_type(lambda _: _set_here() and None)
    gomp.GOMP_parallel(body, None, threads, 0)


def torch_flushes_denormals() -> bool:
    """A real check: a parallel elementwise product whose every result is subnormal comes out
    all zero only if every thread of torch's team flushes."""
    import torch

    threads = max(1, torch.get_num_threads())
    tiny = torch.full((65536 * 2 * threads,), 1e-30)
    with torch.inference_mode():
        return int(torch.count_nonzero(tiny * 1e-10)) == 0


def openvino_config() -> dict[str, object]:
    """The OpenVINO CPU property that sets FTZ + DAZ on its worker threads."""
    return {"CPU_DENORMALS_OPTIMIZATION": True}


def ort_config_entries() -> dict[str, str]:
    """ONNX Runtime session config entries that set FTZ + DAZ on its pool threads."""
    return {"session.set_denormal_as_zero": "1"}


def status() -> str:
    """One line for reports: does this thread flush?"""
    return "FTZ+DAZ" if thread_flushes_denormals() else "subnormals kept"


__all__ = [
    "flush_denormals_here",
    "flush_denormals_torch",
    "openvino_config",
    "ort_config_entries",
    "status",
    "thread_flushes_denormals",
    "torch_flushes_denormals",
]
