"""Evaluate a run: reconstruction quality against the bilinear baseline, codebook use, samples.

`evaluate_run` returns the JSON contract of `vqpix evaluate --json` (see `../shared/DESIGN.md`):
`ssim`, `ssim_foreground`, `baseline_ssim`, `baseline_ssim_foreground`, `ms_ssim`, `psnr`,
`mse`, `perplexity`, `codes_used`, `num_images`, and with a prior `prior_bits_per_code`,
`sample_diversity`, `sample_nn_ssim` beside their real-data reference figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vqpix.data.pipeline import make_dataset
from keras_vqpix.metrics import MS_SSIM_MIN_SIZE, CodebookUsage, bilinear_baseline, image_metrics
from keras_vqpix.run_folder import RunPaths, load_splits, load_vqvae

SPLITS = {"test": "test", "val": "validation", "validation": "validation", "train": "train"}


def _mean(values: list[np.ndarray]) -> float | None:
    values = np.concatenate(values) if values else np.array([])
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def evaluate_reconstructions(
    model, records, image_size: int, batch_size: int, downsample_factor: int
) -> dict:
    """Mean per-image metrics of the model and of the bilinear baseline over `records`.

    Raises:
        ValueError: no records (the model never runs on an empty batch:
            `keras_vqpix.data.pipeline.batch_sizes` says why).
    """
    if not records:
        raise ValueError("there are no slices to evaluate")
    reconstruct = tf.function(lambda images: model(images, training=False))
    usage = CodebookUsage(model.num_embeddings)
    collected: dict[str, list[np.ndarray]] = {}
    for images, _ in make_dataset(records, image_size, batch_size, cache=""):
        outputs = reconstruct(images)
        usage.update_state(outputs["codes"])
        for prefix, candidate in (
            ("", outputs["reconstruction"]),
            ("baseline_", bilinear_baseline(images, downsample_factor)),
        ):
            for name, values in image_metrics(images, candidate).items():
                collected.setdefault(prefix + name, []).append(values)
    metrics = {name: _mean(values) for name, values in collected.items()}
    for prefix in ("", "baseline_"):
        metrics.setdefault(prefix + "ms_ssim", None)
    if metrics["ms_ssim"] is None:
        metrics["ms_ssim_note"] = (
            f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} (five scales of an 11-tap filter); these are {image_size}x{image_size}"
        )
    result = usage.result()
    metrics["perplexity"] = float(result["perplexity"])
    metrics["codes_used"] = int(result["codes_used"])
    metrics["num_images"] = len(records)
    return metrics


def evaluate_run(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    split: str = "test",
    num_samples: int = 0,
    seed: int = 0,
) -> dict:
    """All metrics of a run on one split of `data_root` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of test, val, train. Received: split={split!r}")
    if num_samples < 0:
        raise ValueError(f"--samples must be >= 0. Received: samples={num_samples}")
    paths = RunPaths(Path(run_dir))
    model, config, meta = load_vqvae(paths.root)
    if num_samples and not paths.prior_model.is_file():
        raise ValueError(
            f"--samples {num_samples} needs the prior of {paths.root}, which has none yet; "
            f"run `vqpix train --out {paths.root} --stage prior` first"
        )
    splits = load_splits(data_root, config, paths)
    records = getattr(splits, SPLITS[split])
    metrics = {
        "split": SPLITS[split],
        "image_size": config.data.image_size,
        "downsample_factor": config.vqvae.downsample_factor,
        "num_embeddings": config.vqvae.num_embeddings,
        "vqvae_epoch": meta.get("epoch"),
    }
    metrics.update(
        evaluate_reconstructions(
            model,
            records,
            config.data.image_size,
            config.data.batch_size,
            config.vqvae.downsample_factor,
        )
    )
    if paths.prior_model.is_file():
        from keras_vqpix.sample_quality import evaluate_prior

        metrics.update(
            evaluate_prior(
                paths,
                model,
                meta,
                splits,
                config,
                split=SPLITS[split],
                num_samples=num_samples,
                seed=seed,
            )
        )
    return metrics


def format_metrics(metrics: dict) -> str:
    """A small table: each metric beside its baseline or reference where it has one."""

    def show(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = [
        f"{metrics.get('split', '')} split, {metrics.get('num_images')} images, "
        f"{metrics.get('image_size')}x{metrics.get('image_size')}, codes {metrics.get('image_size', 0) // max(metrics.get('downsample_factor', 1), 1)}^2"
    ]
    lines.append(f"{'metric':<26}{'model':>10}{'baseline':>12}")
    for name in ("ssim_foreground", "ssim", "ms_ssim", "psnr", "mse"):
        if name in metrics:
            lines.append(
                f"{name:<26}{show(metrics[name]):>10}{show(metrics.get('baseline_' + name)):>12}"
            )
    lines.append(f"{'perplexity':<26}{show(metrics.get('perplexity')):>10}")
    lines.append(
        f"{'codes_used':<26}{show(metrics.get('codes_used')):>10}{'/' + str(metrics.get('num_embeddings')):>12}"
    )
    if "prior_bits_per_code" in metrics:
        lines.append(
            f"{'prior_bits_per_code':<26}{show(metrics['prior_bits_per_code']):>10}"
            f"  (uniform prior: {show(metrics.get('max_bits_per_code'))})"
        )
        if "prior_bits_per_code_unconditional" in metrics:
            lines.append(
                f"{'  with label -1':<26}{show(metrics['prior_bits_per_code_unconditional']):>10}"
            )
        if "sample_diversity" in metrics:
            lines.append(f"{'metric':<26}{'samples':>10}{'real data':>12}")
            for name in ("sample_diversity", "sample_nn_ssim"):
                lines.append(
                    f"{name:<26}{show(metrics[name]):>10}{show(metrics.get('real_' + name[len('sample_') :])):>12}"
                )
            lines.append(
                f"diversity: mean pairwise {metrics.get('diversity_metric')} over {metrics.get('num_samples')} samples "
                f"and {metrics.get('num_real')} real slices; nn_ssim: SSIM to the nearest training slice"
            )
    lines.append(
        "baseline: bilinear resize down by the downsampling factor and back up (same latent grid)"
    )
    return "\n".join(lines)
