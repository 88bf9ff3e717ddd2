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
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from keras_vqpix.data.discover import label_name
from keras_vqpix.io import atomic_path


def _figure(rows: int = 1, columns: int = 1, **options):
    """A new figure and its axes (`squeeze` as in `pyplot.subplots`), outside pyplot."""
    figure = Figure(figsize=options.pop("figsize"))
    return figure, figure.subplots(rows, columns, **options)


def _show_slice(axis, image: np.ndarray | None) -> None:
    """A grayscale slice `[H, W, 1]` in [0, 1] on `axis` (None: an empty cell), without ticks."""
    axis.set_xticks([])
    axis.set_yticks([])
    if image is not None:
        axis.imshow(
            np.asarray(image)[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest"
        )


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
            _show_slice(axis, images[c] if c < len(images) else None)
            for spine in axis.spines.values():
                spine.set_visible(False)
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
SAMPLES_SHOWN_PER_CLASS = 16


def samples_vs_real_rows(
    samples: tuple[np.ndarray, np.ndarray],
    real: tuple[np.ndarray, np.ndarray],
) -> list[tuple[str, np.ndarray]]:
    """The rows of `plot_samples_vs_real`: for each class of the samples, up to
    `SAMPLES_SHOWN_PER_CLASS` samples and as many real slices of that class, in rows of
    `SAMPLE_COLUMNS`, each row of samples directly above a row of real slices (a sample label
    of -1, unconditional, is shown beside real slices of every class)."""
    rows = []
    for value in sorted(set(np.asarray(samples[1]).tolist())):
        name = label_name(value)
        drawn = samples[0][samples[1] == value][:SAMPLES_SHOWN_PER_CLASS]
        real_images = (real[0] if value < 0 else real[0][real[1] == value])[: len(drawn)]
        for start in range(0, len(drawn), SAMPLE_COLUMNS):
            stop = start + SAMPLE_COLUMNS
            rows.append((f"{name} samples", drawn[start:stop]))
            rows.append((f"{name} real", real_images[start:stop]))
    return rows


def plot_samples_vs_real(
    samples: tuple[np.ndarray, np.ndarray],
    real: tuple[np.ndarray, np.ndarray],
    path: Path,
    title: str,
) -> Path:
    """Samples of each class beside real slices of that class (`samples_vs_real_rows`).

    Args:
        samples, real: `(images [N, H, W, 1], labels [N])`.
    At most `SAMPLES_SHOWN_PER_CLASS` per class, so the picture stays legible however many
    samples the statistics use.
    """
    return plot_image_rows(samples_vs_real_rows(samples, real), path, title)


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat((np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., None], 3, -1)


def _heat_over(image: np.ndarray, values: np.ndarray, vmax: float) -> np.ndarray:
    """`values` in colour (inferno, 0..vmax) blended over the grayscale `image`, uint8 RGB."""
    colours = colormaps["inferno"](np.clip(values / max(vmax, 1e-12), 0.0, 1.0))[..., :3]
    alpha = np.clip(values / max(vmax, 1e-12), 0.0, 1.0)[..., None] * 0.8
    blended = (1 - alpha) * np.clip(image, 0.0, 1.0)[..., None] + alpha * colours
    return (blended * 255.0).round().astype(np.uint8)


def save_grayscale(path: Path, image: np.ndarray) -> Path:
    """An 8-bit grayscale PNG of a float image in [0, 1] `[H, W]`."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
    return Path(path)


def save_anomaly_overlay(
    path: Path,
    image: np.ndarray,
    healed: np.ndarray,
    residual: np.ndarray,
    surprise: np.ndarray,
    mask: np.ndarray | None = None,
) -> Path:
    """One RGB PNG strip, all `[H, W]`: input | healed | residual over the input | code surprise
    (nats) over the input; a lesion mask, when given, outlined in green on the input."""
    from PIL import Image

    first = _gray_rgb(image)
    if mask is not None:
        edge = mask & ~(
            np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        )
        first[edge] = (0, 255, 0)
    strip = np.concatenate(
        [
            first,
            _gray_rgb(healed),
            _heat_over(image, residual, max(float(np.quantile(residual, 0.999)), 0.1)),
            _heat_over(image, surprise, max(float(surprise.max()), 1.0)),
        ],
        axis=1,
    )
    with atomic_path(path) as tmp:
        Image.fromarray(strip, mode="RGB").save(tmp, format="PNG")
    return Path(path)


def plot_anomaly_examples(path: Path, rows: Sequence[tuple], title: str) -> Path:
    """One row per slice `(input, mask or None, reconstruction, healed, |input - reconstruction|,
    |input - healed|, code surprise)`, all `[H, W]`; the residuals share one colour scale."""
    names = (
        "input (lesion outlined)",
        "VQ-VAE reconstruction",
        "healed (prior)",
        "|input - reconstruction|",
        "|input - healed|",
        "code surprise (nats)",
    )
    figure, axes = _figure(
        max(len(rows), 1),
        len(names),
        figsize=(1.9 * len(names), 2.0 * max(len(rows), 1)),
        squeeze=False,
    )
    for r, (image, mask, reconstruction, healed, baseline, residual, surprise) in enumerate(rows):
        scale = max(float(np.quantile(np.concatenate([baseline, residual]), 0.999)), 0.05)
        panels = (
            (image, "gray", 0.0, 1.0),
            (reconstruction, "gray", 0.0, 1.0),
            (healed, "gray", 0.0, 1.0),
            (baseline, "inferno", 0.0, scale),
            (residual, "inferno", 0.0, scale),
            (surprise, "inferno", 0.0, max(float(surprise.max()), 1.0)),
        )
        for c, (values, cmap, low, high) in enumerate(panels):
            axis = axes[r][c]
            axis.imshow(values, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            if c == 0 and mask is not None and mask.any():
                axis.contour(mask, levels=[0.5], colors="lime", linewidths=0.6)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(names[c], fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def plot_roc_panels(
    panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray]]]],
    rows: Sequence[tuple[str, np.ndarray]],
    path: Path,
    title: str,
) -> Path:
    """ROC panels side by side above rows of images.

    Args:
        panels: `(panel title, [(curve label, false positive rates, true positive rates)])`.
        rows: `(row label, images [N, H, W, 1])`, grayscale in [0, 1]; at most 8 shown per row.
    """
    columns = max([min(8, len(images)) for _, images in rows] + [2 * len(panels)])
    figure = Figure(figsize=(1.6 * columns, 4.0 + 1.7 * len(rows)))
    grid = figure.add_gridspec(1 + len(rows), columns, height_ratios=[4.0] + [1.7] * len(rows))
    span = columns // max(1, len(panels))
    for p, (panel_title, curves) in enumerate(panels):
        axis = figure.add_subplot(grid[0, p * span : (p + 1) * span])
        axis.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        for label, fpr, tpr in curves:
            axis.plot(fpr, tpr, linewidth=1.3, label=label)
        axis.set_title(panel_title, fontsize=9)
        axis.set_xlabel("false positive rate", fontsize=8)
        axis.set_ylabel("true positive rate", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7, loc="lower right")
    for r, (label, images) in enumerate(rows):
        for c in range(min(columns, len(images))):
            axis = figure.add_subplot(grid[1 + r, c])
            axis.imshow(np.asarray(images[c])[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_patient_stacks(
    rows: Sequence[tuple[str, np.ndarray, Sequence[int]]],
    profiles: Sequence[tuple[str, Sequence[float | None]]],
    path: Path,
    title: str,
    tolerance: float | None = None,
) -> Path:
    """Patients slice by slice, one row each, below curves of adjacent-slice SSIM along the stack.

    Args:
        rows: `(row label, images [n, H, W, 1] in [0, 1], slice numbers [n])`; each image is
            titled with its slice number (no titles for an empty list).
        profiles: `(curve label, values)`, entry p the mean SSIM of the pairs at stack position
            p (None: no pair there); a curve without values is named "no stacks". The last
            curve is the reference.
        tolerance: if given, a band of +- `tolerance` around the reference curve.
    """
    columns = max([len(images) for _, images, _ in rows] + [8])
    figure = Figure(figsize=(0.95 * columns, 3.2 + 1.2 * len(rows)))
    grid = figure.add_gridspec(1 + len(rows), columns, height_ratios=[3.2] + [1.2] * len(rows))
    axis = figure.add_subplot(grid[0, :])
    for label, values in profiles:
        points = [(p, v) for p, v in enumerate(values) if v is not None]
        if points:
            positions, scores = zip(*points, strict=True)
            axis.plot(positions, scores, marker="o", markersize=3, linewidth=1.3, label=label)
        else:
            axis.plot([], [], label=f"{label}: no stacks")
    if tolerance is not None and profiles and any(v is not None for v in profiles[-1][1]):
        positions, scores = zip(
            *[(p, v) for p, v in enumerate(profiles[-1][1]) if v is not None], strict=True
        )
        axis.fill_between(
            positions,
            np.asarray(scores) - tolerance,
            np.asarray(scores) + tolerance,
            color="0.85",
            label=f"{profiles[-1][0]} +- {tolerance:g}",
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("pair position p in the stack (slices p and p + 1)", fontsize=8)
    axis.set_ylabel("brain SSIM of adjacent slices", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    for r, (label, images, numbers) in enumerate(rows):
        for c in range(len(images)):
            image_axis = figure.add_subplot(grid[1 + r, c])
            _show_slice(image_axis, images[c])
            if c < len(numbers):
                image_axis.set_title(str(numbers[c]), fontsize=6, pad=2)
            if c == 0:
                image_axis.set_ylabel(label, fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
