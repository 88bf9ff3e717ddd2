"""PNG plots of a run: learning curves, reconstructions, codebook usage and sample grids.

Every figure is written atomically (temporary file, then rename). Figures are made with
`matplotlib.figure.Figure`, not `pyplot`: they render with the Agg canvas whatever backend the
process uses, so plotting works on machines without a display, and importing this module
changes no global matplotlib state (no `matplotlib.use`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from keras_vqpix.data.discover import label_name
from keras_vqpix.io import atomic_path


def _figure(rows: int = 1, columns: int = 1, **options):
    """A new figure and its axes (`squeeze` as in `pyplot.subplots`), outside pyplot."""
    figure = Figure(figsize=options.pop("figsize"))
    return figure, figure.subplots(rows, columns, **options)


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def plot_curves(
    rows: Sequence[dict[str, float]],
    path: Path,
    panels: Sequence[tuple[str, Sequence[str]]],
    title: str,
) -> Path:
    """One panel per `(ylabel, [metric, ...])`, train and `val_` curves per epoch."""
    epochs = [row["epoch"] for row in rows]
    figure, axes = _figure(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (label, names) in zip(axes[0], panels, strict=True):
        for name in names:
            for prefix, style in (("", "-"), ("val_", "--")):
                values = [row.get(prefix + name, np.nan) for row in rows]
                if np.all(np.isnan(np.asarray(values, dtype=float))):
                    continue
                axis.plot(
                    epochs,
                    values,
                    style,
                    marker="o",
                    markersize=3,
                    label=f"{'validation' if prefix else 'train'} {name}",
                )
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_image_rows(
    rows: Sequence[tuple[str, np.ndarray]],
    path: Path,
    title: str,
    column_titles: Sequence[str] | None = None,
) -> Path:
    """A grid with one row per `(row label, images [N, H, W, 1])`, grayscale in [0, 1]."""
    columns = max(len(images) for _, images in rows)
    figure, axes = _figure(
        len(rows), columns, figsize=(1.6 * columns, 1.7 * len(rows)), squeeze=False
    )
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if c < len(images):
                axis.imshow(
                    np.asarray(images[c])[..., 0],
                    cmap="gray",
                    vmin=0.0,
                    vmax=1.0,
                    interpolation="nearest",
                )
            if c == 0:
                axis.set_ylabel(label, fontsize=8)
            if r == 0 and column_titles is not None and c < len(column_titles):
                axis.set_title(column_titles[c], fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_reconstructions(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    path: Path,
    title: str,
    ssim: Sequence[float] | None = None,
) -> Path:
    """Originals above, reconstructions below (with each one's foreground SSIM if given)."""
    titles = [f"SSIM_fg {value:.3f}" for value in ssim] if ssim is not None else None
    return plot_image_rows(
        [("original", originals), ("reconstruction", reconstructions)], path, title, titles
    )


def plot_codebook_usage(counts: np.ndarray, path: Path, title: str) -> Path:
    """Histogram of how often each code is used, sorted by frequency."""
    counts = np.asarray(counts, dtype=float)
    order = np.sort(counts)[::-1]
    used = int((counts > 0).sum())
    probabilities = counts / max(counts.sum(), 1.0)
    nonzero = probabilities[probabilities > 0]
    perplexity = float(np.exp(-(nonzero * np.log(nonzero)).sum()))
    figure, axis = _figure(figsize=(7, 3))
    axis.bar(np.arange(len(order)), order, width=1.0, color="tab:blue")
    axis.set_xlabel("code (sorted by use)")
    axis.set_ylabel("assignments")
    axis.set_title(
        f"{title}: {used}/{len(counts)} codes used, perplexity {perplexity:.1f}", fontsize=10
    )
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return _save(figure, path)


SAMPLE_COLUMNS = 8


def plot_samples_vs_real(
    samples: tuple[np.ndarray, np.ndarray],
    real: tuple[np.ndarray, np.ndarray],
    path: Path,
    title: str,
) -> Path:
    """For each class of the samples, a row of samples above a row of real slices.

    Args:
        samples, real: `(images [N, H, W, 1], labels [N])`; a sample label of -1
            (unconditional) is shown above all real slices.
    Rows show at most `SAMPLE_COLUMNS` images each, so the picture stays legible however many
    samples the statistics use.
    """
    rows = []
    for value in sorted(set(np.asarray(samples[1]).tolist())):
        name = label_name(value)
        rows.append((f"{name} samples", samples[0][samples[1] == value][:SAMPLE_COLUMNS]))
        real_images = real[0] if value < 0 else real[0][real[1] == value]
        rows.append((f"{name} real", real_images[:SAMPLE_COLUMNS]))
    return plot_image_rows(rows, path, title)
