"""Pictures of an evaluation: per-clip grids and metrics against the number of sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from iwarp.evaluation.protocol import FACE_METRICS, METHODS, PIXEL_METRICS, ClipPictures
from iwarp.train.plots import image_grid

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "l1": False, "perceptual": False, "akd": False}
HIGHER_IS_BETTER["mkr"] = False


def labelled(image: np.ndarray, label: str) -> np.ndarray:
    """The image with a caption strip above it."""
    strip = 14
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, strip))
    ImageDraw.Draw(canvas).text((2, 1), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def clip_grid(pictures: ClipPictures) -> np.ndarray:
    """Rows: one per kept target: the sources, the driving frame, every method's output."""
    rows = []
    for row in pictures.rows:
        cells = [labelled(s, f"source {i + 1}") for i, s in enumerate(pictures.sources)]
        cells += [labelled(img, label) for label, img in row.items()]
        rows.append(cells)
    return image_grid(rows)


def save_grids(path: str | Path, pictures: list[ClipPictures]) -> list[Path]:
    """PATH: one row per clip (its first kept target); PATH_<clip>.png: every kept target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    overview = []
    for p in pictures:
        grid = clip_grid(p)
        stem = p.name.replace("/", "_").rsplit(".", 1)[0]
        clip_path = path.with_name(f"{path.stem}_{stem}.png")
        Image.fromarray(grid).save(clip_path)
        written.append(clip_path)
        first = ClipPictures(p.name, p.sources, p.rows[:1])
        overview.append(clip_grid(first))
    Image.fromarray(_stacked(overview)).save(path)
    return [path, *written]


def _stacked(grids: list[np.ndarray]) -> np.ndarray:
    """Grids one under the other, padded to the widest, 4 px apart."""
    width = max(g.shape[1] for g in grids)
    return np.concatenate([np.pad(g, ((0, 4), (0, width - g.shape[1]), (0, 0))) for g in grids])


def save_expression_grid(path: str | Path, pictures: list[ClipPictures]) -> Path:
    """One row per clip: its source frame, the other person's photo, then for each of the
    driver's extreme frames (mouth widest, mouth shut, eyes closed) the driving frame and the
    outputs, each captioned with its openness."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_stacked([clip_grid(p) for p in pictures])).save(path)
    return path


EXPRESSION_MODES = {
    "model": "same person, 1 photo",
    "cross_relative": "another person's photo, relative",
    "copy_source": "copy-the-source",
    "driver_reencoded": "the driver re-encoded (ceiling)",
}


def expression_table(report: dict[str, Any], per_clip: bool = False) -> str:
    """Expression transfer as a Markdown table: means over clips, or (`per_clip`) every clip."""
    e = report["expression"]
    lines = [
        "| output | clips | mouth r | eyes r | mouth spread | eyes spread |",
        "|---|---|---|---|---|---|",
    ]
    rows = e["per_clip"] if per_clip else e["results"]
    for r in rows:
        label = EXPRESSION_MODES.get(r["mode"], r["mode"])
        where = f"{r['clip']}, {label}" if per_clip else label
        count = r["frames"] if per_clip else f"{r['mouth_clips']} / {r['eyes_clips']}"
        lines.append(
            f"| {where} | {count} | {r['mouth_r']:.2f} | {r['eyes_r']:.2f} | "
            f"{r['mouth_spread']:.2f} | {r['eyes_spread']:.2f} |"
        )
    if per_clip:
        lines[0] = lines[0].replace("| clips |", "| frames |")
    return "\n".join(lines)


def plot_expression_traces(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Mouth and eye openness over each clip's frames: the driver against every output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = report["expression"]["series"]
    height = 1.25 * len(clips) + 1.0  # inches; the top 0.6 hold the title and the legend
    fig, axes = plt.subplots(len(clips), 2, figsize=(11, height), squeeze=False, sharex="row")
    styles = {"driver": ("black", 1.6), "model": ("tab:blue", 1.0)}
    styles["cross_relative"] = ("tab:orange", 1.0)
    for (ax_mouth, ax_eyes), clip in zip(axes, clips, strict=True):
        for ax, measure in ((ax_mouth, "mouth"), (ax_eyes, "eyes")):
            for mode, (color, width) in styles.items():
                if mode in clip["series"]:
                    values = np.array(clip["series"][mode][measure], dtype=float)
                    label = "driver" if mode == "driver" else EXPRESSION_MODES[mode]
                    ax.plot(values, label=label, linewidth=width, color=color)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        ax_mouth.set_ylabel(Path(clip["clip"]).stem[:18], fontsize=7, rotation=0, ha="right")
    axes[0, 0].set_title("mouth openness (inner-lip gap / width)", fontsize=9)
    axes[0, 1].set_title("eye openness (eye aspect ratio, both eyes)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("frame (spread over the clip)", fontsize=8)
    fig.suptitle(title or "expression transfer", fontsize=10, y=1 - 0.1 / height)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=3,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def save_cross_grid(path: str | Path, pictures: list[dict[str, np.ndarray]]) -> Path:
    """One row per avatar: avatar, driving frame, absolute output, relative output."""
    rows = [[labelled(img, label) for label, img in p.items()] for p in pictures]
    Image.fromarray(image_grid(rows)).save(path)
    return Path(path)


def plot_metrics_vs_sources(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One panel per metric; a line per method against the number of sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [*PIXEL_METRICS, *FACE_METRICS]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    model_at_1 = {
        r["sources"]: r for r in report["results"] if r["method"] == "model" and r["sources"] == 1
    }
    for ax, metric in zip(axes.flat, metrics, strict=True):
        for method in METHODS:
            rows = sorted(
                (r for r in report["results"] if r["method"] == method), key=lambda r: r["sources"]
            )
            if method == "average" and 1 in model_at_1:
                rows = [model_at_1[1], *rows]  # with one source averaging is the model itself
            if not rows:
                continue
            ax.plot(
                [r["sources"] for r in rows],
                [r[metric] for r in rows],
                marker="o",
                label=method,
                linestyle="--" if method.startswith("copy") else "-",
            )
        arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
        ax.set_title(f"{metric} ({arrow})", fontsize=10)
        ax.set_xlabel("source images")
        ax.set_xticks(sorted({r["sources"] for r in report["results"]}))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "metrics against the number of sources")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def markdown_table(report: dict[str, Any]) -> str:
    """The aggregated results as a Markdown table (for docs/RESULTS.md)."""
    lines = [
        "| method | sources | PSNR (dB) | L1 (0-255) | SSIM | perceptual | AKD (px) | MKR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} | {r['sources']} | {r['psnr']:.2f} | {r['l1']:.2f} | "
            f"{r['ssim']:.4f} | {r['perceptual']:.4f} | {r['akd']:.2f} | {r['mkr']:.3f} |"
        )
    return "\n".join(lines)


def temporal_summary(report: dict[str, Any]) -> list[str]:
    """What people see over time, one line each: seams, flicker and temporal error (raw and
    with the live paths' keypoint smoothing), and the flow's landmark transfer."""
    t, lines = report["temporal"], []
    if "flicker" in t:
        lines.append(
            f"blockiness {t['blockiness']:.2f} (driving {t['driving_blockiness']:.2f}); "
            f"flicker {t['flicker']:.3f}, temporal error {t['temporal_error']:.3f}; "
            f"with keypoint smoothing {t['flicker_smoothed']:.3f} / "
            f"{t['temporal_error_smoothed']:.3f}"
        )
    lt = report["landmark_transfer"]
    if lt["pairs"]:
        lines.append(
            f"landmark transfer {lt['model_px']:.2f} px (copy-the-source "
            f"{lt['copy_source_px']:.2f} px, {lt['pairs']} pairs)"
        )
    return lines
