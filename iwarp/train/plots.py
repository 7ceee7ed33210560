"""Pictures of training: sample grids and loss curves (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iwarp.graphs import tensor_to_image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (`iwarp.graphs.tensor_to_image`)."""
    return tensor_to_image(image.detach().float().cpu().numpy())


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles equally sized HxWx3 images; short rows are filled with black."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.zeros((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = img
    return grid


def save_sample_grid(
    path: Path, sources: torch.Tensor, driving: torch.Tensor, output: torch.Tensor, rows: int = 4
) -> None:
    """One row per sample: its sources, the driving frame (target), the output."""
    grid_rows = []
    for i in range(min(rows, sources.shape[0])):
        row = [to_uint8(s) for s in sources[i]] + [to_uint8(driving[i]), to_uint8(output[i])]
        grid_rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(grid_rows)).save(path)


def plot_loss_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Each loss against the step, with the copy-the-source L1 for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_jsonl.is_file():
        return
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    if not records:
        return
    keys = [k for k in records[-1] if k not in ("step", "samples_per_s", "grad_norm")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in records]
    for k in keys:
        ax.plot(steps, [r.get(k, np.nan) for r in records], label=k, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
