"""`iwarp eval`: load the weights and the clips, evaluate, then write the report, its pictures
and a summary on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from iwarp.checkpoint import load_network
from iwarp.evaluation.protocol import EvalOptions, EvalRun, evaluate, load_eval_clips
from iwarp.evaluation.report import (
    expression_table,
    markdown_table,
    plot_expression_traces,
    plot_metrics_vs_sources,
    save_cross_grid,
    save_expression_grid,
    save_grids,
    temporal_summary,
)


def run_eval(o: EvalOptions) -> int:
    net, ckpt = load_network(o.checkpoint)
    settings = o.settings
    size = settings.image_size or net.config.image_size
    clips = load_eval_clips(o.data, settings.split, size, show_progress=not o.quiet)
    if o.max_clips:
        clips = clips[: o.max_clips]
    run = evaluate(net, clips, settings, show_progress=not o.quiet)
    report = {
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256(),
        "checkpoint_step": ckpt.step,
        "config": ckpt.config.name,
        "model": {
            "residual_branch": net.config.residual_branch,
            "extra_tokens": net.config.extra_tokens,
            "flow_warp": net.config.flow_warp,
        },
        "data": str(o.data),
        **run.report,
    }
    if o.json:
        Path(o.json).parent.mkdir(parents=True, exist_ok=True)
        Path(o.json).write_text(json.dumps(report, indent=2))
    if o.grid:
        _write_grids(Path(o.grid), run)
    if o.plot:
        title = f"{Path(ckpt.path).name}, {settings.split or 'all'} split, {size}x{size}"
        _write_plots(Path(o.plot), report, title)
    _print_summary(report)
    return 0


def _wrote(path: Path) -> None:
    print(f"wrote {path}", file=sys.stderr)


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}_{suffix}.png")


def _write_grids(grid: Path, run: EvalRun) -> None:
    for path in save_grids(grid, run.pictures) if run.pictures else []:
        _wrote(path)
    if run.cross_pictures:
        _wrote(save_cross_grid(_beside(grid, "cross_identity"), run.cross_pictures))
    if run.expression_pictures:
        _wrote(save_expression_grid(_beside(grid, "expression"), run.expression_pictures))


def _write_plots(plot: Path, report: dict[str, Any], title: str) -> None:
    if report["results"]:
        _wrote(plot_metrics_vs_sources(report, plot, title))
    if report["expression"]["series"]:
        _wrote(plot_expression_traces(report, _beside(plot, "expression"), title))


def _print_summary(report: dict[str, Any]) -> None:
    if report["results"]:
        print(markdown_table(report))
    for line in temporal_summary(report):
        print(line)
    for r in report["cross_identity"]["results"]:
        print(
            f"cross-identity {r['mode']:<13s} identity cos {r['identity']:.3f}, "
            f"distance {r['identity_distance']:.3f}, same person {r['same_person_rate']:.2f}"
        )
    if report["expression"]["results"]:
        print(expression_table(report))
