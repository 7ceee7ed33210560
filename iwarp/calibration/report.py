"""The calibration report: `calibration.json`, `calibration.md` and a PNG grid of outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from iwarp.graphs import GRAPHS, tensor_to_image


def write_json(path: Path, report: dict[str, Any]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- grid


def write_grid(
    path: Path,
    columns: list[tuple[str, np.ndarray]],
    row_labels: list[str] | None = None,
    note: str = "",
) -> Path:
    """One row per frame, one column per (title, (N, S, S, 3) uint8 images) entry."""
    from PIL import Image, ImageDraw

    n = len(columns[0][1])
    size = columns[0][1].shape[1]
    pad, head = 4, 18
    foot = 16 if note else 0
    width = len(columns) * (size + pad) + pad
    height = head + n * (size + pad) + pad + foot
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, images) in enumerate(columns):
        x = pad + c * (size + pad)
        draw.text((x + 2, 3), title, fill=(0, 0, 0))
        for r in range(n):
            y = head + r * (size + pad)
            canvas.paste(Image.fromarray(images[r]), (x, y))
            if c == 0 and row_labels:
                box = draw.textbbox((x + 3, y + 3), row_labels[r])
                draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
                draw.text((x + 3, y + 3), row_labels[r], fill=(255, 255, 0))
    if note:
        draw.text((pad, height - foot + 2), note, fill=(80, 80, 80))
    tmp = path.with_name(path.name + ".tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


to_uint8 = tensor_to_image  # (N, 3, S, S) float in [0, 1] -> (N, S, S, 3) uint8


# --------------------------------------------------------------------------- markdown


def _f(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}{unit}"


def _kb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1024:.0f} KiB"


def markdown(report: dict[str, Any]) -> str:
    mode = report["mode"].upper()
    q = report["quantizer"]
    d = report["data"]
    gate = report["gate"]
    lines = [
        f"# iwarp calibration: {mode}",
        "",
        f"- checkpoint: `{report['checkpoint']}` (sha256 {report['checkpoint_sha256'][:16]}...)",
        f"- quantizer: **{q['name']}** ({q['why']}); calibration method `{q['method']}`; "
        f"unquantized layers stay FP32",
        f"- calibration frames: {d['frames']} driving frames + {d['avatars']} avatars x "
        f"{d['sources_per_avatar']} sources from {len(d['clips'])} clip(s) of `{d['folder']}` "
        f"(split: {d['split']})",
        f"- evaluation frames: {d['eval_frames']} from {d['eval_source']}",
        f"- graphs: `{report['outputs']['graphs_dir']}`"
        + ("" if gate["passed"] else " (**rejected by the gate**)"),
        f"- gate: **{'PASSED' if gate['passed'] else 'FAILED'}**",
        "",
        "## Accuracy against FP32 (evaluation frames)",
        "",
        "Each graph alone, fed the FP32 graphs' inputs; end to end = all three quantized.",
        "",
        f"| graph | metric | {mode} | FP16 |",
        "|---|---|---|---|",
    ]
    fp16 = report.get("fp16", {})
    for graph in (*GRAPHS, "end_to_end"):
        acc = report["accuracy"].get(graph, {})
        ref = fp16.get("accuracy", {}).get(graph, {}) if fp16.get("available") else {}
        for name, value in acc.items():
            if value is None and name not in ref:
                continue
            digits = 4 if "rel_error" in name or name in ("keypoint_mae", "perceptual") else 2
            lines.append(
                f"| {graph} | {name} | {_f(value, digits)} | {_f(ref.get(name), digits)} |"
            )
    lines += ["", "## Size and ONNX Runtime CPU latency", ""]
    lat = report.get("latency", {})
    if lat.get("ms"):
        lines.append(
            f"Median of {lat['repeats']} runs after {lat['warmup']} warm-up runs, batch 1, "
            f"{lat['threads']} thread(s) for every variant, variants taking turns. {lat['note']}"
        )
        lines.append("")
    names = list(lat.get("variants", []))
    header = "| graph | FP32 size | " + f"{mode} size | " + " | ".join(f"{n} ms" for n in names)
    header += " | speed-up |" if lat.get("ms") else ""
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for graph in (*GRAPHS, "per_frame"):
        info = report["graphs"].get(graph, {})
        ms = lat.get("ms", {}).get(graph, {})
        row = f"| {graph} | {_kb(info.get('fp32_bytes'))} | {_kb(info.get('bytes'))} | "
        row += " | ".join(_f(ms.get(n), 1) for n in names)
        if lat.get("ms"):
            speed = ms.get("fp32", 0) / ms[report["mode"]] if ms.get(report["mode"]) else None
            row += f" | {_f(speed, 2, 'x')} |"
        lines.append(row)
    if not lat.get("ms"):
        lines.append("")
        lines.append(f"Latency: {lat.get('note', 'not measured')}")
    ex = report["exclusions"]
    lines += [
        "",
        "## Layers kept in FP32",
        "",
        f"Chosen ({ex['how']}):",
        "",
    ]
    for graph in GRAPHS:
        chosen = ex["chosen"].get(graph, [])
        lines.append(f"- {graph}: {', '.join(chosen) if chosen else 'none'}")
    for graph, trials in ex.get("trials", {}).items():
        if not trials:
            continue
        lines += ["", f"### {graph}: trials", "", "| excluded | score | gain | metrics | note |"]
        lines.append("|---|---|---|---|---|")
        for t in trials:
            metrics = ", ".join(
                f"{k} {_f(v, 3)}" for k, v in (t.get("metrics") or {}).items() if v is not None
            )
            lines.append(
                f"| {', '.join(t['exclude']) or '(none)'} | {_f(t.get('score'), 3)} | "
                f"{_f(t.get('gain'), 3)} | {metrics} | {t.get('note', '')} |"
            )
        lines.append("")
        lines.append(ex["score_note"][graph])
    lines += ["", "## Gate", "", "| check | value | threshold | result |", "|---|---|---|---|"]
    for check in gate["checks"]:
        lines.append(
            f"| {check['name']} | {_f(check['value'], 3)} | {check['op']} {check['threshold']} | "
            f"{'pass' if check['passed'] else '**FAIL**'} |"
        )
    lines += ["", "## Grid", ""]
    if report["outputs"].get("grid"):
        lines.append(f"![outputs]({Path(report['outputs']['grid']).name})")
        lines.append("")
        lines.append(report["outputs"].get("grid_note", ""))
    if not fp16.get("available"):
        lines.append("")
        lines.append(f"No FP16 column: {fp16.get('why', 'not made')}.")
    for note in report.get("notes", []):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, report: dict[str, Any]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(markdown(report))
    os.replace(tmp, path)
    return path
