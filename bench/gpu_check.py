#!/usr/bin/env python
"""Build, verify and time the fused attention kernel on a CUDA machine (TensorRT where installed).

    python bench/gpu_check.py [--out docs/GPU_CHECK.md] [--quick] [--no-tensorrt]

(`bench/device_check.sh` is the one command for the GPU check machine; it uses these sections.)
1. builds `torch.ops.iwarp.attention` (plugins/torch + plugins/kernels, torch.utils.cpp_extension);
2. correctness against a float64 reference on fresh random inputs: float32, float16 and bfloat16,
   both kernels (SIMT, tensor cores), 1 and 3 sources (+32 extra tokens), masked tokens whose
   k/v slots hold NaN/Inf (they must not reach the output), a batch entry with every key masked
   (zeros), the shipped widths (read from the shipped config: d = 64, dv' = 320 today), odd
   and the widest (544) value widths; the output is NaN-filled first, so an element the kernel
   does not write fails the check;
3. kernel time of the fused op (as dispatched: tensor cores for fp16/bf16), SDPA and unfused
   PyTorch at the shipped widths, 256^2 (1024 queries) and 512^2 (4096), 1-3 sources; each
   row says which is faster and becomes an entry of the dispatch table
   (`iwarp.model.fused_attention`);
4. one whole frame (detect + animate) of the shipped weights: SDPA and the fused kernel, each
   eager and captured in a CUDA graph (`fused_attention.forced` pins the attention, so the
   comparison is between the two, not the op with itself);
5. where TensorRT is installed: engines of the shipped weights, output vs PyTorch, time/frame;
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
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
KERNELS = {"auto": 0, "SIMT": 1, "tensor cores": 2}


def shipped_widths(num_sources: int = 1) -> tuple[int, int]:
    """(d, dv') of the shipped weights' attention for an avatar of `num_sources` photos, from
    their config (not written by hand: the flow warp adds 3 value columns per source)."""
    from iwarp.checkpoint import Checkpoint
    from iwarp.model.fused_attention import attention_widths

    return attention_widths(Checkpoint(None).config.model, num_sources)


def widths() -> dict[str, tuple[int, int]]:
    """The value widths checked: the shipped one, odd ones of the coming per-source design
    (70 + 3 per source) and the widest the kernel takes; the paper's for reference."""
    return {
        "shipped": shipped_widths(),
        "odd": (64, 73),
        "widest": (64, 544),
        "paper": (256, 256 + 3 + 256),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def make_inputs(batch, nq, sources, tokens, d, dv, dtype, drop, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    nk = sources * tokens + EXTRA_TOKENS
    q = torch.randn(batch, nq, d, device=device, generator=g).to(dtype)
    k = torch.randn(batch, nk, d, device=device, generator=g).to(dtype)
    v = torch.randn(batch, nk, dv, device=device, generator=g).to(dtype)
    mask = torch.ones(batch, nk, dtype=torch.bool, device=device)
    if drop > 0:
        keep = torch.rand(batch, sources * tokens, device=device, generator=g) >= drop
        mask[:, : sources * tokens] = keep
    return q, k, v, mask


def poison_masked(k, v, mask):
    """NaN/Inf in the masked slots (unused cache rows): the result must not change."""
    k, v = k.clone(), v.clone()
    hidden = ~mask
    k[hidden] = float("nan")
    v[hidden] = float("inf")
    v[..., ::2][hidden] = float("nan")
    return k, v


# --------------------------------------------------------------------------- sections


def section_build(fa) -> list[str]:
    t0 = time.perf_counter()
    fa.load(verbose=False, raise_errors=True)
    return [f"torch op built and loaded in {time.perf_counter() - t0:.1f} s."]


def section_correctness(fa, quick: bool) -> tuple[list[str], bool]:
    rows = [
        "| widths | dtype | kernel | sources | masked (NaN/Inf in masked slots) | rel. error | "
        "all written | vs SDPA | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    nq = 256 if quick else 1024
    for width, (d, dv) in widths().items():
        for dtype in DTYPES:
            kernels = ["auto", "SIMT"] if dtype == torch.float16 else ["auto"]
            for kernel in kernels:
                for sources in (1, 3):
                    for drop in (0.0, 0.2):
                        q, k, v, mask = make_inputs(
                            2, nq, sources, 1024, d, dv, dtype, drop, sources
                        )
                        if drop > 0:
                            mask[1, :] = False  # a batch entry with every key masked
                        ref = reference(q, k, v, mask)
                        kp, vp = poison_masked(k, v, mask) if drop > 0 else (k, v)
                        out = torch.full((2, nq, dv), float("nan"), dtype=dtype, device="cuda")
                        try:
                            fa.attention_out(q, kp, vp, mask, out, 0.0, KERNELS[kernel])
                            torch.cuda.synchronize()
                            used = fa.kernel_name(q, v, KERNELS[kernel])
                        except RuntimeError as exc:
                            rows.append(
                                f"| {width} | {dtype_name(dtype)} | {kernel} | {sources} "
                                f"| {drop > 0} | error: {str(exc)[:60]} | | | FAIL |"
                            )
                            all_ok = False
                            continue
                        written = bool(torch.isfinite(out).all())
                        err = float(
                            (out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
                        )
                        zero_rows = drop == 0 or bool((out[1] == 0).all())
                        s_err = float(
                            (sdpa(q[:1], k[:1], v[:1], mask[:1]).double() - ref[:1]).abs().max()
                            / ref[:1].abs().max()
                        )
                        ok = written and zero_rows and err < TOLERANCE[dtype]
                        all_ok &= ok
                        rows.append(
                            f"| {width} (d={d}, dv'={dv}) | {dtype_name(dtype)} | {used} | "
                            f"{sources} | {'20% + one all-masked row' if drop else 'no'} | "
                            f"{err:.1e} | {'yes' if written else 'NO'} | {s_err:.1e} | "
                            f"{'ok' if ok else 'FAIL'} |"
                        )
    return rows, all_ok


def _time(fn, iters: int, *args) -> float | None:
    """Median ms of fn(*args); None when it fails (out of memory, unsupported)."""
    try:
        return cuda_time_ms(lambda: fn(*args), iters=iters)
    except (torch.cuda.OutOfMemoryError, RuntimeError):
        return None
    finally:
        torch.cuda.empty_cache()


def _cell(ms: float | None) -> str:
    return "failed" if ms is None else f"{ms:.3f}"


def section_kernel_time(
    fa, quick: bool, sizes=(256, 512), sources_list=(1, 2, 3), dtypes=DTYPES
) -> tuple[list[str], list[dict]]:
    """Fused (as dispatched) vs SDPA vs unfused at the shipped widths; the dispatch entries."""
    gpu = torch.cuda.get_device_name()
    widths_by_sources = {n: shipped_widths(n) for n in sources_list}
    rows = [
        f"Shipped widths (d, dv') by sources: {widths_by_sources}; batch 1; median of CUDA-event "
        "timings.",
        "",
        "| image | dtype | sources | keys | dv' | fused kernel | fused ms | SDPA ms | unfused ms "
        "| faster |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = []
    iters = 10 if quick else 50
    for size in sizes:
        nq = (size // 8) ** 2
        for dtype in dtypes:
            for sources in sources_list:
                d, dv = widths_by_sources[sources]
                inputs = make_inputs(1, nq, sources, nq, d, dv, dtype, 0.0, 0)
                nk = inputs[1].shape[1]
                t_fused = _time(fa.attention, iters, *inputs)
                t_sdpa = _time(sdpa, iters, *inputs)
                t_unf = _time(unfused, iters, *inputs)
                kernel = fa.kernel_name(inputs[0], inputs[2])
                del inputs
                torch.cuda.empty_cache()
                entry = fa.make_entry(gpu, dtype_name(dtype), 1, nq, nk, d, dv, t_fused, t_sdpa)
                entries.append({**entry, "unfused_ms": t_unf, "kernel": kernel})
                rows.append(
                    f"| {size}^2 | {dtype_name(dtype)} | {sources} | {nk} | {dv} | {kernel} | "
                    f"{_cell(t_fused)} | {_cell(t_sdpa)} | {_cell(t_unf)} | "
                    f"{'fused' if entry['choice'] == 'fused' else 'SDPA'} |"
                )
    return rows, entries


def _frame_fn(net, source, driving):
    def frame():
        kp = net.detect(driving)
        return net.animate(source, kp)

    return frame


def _graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream); (replay, static output)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    return graph.replay, static_out


def section_frame_path(fa, quick: bool, sources_list=(1, 3)) -> tuple[list[str], list[dict]]:
    """One frame of the shipped weights: SDPA vs fused, eager vs CUDA graph, fp32 and fp16."""
    from iwarp.checkpoint import load_network

    rows = [
        "| dtype | sources | SDPA eager ms | fused eager ms | SDPA graph ms | fused graph ms | "
        "max abs diff fused vs SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    results = []
    net, ckpt = load_network(None, "cuda")
    size = ckpt.config.model.image_size
    iters = 10 if quick else 50
    for dtype in (torch.float32, torch.float16):
        net = net.to(dtype)
        for sources in sources_list:
            g = torch.Generator(device="cuda").manual_seed(0)
            images = torch.rand(1, sources, 3, size, size, device="cuda", generator=g).to(dtype)
            driving = torch.rand(1, 3, size, size, device="cuda", generator=g).to(dtype)
            times: dict[str, float | None] = {}
            outs = {}
            with torch.inference_mode():
                source = net.encode_sources(images)
                for backend in ("sdpa", "fused"):
                    with fa.forced(backend):
                        fn = _frame_fn(net, source, driving)
                        outs[backend] = fn().float()
                        times[f"{backend}_eager"] = _time(fn, iters)
                        try:
                            replay, _ = _graphed(fn)
                            times[f"{backend}_graph"] = _time(replay, iters)
                        except RuntimeError:
                            times[f"{backend}_graph"] = None
            diff = float((outs["fused"] - outs["sdpa"]).abs().max())
            results.append(
                {"dtype": dtype_name(dtype), "sources": sources, "max_abs_diff": diff, **times}
            )
            rows.append(
                f"| {dtype_name(dtype)} | {sources} | {_cell(times['sdpa_eager'])} | "
                f"{_cell(times['fused_eager'])} | {_cell(times['sdpa_graph'])} | "
                f"{_cell(times['fused_graph'])} | {diff:.1e} |"
            )
    del net
    torch.cuda.empty_cache()
    return rows, results


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
            "Attention kernel time: fused vs SDPA vs unfused",
            lambda: section_kernel_time(fa, args.quick)[0],
        ),
        (
            "One frame of the shipped weights (detect + animate)",
            lambda: section_frame_path(fa, args.quick)[0],
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
