"""Evaluate a run: reconstruction quality against the bilinear baseline, codebook use, samples.

`evaluate_run` returns the JSON contract of `vqpix evaluate --json` (see `../shared/DESIGN.md`):
`ssim`, `ssim_foreground`, `baseline_ssim`, `baseline_ssim_foreground`, `ms_ssim`, `psnr`,
`mse`, `perplexity`, `codes_used`, `num_images`, and with a prior `prior_bits_per_code`,
`sample_diversity`, `sample_nn_ssim` beside their real-data reference figures; besides them
`external`, `data` and `num_patients` say which slices were evaluated.

External validation: a data folder that is not the run's own data (its patients differ from
`RUN/split.json`) is evaluated as external data, every slice of its `test/` folder (or of the
whole folder), with no train/validation split of its own. `evaluation_records` makes that choice
for every command that evaluates a run on a `--data` folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import (
    CLASS_NAMES,
    SPLIT_FOLDERS,
    DatasetLayoutError,
    DataSplits,
    SliceRecord,
    discover_folder,
    discover_records,
)
from keras_vqpix.data.pipeline import make_dataset
from keras_vqpix.data.screen import unreadable_files
from keras_vqpix.metrics import MS_SSIM_MIN_SIZE, CodebookUsage, bilinear_baseline, image_metrics
from keras_vqpix.run_folder import (
    RunFolderError,
    RunPaths,
    load_splits,
    load_vqvae,
    read_config,
    read_json,
)

SPLITS = {
    "test": "test",
    "val": "validation",
    "validation": "validation",
    "train": "train",
    "all": "all",
}


@dataclass(frozen=True)
class EvaluationData:
    """The slices of a data folder that a command about a run evaluates (`evaluation_records`).

    Attributes:
        records: the slices, sorted by patient then slice.
        split: "test", "validation" or "train" of the run's own data; "test" or "all" (every
            slice of the folder) of external data.
        external: the folder is not the data the run was trained on.
        data_root: the data folder, as given.
        splits: the run's own `DataSplits` (None for external data).
        skipped: `(path, reason)` of the unreadable files left out.
    """

    records: tuple[SliceRecord, ...]
    split: str
    external: bool
    data_root: Path
    splits: DataSplits | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """E.g. `external data /x (test/): 40 images of 2 patients (NC 20, AD 20)`."""
        where = {"all": "every slice", "validation": "validation split"}.get(
            self.split, f"{self.split}/" if self.external else f"{self.split} split"
        )
        counts = ", ".join(
            f"{name} {sum(r.label == index for r in self.records)}"
            for index, name in enumerate(CLASS_NAMES)
        )
        head = f"external data {self.data_root} ({where})" if self.external else where
        patients = len({r.patient for r in self.records})
        return f"{head}: {len(self.records)} images of {patients} patients ({counts})"


def evaluation_records(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    split: str = "test",
    config: RunConfig | None = None,
) -> EvaluationData:
    """The slices of `data_root` to evaluate the run in `run_dir` on, and whether they are external.

    The run's own data (its patients are those of `RUN/split.json`) is split as in training and
    `split` picks "test", "val"/"validation" or "train"; the data must not have changed since.
    Any other folder in the ADNI layout is external data: `split="test"` takes every slice of
    its `test/` folder, `split="all"` every slice of the folder; any number of patients and
    classes will do, and it needs no validation split. Unreadable files are left out (listed in
    `skipped`).

    Args:
        run_dir: the run folder.
        data_root: an ADNI-layout folder.
        split: "test", "val", "validation", "train" or "all".
        config: the run's config (default: read from `run_dir`).

    Raises:
        ValueError: an unknown split; "val"/"train" of external data (it has no such split of
            the run); "all" of the run's own data (it would mix training slices into the figures);
            external data holding patients the run was trained or validated on.
        DatasetLayoutError: the folder, or the part of it asked for, is not in the layout.

    A run folder without `split.json` (written by every `vqpix train`) cannot tell its own data
    from another folder: its data is taken as its own, as before external validation existed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of test, val, train, all. Received: split={split!r}")
    split = SPLITS[split]
    paths = RunPaths(Path(run_dir))
    config = config or read_config(paths)
    data_root = Path(data_root)
    recorded = read_json(paths.split) if paths.split.is_file() else None
    if recorded is None or _same_patients(data_root, recorded):
        if split == "all":
            raise ValueError(
                f"{data_root} is the data {paths.root} was trained on: --split all would mix its "
                "training slices into the figures; choose --split test, val or train"
            )
        splits = load_splits(data_root, config, paths)
        return EvaluationData(
            getattr(splits, split), split, False, data_root, splits, splits.skipped
        )
    if split in ("train", "validation"):
        raise ValueError(
            f"{data_root} is not the data {paths.root} was trained on (its patients differ from "
            f"{paths.split}), so it has no {split} split of that run; evaluate its test/ folder "
            "(--split test) or every slice in it (--split all)"
        )
    records, skipped = discover_records(
        data_root, ("test",) if split == "test" else None, unreadable=unreadable_files
    )
    seen = set(recorded.get("train", [])) | set(recorded.get("validation", []))
    known = sorted({r.patient for r in records} & seen)
    if known:
        raise RunFolderError(
            f"{len(known)} of the patients in {data_root} (e.g. {known[0]!r}) are among those "
            f"{paths.root} was trained or validated on ({paths.split}); external data must hold "
            "patients the model never saw"
        )
    return EvaluationData(records, split, True, data_root, None, skipped)


def _same_patients(data_root: Path, recorded: dict) -> bool:
    """Whether the patients of `data_root/{train,test}` are those of a run's `split.json`."""
    expected = {
        "train": set(recorded.get("train", [])) | set(recorded.get("validation", [])),
        "test": set(recorded.get("test", [])),
    }
    for folder in SPLIT_FOLDERS:
        try:
            patients = {r.patient for r in discover_folder(data_root, folder)}
        except DatasetLayoutError:  # e.g. no train/: not the run's data
            return False
        if patients != expected[folder]:
            return False
    return True


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
    # One trace for every batch, the last (smaller) one included.
    reconstruct = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.float32)],
    )
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
    """All metrics of a run on one split of `data_root` (see the module docstring).

    `split` is as in `evaluation_records`: a folder that is not the run's own data is evaluated
    as external data (`"external": true`), on its `test/` folder or, with `split="all"`, on
    every slice. `num_samples` needs the run's own data (samples are compared with its slices).
    """
    if num_samples < 0:
        raise ValueError(f"--samples must be >= 0. Received: samples={num_samples}")
    paths = RunPaths(Path(run_dir))
    if num_samples and not paths.prior_model.is_file():
        raise ValueError(
            f"--samples {num_samples} needs the prior of {paths.root}, which has none yet; "
            f"run `vqpix train --out {paths.root} --stage prior` first"
        )
    data = evaluation_records(paths.root, data_root, split)
    if num_samples and data.external:
        raise ValueError(
            f"--samples compares the prior's samples with the slices {paths.root} was trained on; "
            f"{data_root} is external data (its patients differ from {paths.split}): draw them "
            "with the run's own --data"
        )
    model, config, meta = load_vqvae(paths.root)
    metrics = {
        "split": data.split,
        "external": data.external,
        "data": str(data.data_root.resolve()),
        "num_patients": len({r.patient for r in data.records}),
        "image_size": config.data.image_size,
        "downsample_factor": config.vqvae.downsample_factor,
        "num_embeddings": config.vqvae.num_embeddings,
        "vqvae_epoch": meta.get("epoch"),
        "description": data.describe(),
    }
    if data.skipped:
        metrics["skipped_files"] = [[path, reason] for path, reason in data.skipped]
    metrics.update(
        evaluate_reconstructions(
            model,
            data.records,
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
                data.records,
                config,
                split=data.split,
                train_records=data.splits.train if data.splits else (),
                cache_codes=not data.external,
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

    head = metrics.get("description") or (
        f"{metrics.get('split', '')} split, {metrics.get('num_images')} images"
    )
    lines = [
        f"{head}, {metrics.get('image_size')}x{metrics.get('image_size')}, codes {metrics.get('image_size', 0) // max(metrics.get('downsample_factor', 1), 1)}^2"
    ]
    if metrics.get("external"):
        lines.append(
            "external validation: not the data the run was trained on (its patients differ from split.json)"
        )
    if metrics.get("skipped_files"):
        lines.append(f"left out {len(metrics['skipped_files'])} files that cannot be read")
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
        if "prior_bits_per_code_single_slice" in metrics:  # a prior that reads the previous slice
            lines.append(
                f"{'  each slice on its own':<26}"
                f"{show(metrics['prior_bits_per_code_single_slice']):>10}"
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
