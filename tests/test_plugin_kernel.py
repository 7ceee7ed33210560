"""The fused attention kernel (plugins/kernels): it compiles, and its source computes the math.

* `nvcc` / CMake: the kernels-only build compiles for one architecture (skipped without nvcc).
* CPU emulation: the same .cu file is compiled by g++ with -DIWARP_CPU_EMULATION
  (plugins/kernels/cuda_cpu_emulation.h: one std::thread per CUDA thread, barriers, warp
  shuffles, NaN-filled shared memory) and run on small shapes against the NumPy reference, in a
  child process with a timeout (a barrier bug would hang, not fail).
* The NumPy reference itself is checked against the PyTorch `attention()` of the network.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "plugins" / "kernels"
KERNEL_SRC = KERNEL_DIR / "iwarp_attention.cu"

if str(REPO) not in sys.path:  # the child process runs this file as a script
    sys.path.insert(0, str(REPO))

from iwarp.engine_build.rewrite import attention_reference  # noqa: E402


class AttentionParams(ctypes.Structure):
    """Mirror of `iwarp_attention_params` (plugins/kernels/iwarp_attention.h)."""

    _fields_ = [
        ("batch", ctypes.c_int),
        ("num_queries", ctypes.c_int),
        ("num_keys", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("value_dim", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int),
        ("mask_type", ctypes.c_int),
        ("mask_broadcast", ctypes.c_int),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("num_splits", ctypes.c_int),
        ("kernel", ctypes.c_int),  # iwarp_kernel: 0 auto (the emulation has SIMT only)
    ]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def run_emulated(lib_path: str, case: dict) -> np.ndarray:
    """Runs the emulated kernel in this process (called in the child)."""
    lib = ctypes.CDLL(lib_path)
    lib.iwarp_attention_forward.restype = ctypes.c_int
    lib.iwarp_attention_workspace_size.restype = ctypes.c_size_t
    lib.iwarp_attention_choose_splits.restype = ctypes.c_int
    lib.iwarp_emulation_set_device(int(case.get("sm_count", 4)), 227 * 1024)
    # Compute capability 8 lets the tensor-core kernel run (the emulation rebuilds each mma).
    lib.iwarp_emulation_set_compute_capability(int(case.get("cc", 0)))
    q, k, v = case["q"], case["k"], case["v"]
    mask = case.get("mask")
    b, nq, d = q.shape
    nk, dv = v.shape[1], v.shape[2]
    bf16 = bool(case.get("bf16", False))  # q/k/v hold bfloat16 bits (uint16)
    dtype_code = 2 if bf16 else 1 if q.dtype == np.float16 else 0
    out = np.full((b, nq, dv), np.nan, dtype=q.dtype)  # every element must be written
    if bf16:
        out = np.full((b, nq, dv), 0x7FC0, dtype=np.uint16)  # bfloat16 NaN
    splits = int(case.get("num_splits", 0))
    if splits == 0:
        splits = lib.iwarp_attention_choose_splits(b, nq, nk, dv, int(case.get("sm_count", 4)))
    ws_bytes = lib.iwarp_attention_workspace_size(b, nq, dv, max(splits, 1))
    ws = np.full(max(ws_bytes // 4, 1), np.nan, dtype=np.float32)
    if mask is None:
        mask_type = 0
    elif mask.dtype == np.bool_ or mask.dtype == np.uint8:
        mask_type = 2
        mask = np.ascontiguousarray(mask.astype(np.uint8))
    else:
        mask_type = 1
        mask = np.ascontiguousarray(mask.astype(np.float32))
    p = AttentionParams(
        batch=b,
        num_queries=nq,
        num_keys=nk,
        head_dim=d,
        value_dim=dv,
        scale=float(case.get("scale", 0.0)),
        dtype=dtype_code,
        mask_type=mask_type,
        mask_broadcast=int(mask is not None and mask.shape[0] == 1 and b > 1),
        q=_ptr(q),
        k=_ptr(k),
        v=_ptr(v),
        mask=_ptr(mask),
        out=_ptr(out),
        workspace=_ptr(ws),
        workspace_bytes=ws_bytes,
        num_splits=splits,
        kernel=int(case.get("kernel", 0)),
    )
    err = lib.iwarp_attention_forward(ctypes.byref(p), None)
    if err != 0:
        raise RuntimeError(f"iwarp_attention_forward returned {err}")
    return out


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the CPU emulation of the kernel")
    out = tmp_path_factory.mktemp("emu") / "libiwarp_attention_emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas",
        "-fno-strict-aliasing",  # half pairs are read as 32-bit words, as on the GPU
        "-DIWARP_CPU_EMULATION",
        "-x",
        "c++",
        "-shared",
        "-fPIC",
        "-pthread",
        str(KERNEL_SRC),
        "-o",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "c++20" in result.stderr:
        pytest.skip(f"{cxx} lacks C++20 (std::barrier): {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _run_in_child(lib: Path, tmp_path: Path, case: dict) -> np.ndarray:
    case_file = tmp_path / "case.npz"
    out_file = tmp_path / "out.npy"
    arrays = {k: v for k, v in case.items() if isinstance(v, np.ndarray)}
    scalars = {k: np.asarray(v) for k, v in case.items() if not isinstance(v, np.ndarray)}
    np.savez(case_file, **arrays, **scalars)
    result = subprocess.run(
        [sys.executable, __file__, "--run-emulated", str(lib), str(case_file), str(out_file)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out_file)


def _make_case(rng, b, nq, sources, tokens, extra, d, dv, dtype, masked, fully_masked_row=False):
    nk = sources * tokens + extra
    q = rng.standard_normal((b, nq, d)).astype(np.float32)
    k = rng.standard_normal((b, nk, d)).astype(np.float32)
    v = rng.standard_normal((b, nk, dv)).astype(np.float32)
    mask = np.ones((b, nk), dtype=bool)
    if masked:
        mask[:, : sources * tokens] = rng.random((b, sources * tokens)) >= 0.3  # dropped tokens
    if fully_masked_row:
        mask[-1] = False
    return {
        "q": q.astype(dtype),
        "k": k.astype(dtype),
        "v": v.astype(dtype),
        "mask": mask,
    }


CASES = [
    # (b, nq, sources, tokens, extra, d, dv, dtype, masked, splits, sm_count)
    (2, 40, 1, 24, 8, 16, 35, np.float32, False, 1, 4),
    (2, 40, 2, 24, 8, 16, 35, np.float32, True, 0, 64),
    (1, 37, 4, 24, 8, 13, 131, np.float32, True, 3, 4),
    (1, 20, 4, 30, 5, 64, 300, np.float32, True, 0, 64),
    (2, 33, 2, 24, 8, 24, 67, np.float16, True, 2, 4),
    (1, 16, 1, 40, 0, 8, 515, np.float16, False, 1, 4),
]


@pytest.mark.parametrize(
    "b,nq,sources,tokens,extra,d,dv,dtype,masked,splits,sm", CASES, ids=[str(i) for i in CASES]
)
def test_emulated_kernel_matches_reference(
    emulated_lib, tmp_path, b, nq, sources, tokens, extra, d, dv, dtype, masked, splits, sm
):
    rng = np.random.default_rng(hash((b, nq, sources, d, dv)) & 0xFFFF)
    case = _make_case(rng, b, nq, sources, tokens, extra, d, dv, dtype, masked)
    case.update(num_splits=splits, sm_count=sm)
    out = _run_in_child(emulated_lib, tmp_path, case)
    assert np.isfinite(out.astype(np.float32)).all(), "an output element was not written"
    ref = attention_reference(case["q"], case["k"], case["v"], case["mask"])
    err = np.abs(out.astype(np.float64) - ref).max() / (np.abs(ref).max() + 1e-12)
    tol = 1e-5 if dtype == np.float32 else 3e-3
    assert err < tol, f"relative error {err:.2e} (tolerance {tol})"


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, as __float2bfloat16_rn."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


TC_CASES = [
    # (b, nq, sources, tokens, extra, d, dv, dtype, splits, poison): the tensor-core kernel;
    # nq and Nk off the 64-row / 32-key tiles, d padded to 16, value widths that need one to
    # three column blocks, aligned (cp.async) and odd (plain loads) rows.
    (1, 70, 1, 40, 8, 64, 320, "float16", 1, False),
    (2, 33, 2, 24, 8, 24, 35, "float16", 2, True),
    (1, 65, 2, 30, 5, 20, 131, "bfloat16", 3, True),
    (1, 16, 1, 40, 0, 64, 544, "float16", 0, False),
    (2, 64, 3, 16, 8, 64, 73, "bfloat16", 0, True),
]


@pytest.mark.parametrize(
    "b,nq,sources,tokens,extra,d,dv,dtype,splits,poison", TC_CASES, ids=[str(c) for c in TC_CASES]
)
def test_emulated_tensor_core_kernel_matches_reference(
    emulated_lib, tmp_path, b, nq, sources, tokens, extra, d, dv, dtype, splits, poison
):
    """The tensor-core kernel (mma fragments rebuilt by the emulation from PTX's layout) against
    the reference: masks, NaN/Inf in masked slots, a fully masked batch entry, split-K."""
    rng = np.random.default_rng(hash((b, nq, d, dv)) & 0xFFFF)
    case = _make_case(rng, b, nq, sources, tokens, extra, d, dv, np.float32, True)
    if b > 1:
        case["mask"][-1] = False  # every key masked: zeros
    if dtype == "float16":
        q, k, v = (case[n].astype(np.float16) for n in ("q", "k", "v"))
        ref = attention_reference(q, k, v, case["mask"])
    else:
        q, k, v = (to_bf16_bits(case[n]) for n in ("q", "k", "v"))
        ref = attention_reference(*(from_bf16_bits(x) for x in (q, k, v)), case["mask"])
    if poison:
        hidden = ~case["mask"]
        nan = np.float16(np.nan) if dtype == "float16" else np.uint16(0x7FC0)
        inf = np.float16(np.inf) if dtype == "float16" else np.uint16(0x7F80)
        k, v = k.copy(), v.copy()
        k[hidden] = nan
        v[hidden] = inf
    run = {"q": q, "k": k, "v": v, "mask": case["mask"], "num_splits": splits, "cc": 8}
    run.update(kernel=2, bf16=dtype == "bfloat16")
    out = _run_in_child(emulated_lib, tmp_path, run)
    out = from_bf16_bits(out) if dtype == "bfloat16" else out.astype(np.float32)
    assert np.isfinite(out).all(), "an element was not written, or NaN/Inf leaked"
    if b > 1:
        assert np.all(out[-1] == 0.0)
    err = np.abs(out - ref).max() / (np.abs(ref).max() + 1e-12)
    tol = 5e-3 if dtype == "float16" else 3e-2  # P is rounded to the input type for P V
    assert err < tol, f"relative error {err:.2e} (tolerance {tol})"


def test_emulated_kernel_choice(emulated_lib, tmp_path):
    """bfloat16 needs the tensor-core kernel: refused without it (compute capability < 8)."""
    rng = np.random.default_rng(2)
    case = _make_case(rng, 1, 8, 1, 16, 0, 16, 8, np.float32, False)
    q, k, v = (to_bf16_bits(case[n]) for n in ("q", "k", "v"))
    run = {"q": q, "k": k, "v": v, "bf16": True, "cc": 7}
    with pytest.raises(AssertionError, match="returned 1"):
        _run_in_child(emulated_lib, tmp_path, run)


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.float32])
def test_emulated_kernel_masked_slots_with_nan_and_inf(emulated_lib, tmp_path, mask_dtype):
    """Masked keys contribute exactly nothing, even when their k/v slots hold NaN/Inf (unused
    cache rows): the kernel skips them instead of multiplying their values by 0."""
    rng = np.random.default_rng(5)
    case = _make_case(rng, 2, 20, 2, 24, 8, 16, 37, np.float32, True)
    clean = {n: case[n].copy() for n in ("q", "k", "v")}
    masked = ~case["mask"]
    assert masked.any()
    case["k"][masked] = np.where(np.arange(16) % 2, np.nan, np.inf)
    case["v"][masked] = np.where(np.arange(37) % 3 == 0, -np.inf, np.nan)
    case["mask"] = case["mask"].astype(mask_dtype)
    case.update(num_splits=2)
    out = _run_in_child(emulated_lib, tmp_path, case)
    assert np.isfinite(out).all(), "NaN/Inf of a masked slot reached the output"
    ref = attention_reference(clean["q"], clean["k"], clean["v"], case["mask"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_emulated_kernel_fully_masked_rows_and_float_mask(emulated_lib, tmp_path):
    rng = np.random.default_rng(7)
    case = _make_case(rng, 3, 20, 2, 24, 8, 16, 19, np.float32, True, fully_masked_row=True)
    case["mask"] = case["mask"].astype(np.float32)  # the TensorRT plugin's mask form
    case.update(num_splits=2, scale=0.3)
    out = _run_in_child(emulated_lib, tmp_path, case)
    assert np.all(out[-1] == 0.0), "a fully masked row must be zeros"
    ref = attention_reference(case["q"], case["k"], case["v"], case["mask"], scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_emulated_kernel_no_keys_and_no_mask(emulated_lib, tmp_path):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 9, 8)).astype(np.float32)
    empty = {"q": q, "k": np.zeros((1, 0, 8), np.float32), "v": np.zeros((1, 0, 5), np.float32)}
    out = _run_in_child(emulated_lib, tmp_path, empty)
    assert out.shape == (1, 9, 5) and np.all(out == 0.0)
    case = _make_case(rng, 1, 9, 1, 40, 0, 8, 5, np.float32, False)
    case.pop("mask")
    out = _run_in_child(emulated_lib, tmp_path, case)
    np.testing.assert_allclose(
        out, attention_reference(case["q"], case["k"], case["v"]), rtol=1e-5, atol=1e-6
    )


def test_emulated_kernel_broadcast_mask(emulated_lib, tmp_path):
    rng = np.random.default_rng(11)
    case = _make_case(rng, 3, 12, 2, 24, 8, 16, 40, np.float32, True)
    case["mask"] = case["mask"][:1]  # (1, Nk): one mask for the whole batch
    out = _run_in_child(emulated_lib, tmp_path, case)
    ref = attention_reference(case["q"], case["k"], case["v"], case["mask"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_reference_matches_torch_attention():
    torch = pytest.importorskip("torch")
    from iwarp.model.warp import attention

    rng = np.random.default_rng(0)
    for masked in (False, True):
        case = _make_case(rng, 2, 30, 3, 16, 8, 32, 32 + 3 + 32, np.float32, masked)
        ref = attention_reference(case["q"], case["k"], case["v"], case["mask"])
        got = attention(*(torch.from_numpy(case[n]) for n in ("q", "k", "v", "mask"))).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_split_heuristic_and_workspace_bound(emulated_lib):
    lib = ctypes.CDLL(str(emulated_lib))
    lib.iwarp_attention_choose_splits.restype = ctypes.c_int
    lib.iwarp_attention_workspace_size.restype = ctypes.c_size_t
    lib.iwarp_attention_workspace_bound.restype = ctypes.c_size_t
    # 256^2 paper config, 1 source + 32 extra tokens, batch 1, on an H100 (132 SMs).
    s = lib.iwarp_attention_choose_splits(1, 1024, 1056, 515, 132)
    assert 1 < s <= 8
    # Many query blocks already fill the GPU: no split.
    assert lib.iwarp_attention_choose_splits(16, 4096, 1056, 515, 132) == 1
    for b, nq, nk, dv in [(1, 1024, 1056, 515), (2, 1024, 4128, 131), (1, 4096, 16416, 515)]:
        need = lib.iwarp_attention_workspace_size(
            b, nq, dv, lib.iwarp_attention_choose_splits(b, nq, nk, dv, 132)
        )
        assert need <= lib.iwarp_attention_workspace_bound(8, 4096, dv, 132)


# --------------------------------------------------------------------------- fused or SDPA


def _table(*entries):
    return {"format": "iwarp-attention-dispatch/1", "entries": list(entries)}


def test_shipped_dispatch_table_means_sdpa_until_measured(monkeypatch):
    pytest.importorskip("torch")
    from iwarp.checkpoint import Checkpoint
    from iwarp.model import fused_attention as fa

    monkeypatch.delenv(fa.MODE_ENV, raising=False)
    monkeypatch.delenv(fa.TABLE_ENV, raising=False)
    shipped = fa.load_table()
    assert "error" not in shipped and shipped["entries"] == []
    model = Checkpoint(None).config.model
    d, dv = fa.attention_widths(model)
    choice = fa.choose("NVIDIA H200", "float16", 1, 1024, 1056, d, dv)
    assert choice.backend == "sdpa" and "no device measurement" in choice.reason


def test_dispatch_table_picks_the_measured_faster_one(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from iwarp.model import fused_attention as fa

    monkeypatch.delenv(fa.MODE_ENV, raising=False)
    fast = fa.make_entry("GPU X", "float16", 1, 1024, 1056, 64, 320, 0.05, 0.08)
    slow = fa.make_entry("GPU X", "float16", 1, 4096, 4128, 64, 320, 0.9, 0.4)
    failed = fa.make_entry("GPU X", "bfloat16", 1, 1024, 1056, 64, 320, None, 0.1)
    assert (fast["choice"], slow["choice"], failed["choice"]) == ("fused", "sdpa", "sdpa")
    table = _table(fast, slow, failed)
    assert fa.choose("GPU X", "float16", 1, 1024, 1056, 64, 320, table).backend == "fused"
    assert fa.choose("GPU X", "float16", 1, 1024, 2080, 64, 320, table).backend == "fused"
    assert fa.choose("GPU X", "float16", 1, 4096, 4128, 64, 320, table).backend == "sdpa"
    # Another GPU, dtype or width, or a shape far from every measurement: SDPA.
    for args in [
        ("GPU Y", "float16", 1, 1024, 1056, 64, 320),
        ("GPU X", "float32", 1, 1024, 1056, 64, 320),
        ("GPU X", "float16", 1, 1024, 1056, 64, 331),
        ("GPU X", "float16", 1, 64, 100, 64, 320),
    ]:
        assert fa.choose(*args, table=table).backend == "sdpa", args
    # $IWARP_ATTENTION and forced() override the table; a broken file is SDPA with a reason.
    monkeypatch.setenv(fa.MODE_ENV, "fused")
    assert fa.choose("GPU Y", "float32", 1, 9, 9, 8, 8, table).backend == "fused"
    monkeypatch.delenv(fa.MODE_ENV)
    with fa.forced("sdpa"):
        assert fa.choose("GPU X", "float16", 1, 1024, 1056, 64, 320, table).backend == "sdpa"
    bad = tmp_path / "table.json"
    bad.write_text("{not json")
    monkeypatch.setenv(fa.TABLE_ENV, str(bad))
    choice = fa.choose("GPU X", "float16", 1, 1024, 1056, 64, 320)
    assert choice.backend == "sdpa" and "table.json" in choice.reason


def test_attention_widths_follow_the_network(monkeypatch):
    """(d, dv') as the network really concatenates V': checked against the values the
    ImplicitWarp layer hands to attention(), for the flow-warp preset and the paper's layout."""
    torch = pytest.importorskip("torch")
    from iwarp.config import get_config
    from iwarp.model import ImplicitWarpingNetwork
    from iwarp.model import fused_attention as fa
    from iwarp.model import warp as warp_module

    seen = []
    real = warp_module.attention

    def spy(q, k, v, mask):
        seen.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, mask)

    monkeypatch.setattr(warp_module, "attention", spy)
    for name in ("tiny_flow", "paper"):
        try:
            config = get_config(name)
        except Exception:  # a preset another version does not have
            continue
        net = ImplicitWarpingNetwork(config.model).eval()
        s = config.model.image_size
        for sources in (1, 3):
            seen.clear()
            with torch.no_grad():
                net(torch.rand(1, sources, 3, s, s), torch.rand(1, 3, s, s))
            assert seen and seen[-1] == fa.attention_widths(config.model, sources), (name, sources)


def test_tensorrt_build_uses_the_table_for_the_plugin(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    import json

    from iwarp.checkpoint import Checkpoint
    from iwarp.engine_build.tensorrt_build import plugin_choice
    from iwarp.model import fused_attention as fa

    monkeypatch.delenv(fa.MODE_ENV, raising=False)
    config = Checkpoint(None).config
    table = tmp_path / "t.json"
    # The shipped shapes at 256 px: 1024 queries, 1024 keys per source + 32 extra tokens.
    d, dv = fa.attention_widths(config.model, 1)
    entry = fa.make_entry("GPU X", "float16", 1, 1024, 1056, d, dv, 0.05, 0.08)
    table.write_text(json.dumps(_table(entry)))
    monkeypatch.setenv(fa.TABLE_ENV, str(table))
    assert plugin_choice(config, "fp16", "GPU X").backend == "fused"
    assert plugin_choice(config, "fp32", "GPU X").backend == "sdpa"
    assert plugin_choice(config, "fp16", "GPU Z").backend == "sdpa"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (no CUDA toolkit)")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_tensor_core_kernel_compiles_for_ampere_and_hopper(tmp_path, arch):
    """The whole kernel file (SIMT and tensor-core kernels, fp32/fp16/bf16) compiles with nvcc
    for sm_80 and sm_90 with real tensor-core code (mma.sync, cp.async) and no register spills."""
    obj = tmp_path / f"k{arch}.o"
    cmd = ["nvcc", "-std=c++17", "-O3", "--use_fast_math", f"-arch=sm_{arch}", "-Xptxas", "-v"]
    cmd += [f"-I{KERNEL_DIR}", "-c", str(KERNEL_SRC), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # ptxas -v: "Compiling entry function 'NAME'", then its stack/spill line.
    spill_of: dict[str, str] = {}
    entry = None
    for line in result.stderr.splitlines():
        if "Compiling entry function" in line:
            entry = line.split("'")[1]
        elif "spill stores" in line and entry is not None:
            spill_of[entry] = line.strip()
    tc = {name: line for name, line in spill_of.items() if "attention_tc_kernel" in name}
    assert len(tc) == 16, f"expected 8 column widths x (fp16, bf16) tensor-core kernels: {len(tc)}"
    spills = [line for line in tc.values() if not line.startswith("0 bytes stack frame, 0 bytes")]
    assert not spills, spills[:3]
    ptx = subprocess.run(
        [*cmd[:5], f"-I{KERNEL_DIR}", "-ptx", str(KERNEL_SRC), "-o", str(tmp_path / "k.ptx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ptx.returncode == 0, ptx.stderr[-2000:]
    text = (tmp_path / "k.ptx").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert "cp.async.cg.shared.global" in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (no CUDA toolkit)")
def test_kernel_compiles_with_nvcc_cmake(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    arch = os.environ.get("IWARP_CI_CUDA_ARCH", "90")
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(REPO),
        "-B",
        str(build),
        "-DIWARP_KERNELS_ONLY=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
    ]
    result = subprocess.run(configure, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    result = subprocess.run(
        ["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (build / "libiwarp_attention_kernels.a").is_file()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--run-emulated":
    _lib, _case, _out = sys.argv[2:]
    with np.load(_case) as data:
        _c = {k: (data[k] if data[k].ndim else data[k].item()) for k in data.files}
    np.save(_out, run_emulated(_lib, _c))
