#!/usr/bin/env python
"""One command on a CUDA machine: build, verify and time the fused attention kernel.

    python bench/gpu_check.py [--out docs/GPU_CHECK.md] [--quick] [--no-tensorrt]

1. builds `torch.ops.iwarp.attention` (plugins/torch + plugins/kernels, torch.utils.cpp_extension);
2. correctness against a float64 PyTorch reference on fresh random inputs: float32 and float16,
   1, 2 and 4 sources (+32 extra tokens), with and without masked tokens, the tiny and paper
   widths (d = 64 / 256, dv' = 131 / 515); the output is filled with NaN first, so an element the
   kernel does not write fails the check; fully masked rows must be zeros;
3. kernel time against F.scaled_dot_product_attention (bool mask) and unfused PyTorch
   (matmul / masked softmax / matmul) at 256^2 (1024 queries) and 512^2 (4096 queries);
4. the whole per-frame path (detect + animate, random weights of the tiny and paper configs) at
   256 and 512: PyTorch CUDA eager vs the fused kernel captured in a CUDA graph;
5. where TensorRT is installed: engines of the shipped weights (fp32 / fp16, with the plugin when
   it can be built, and TensorRT's own attention), output vs PyTorch and time per frame;
6. writes a Markdown report naming the GPU (default docs/GPU_CHECK.md).
Every section catches its own failure and reports it, so one problem does not hide the rest.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EXTRA_TOKENS = 32
WIDTHS = {"tiny": (64, 64 + 3 + 64), "paper": (256, 256 + 3 + 256)}  # d, dv' = dv + 3 + d


def cuda_time_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of fn() on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reference(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d), mask) v; fully masked rows are zeros."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    logits = q64 @ k64.transpose(1, 2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(logits - top)
    total = p.sum(-1, keepdim=True)
    out = (p @ v64) / total.clamp_min(1e-300)
    return torch.where(total > 0, out, torch.zeros_like(out))


def unfused(q, k, v, mask):
    logits = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v


def sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask[:, None, None, :]
    )
    return out.squeeze(1)


def make_inputs(batch, nq, sources, tokens, d, dv, dtype, drop, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nk = sources * tokens + EXTRA_TOKENS
    q = torch.randn(batch, nq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, nk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, nk, dv, device="cuda", generator=g).to(dtype)
    mask = torch.ones(batch, nk, dtype=torch.bool, device="cuda")
    if drop > 0:
        keep = torch.rand(batch, sources * tokens, device="cuda", generator=g) >= drop
        mask[:, : sources * tokens] = keep
    return q, k, v, mask


# --------------------------------------------------------------------------- sections


def section_build(fa) -> list[str]:
    t0 = time.perf_counter()
    fa.load(verbose=False, raise_errors=True)
    return [f"torch op built and loaded in {time.perf_counter() - t0:.1f} s."]


def section_correctness(fa, quick: bool) -> tuple[list[str], bool]:
    rows = [
        "| widths | dtype | sources | masked | rel. error | all written | vs SDPA | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}
    for width, (d, dv) in WIDTHS.items():
        for dtype in (torch.float32, torch.float16):
            for sources in (1, 2, 4):
                for drop in (0.0, 0.2):
                    nq = 256 if quick else 1024
                    q, k, v, mask = make_inputs(2, nq, sources, 1024, d, dv, dtype, drop, sources)
                    if drop > 0:
                        mask[1, :] = False  # a batch entry with every key masked
                    out = torch.full((2, nq, dv), float("nan"), dtype=dtype, device="cuda")
                    fa.attention_out(q, k, v, mask, out)
                    torch.cuda.synchronize()
                    ref = reference(q, k, v, mask)
                    written = bool(torch.isfinite(out).all())
                    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    zero_rows = drop == 0 or bool((out[1] == 0).all())
                    s_err = float(
                        (sdpa(q[:1], k[:1], v[:1], mask[:1]).double() - ref[:1]).abs().max()
                        / ref[:1].abs().max()
                    )
                    ok = written and zero_rows and err < tol[dtype]
                    all_ok &= ok
                    name = str(dtype).replace("torch.", "")
                    rows.append(
                        f"| {width} (d={d}, dv'={dv}) | {name} | {sources} | "
                        f"{'20% + one all-masked row' if drop else 'no'} | {err:.1e} | "
                        f"{'yes' if written else 'NO'} | {s_err:.1e} | {'ok' if ok else 'FAIL'} |"
                    )
    return rows, all_ok


def _time_kernels(fa, inputs, iters: int) -> tuple[str, str, str]:
    """Fused, SDPA and unfused times (ms) of one problem, as table cells."""
    results = []
    for fn in (fa.attention, sdpa, unfused):
        try:
            results.append(f"{cuda_time_ms(lambda fn=fn: fn(*inputs), iters=iters):.3f}")
        except torch.cuda.OutOfMemoryError:
            results.append("out of memory")
        except RuntimeError as exc:
            results.append(f"error: {str(exc)[:40]}")
        torch.cuda.empty_cache()
    return results[0], results[1], results[2]


def section_kernel_time(fa, quick: bool) -> list[str]:
    rows = [
        "| image | widths | dtype | sources | keys | fused ms | SDPA ms | unfused ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in (256, 512):
        nq = (size // 8) ** 2
        for width, (d, dv) in WIDTHS.items():
            for dtype in (torch.float16, torch.float32):
                for sources in (1, 4):
                    inputs = make_inputs(1, nq, sources, nq, d, dv, dtype, 0.0, 0)
                    nk = inputs[1].shape[1]
                    t_fused, t_sdpa, t_unf = _time_kernels(fa, inputs, 10 if quick else 50)
                    del inputs
                    torch.cuda.empty_cache()
                    name = str(dtype).replace("torch.", "")
                    rows.append(
                        f"| {size}^2 | {width} | {name} | {sources} | {nk} | "
                        f"{t_fused} | {t_sdpa} | {t_unf} |"
                    )
    return rows


def _frame_fn(net, source, driving):
    def frame():
        kp = net.detect(driving)
        return net.animate(source, kp)

    return frame


def section_frame_path(fa, quick: bool) -> list[str]:
    from iwarp.config import get_config
    from iwarp.model import ImplicitWarpingNetwork
    from iwarp.model import warp as warp_module

    rows = [
        "| config | image | dtype | sources | eager ms | fused + CUDA graph ms | speed-up | "
        "max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    original = warp_module.attention
    for name in ("tiny", "paper"):
        for size in (256, 512):
            config = get_config(name, size)
            net = ImplicitWarpingNetwork(config.model).cuda().eval()
            for dtype in (torch.float32, torch.float16):
                net = net.to(dtype)
                for sources in (1, 3):
                    g = torch.Generator(device="cuda").manual_seed(0)
                    images = torch.rand(1, sources, 3, size, size, device="cuda", generator=g)
                    driving = torch.rand(1, 3, size, size, device="cuda", generator=g)
                    images, driving = images.to(dtype), driving.to(dtype)
                    with torch.inference_mode():
                        source = net.encode_sources(images)
                        warp_module.attention = original
                        eager_fn = _frame_fn(net, source, driving)
                        ref = eager_fn()
                        iters = 10 if quick else 50
                        t_eager = cuda_time_ms(eager_fn, iters=iters)
                        warp_module.attention = fa.attention
                        fused_fn = _frame_fn(net, source, driving)
                        fused_fn()
                        stream = torch.cuda.Stream()
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            for _ in range(3):
                                fused_fn()
                        torch.cuda.current_stream().wait_stream(stream)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            static_out = fused_fn()
                        graph.replay()
                        torch.cuda.synchronize()
                        diff = float((static_out.float() - ref.float()).abs().max())
                        t_graph = cuda_time_ms(graph.replay, iters=iters)
                    warp_module.attention = original
                    rows.append(
                        f"| {name} | {size} | {str(dtype).replace('torch.', '')} | {sources} | "
                        f"{t_eager:.2f} | {t_graph:.2f} | {t_eager / t_graph:.1f}x | {diff:.1e} |"
                    )
            del net
            torch.cuda.empty_cache()
    return rows


def section_tensorrt(quick: bool) -> list[str]:
    try:
        import tensorrt as trt
    except ImportError:
        return ["TensorRT is not installed here: skipped (pip install 'iwarp[tensorrt]')."]
    import numpy as np

    from iwarp.engine_build import plugin as plugin_mod
    from iwarp.engine_build.tensorrt_build import psnr
    from iwarp.runtime.backends.torch_backend import TorchBackend
    from iwarp.runtime.backends.trt_backend import TensorRTBackend

    lines = [f"TensorRT {trt.__version__}."]
    have_plugin = plugin_mod.find_plugin_library() is not None
    if not have_plugin and plugin_mod.find_tensorrt_headers() is not None:
        try:
            plugin_mod.build_plugin(show_progress=False)
            have_plugin = True
        except Exception as exc:
            lines.append(f"Plugin build failed: {exc}")
    if not have_plugin:
        lines.append("No plugin library (no TensorRT headers): engines use TensorRT's attention.")
    rows = [
        "| precision | attention | sources | PSNR vs torch (dB) | ms/frame (animate) | build s |",
        "|---|---|---|---|---|---|",
    ]
    torch_backend = TorchBackend(None, "cuda")
    rng = np.random.default_rng(0)
    size = torch_backend.image_size
    images = rng.uniform(0, 1, (3, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            for use_plugin in (False, True) if have_plugin else (False,):
                t0 = time.perf_counter()
                backend = TensorRTBackend.from_checkpoint(
                    None, Path(tmp) / "trt", False, precision, use_plugin, max_sources=4
                )
                build_s = time.perf_counter() - t0
                for sources in (1, 3):
                    a_trt = backend.encode_avatar(images[:sources])
                    a_ref = torch_backend.encode_avatar(images[:sources])
                    points, strength = torch_backend.detect(images[:1])
                    ref = torch_backend.animate(a_ref, points, strength)
                    got = backend.animate(a_trt, points, strength)
                    times = []
                    for _ in range(20 if quick else 100):
                        t = time.perf_counter()
                        backend.animate(a_trt, points, strength)
                        times.append((time.perf_counter() - t) * 1e3)
                    rows.append(
                        f"| {precision} | {'IWarpAttention plugin' if use_plugin else 'TensorRT'}"
                        f" | {sources} | {psnr(got, ref):.1f} | {statistics.median(times):.2f} | "
                        f"{build_s:.0f} |"
                    )
                del backend
    return [*lines, "", *rows]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "GPU_CHECK.md"))
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    parser.add_argument("--no-tensorrt", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU and a CUDA build of PyTorch", file=sys.stderr)
        return 2
    from iwarp.model import fused_attention as fa

    props = torch.cuda.get_device_properties(0)
    gpu = (
        f"{props.name} (compute capability {props.major}.{props.minor}, "
        f"{props.multi_processor_count} SMs)"
    )
    report = [
        "# GPU check: fused attention kernel",
        "",
        f"- GPU: **{gpu}**",
        f"- PyTorch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- Written by `python bench/gpu_check.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
    ]
    ok = True
    sections = [
        ("Build", lambda: section_build(fa)),
        ("Correctness (vs float64 reference)", lambda: section_correctness(fa, args.quick)),
        (
            "Attention kernel time (batch 1, median of CUDA-event timings)",
            lambda: section_kernel_time(fa, args.quick),
        ),
        (
            "Per-frame path (detect + animate, random weights)",
            lambda: section_frame_path(fa, args.quick),
        ),
    ]
    if not args.no_tensorrt:
        sections.append(
            ("TensorRT engines (shipped weights)", lambda: section_tensorrt(args.quick))
        )
    for title, fn in sections:
        print(f"gpu_check: {title} ...", file=sys.stderr, flush=True)
        report += [f"## {title}", ""]
        try:
            result = fn()
            if isinstance(result, tuple):
                result, passed = result
                ok &= passed
            report += result
        except Exception as exc:
            ok = False
            report += ["```", f"FAILED: {exc}", traceback.format_exc()[-3000:], "```"]
            if title == "Build":
                report += ["", "(the remaining sections need the op)"]
                break
        report.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print(f"gpu_check: wrote {out} ({'all checks passed' if ok else 'SOME CHECKS FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
