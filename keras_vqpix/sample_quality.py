"""How good are the prior's samples: bits per code, diversity and memorisation beside real slices.

`evaluate_prior` adds to `vqpix evaluate`:

- `prior_bits_per_code`: cross-entropy of the evaluated split's code maps under the prior (its
  own labels), in bits per code; `max_bits_per_code` = log2 K is what a uniform prior scores.
  For a conditional prior also `prior_bits_per_code_unconditional` (label -1). For a prior
  that reads the previous slice, the bits of the split's patients as stacks
  (`split_bits_per_code`), and `prior_bits_per_code_single_slice`.
- With N samples (`--samples N`): `sample_diversity`, the mean over all pairs of samples of
  `1 - MS-SSIM` (or `1 - SSIM` when the images are smaller than 161 px, where MS-SSIM cannot
  run; `diversity_metric` says which), and `sample_nn_ssim`, the mean over samples of the SSIM
  to the nearest training slice (near 1: the prior memorised training slices). Beside them
  `real_diversity` and `real_nn_ssim`: the same figures for N real slices of the evaluated
  split (of the same classes as the samples, spread over patients), so a reader sees whether
  samples are as varied as real brains and no closer to the training set than real brains are.
  `sample_memorisation`: the share of samples nearer to a training slice than the 95th
  percentile of the real slices' figure (`keras_vqpix.similarity.memorisation_share`, the
  `memorisation` of `vqpix compare`); about 0.05 when samples are no closer than real slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_vqpix import plots
from keras_vqpix.codes import cached_codes, encode_records
from keras_vqpix.data.discover import SliceRecord, spread_records
from keras_vqpix.data.pipeline import load_images
from keras_vqpix.models.pixelcnn import bits_per_code, max_bits_per_code, split_bits_per_code
from keras_vqpix.run_folder import load_prior
from keras_vqpix.sampling import decode_codes, resolve_labels, sample_codes
from keras_vqpix.similarity import (
    memorisation_share,
    pairwise_diversity,
    ssim_matrix_max,
)


# -- Choosing real slices ---------------------------------------------------------------------------
def real_counterparts(records: Sequence[SliceRecord], labels: np.ndarray) -> list[SliceRecord]:
    """Real records matching sample `labels`: as many of each class, or spread over all for -1."""
    chosen: list[SliceRecord] = []
    for value in sorted(set(np.asarray(labels).tolist())):
        count = int(np.sum(labels == value))
        pool = records if value < 0 else [r for r in records if r.label == value]
        chosen += spread_records(pool, count)
    return chosen


# -- Samples beside real slices (for the pictures) ------------------------------------------------
def samples_beside_real(
    prior,
    vqvae,
    records: Sequence[SliceRecord],
    image_size: int,
    *,
    samples_per_class: int,
    seed: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`(samples, real)`, each `(images, labels)`: what `plots.plot_samples_vs_real` shows.

    `samples_per_class` samples per class drawn with `seed` (unconditional prior: one group of
    twice as many, label -1), and as many real slices of `records` chosen with
    `real_counterparts`.
    """
    if prior.conditional:
        labels = np.repeat(np.arange(prior.num_classes, dtype=np.int32), samples_per_class)
    else:
        labels = np.full(2 * samples_per_class, -1, np.int32)
    samples = (decode_codes(vqvae, sample_codes(prior, len(labels), seed, labels)), labels)
    chosen = real_counterparts(records, labels)
    real = (load_images(chosen, image_size), np.array([r.label for r in chosen]))
    return samples, real


# -- vqpix evaluate --samples ---------------------------------------------------------------------
def evaluate_prior(
    paths,
    model,
    meta: dict,
    records: Sequence[SliceRecord],
    config,
    *,
    split: str = "test",
    train_records: Sequence[SliceRecord] = (),
    cache_codes: bool = True,
    num_samples: int = 0,
    seed: int = 0,
) -> dict:
    """Prior metrics of a run on the evaluated records (see the module docstring).

    Args:
        paths: the run's `RunPaths`.
        model, meta: the VQ-VAE and its metadata from `load_vqvae`.
        records: the evaluated slices.
        config: the run's `RunConfig`.
        split: the records' split ("train", "validation", "test"; for external data "test"
            or "all"): names the code cache and the plot.
        train_records: the run's training slices (for `sample_nn_ssim`; needed with samples).
        cache_codes: keep the records' code maps in `RUN/codes/<split>.npz` (the run's own
            splits); external data is encoded without touching the run folder.
        num_samples: samples to draw (0: bits per code only); half NC, half AD for a
            conditional prior.
        seed: sampling seed.
    """
    if num_samples < 0:
        raise ValueError(f"--samples must be >= 0. Received: samples={num_samples}")
    if num_samples and not train_records:
        raise ValueError("sample statistics need the run's training slices (train_records)")
    prior, prior_meta = load_prior(paths.root, meta)
    if cache_codes:
        codes, labels = cached_codes(paths, split, model, meta["fingerprint"], records, config)
    else:
        codes, labels = encode_records(model, records, config)
    batch_size = config.prior.batch_size
    metrics = {
        "prior_epoch": prior_meta.get("epoch"),
        **{
            f"prior_{name}": value
            for name, value in split_bits_per_code(
                prior, codes, labels, records, batch_size
            ).items()
        },
        "max_bits_per_code": max_bits_per_code(prior.num_embeddings),
    }
    if prior.conditional:
        metrics["prior_bits_per_code_unconditional"] = bits_per_code(prior, codes, None, batch_size)
    if not num_samples:
        return metrics

    sample_labels = resolve_labels(prior, num_samples)
    samples = decode_codes(model, sample_codes(prior, num_samples, seed, sample_labels))
    chosen = real_counterparts(records, sample_labels)
    real = load_images(chosen, config.data.image_size)
    train_paths = [r.path for r in train_records]
    train_images = load_images(train_records, config.data.image_size)
    exclude = np.array([train_paths.index(r.path) if r.path in train_paths else -1 for r in chosen])
    sample_diversity, diversity_metric = pairwise_diversity(samples)
    real_diversity, _ = pairwise_diversity(real)
    sample_nn = ssim_matrix_max(samples, train_images)
    real_nn = ssim_matrix_max(real, train_images, exclude) if len(real) else np.zeros(0)
    metrics.update(
        {
            "num_samples": num_samples,
            "num_real": len(chosen),
            "sample_seed": seed,
            "diversity_metric": diversity_metric,
            "sample_diversity": sample_diversity,
            "real_diversity": real_diversity,
            "sample_nn_ssim": float(np.mean(sample_nn)),
            "real_nn_ssim": float(np.mean(real_nn)) if len(real) else None,
            "sample_memorisation": memorisation_share(sample_nn, real_nn),
        }
    )
    plots.plot_samples_vs_real(
        (samples, sample_labels),
        (real, np.array([r.label for r in chosen])),
        paths.plots / "samples_vs_real.png",
        f"Samples (seed {seed}) beside real {split} slices",
    )
    return metrics
