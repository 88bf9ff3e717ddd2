"""How good are the prior's samples: bits per code, diversity and memorisation beside real slices.

`evaluate_prior` adds to `vqpix evaluate`:

- `prior_bits_per_code`: cross-entropy of the evaluated split's code maps under the prior (its
  own labels), in bits per code; `max_bits_per_code` = log2 K is what a uniform prior scores.
  For a conditional prior also `prior_bits_per_code_unconditional` (label -1).
- With N samples (`--samples N`): `sample_diversity`, the mean over all pairs of samples of
  `1 - MS-SSIM` (or `1 - SSIM` when the images are smaller than 161 px, where MS-SSIM cannot
  run; `diversity_metric` says which), and `sample_nn_ssim`, the mean over samples of the SSIM
  to the nearest training slice (near 1: the prior memorised training slices). Beside them
  `real_diversity` and `real_nn_ssim`: the same figures for N real slices of the evaluated
  split (of the same classes as the samples, spread over patients), so a reader sees whether
  samples are as varied as real brains and no closer to the training set than real brains are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_vqpix import plots
from keras_vqpix.codes import cached_codes, encode_records
from keras_vqpix.data.discover import SliceRecord
from keras_vqpix.data.pipeline import make_dataset
from keras_vqpix.metrics import MS_SSIM_MIN_SIZE, SSIM_FILTER_SIZE, fast_ssim_per_image
from keras_vqpix.models.pixelcnn import bits_per_code, max_bits_per_code
from keras_vqpix.run_folder import load_prior
from keras_vqpix.sampling import decode_codes, resolve_labels, sample_codes

_SSIM_SIGMA = 1.5
_PAIR_PIXELS = 1 << 23  # pixels of the image pairs compared at once (32 MB of float32)


# -- Choosing real slices ---------------------------------------------------------------------------
def spread_records(records: Sequence[SliceRecord], count: int) -> list[SliceRecord]:
    """`count` records spread over patients, deterministically.

    Round robin over the patients (sorted by id): first each patient's middle slice, then the
    slices next to the middle, and so on; so N records cover min(N, patients) patients.
    """
    by_patient: dict[str, list[SliceRecord]] = defaultdict(list)
    for record in records:
        by_patient[record.patient].append(record)
    queues = []
    for patient in sorted(by_patient):
        slices = sorted(by_patient[patient], key=lambda r: (r.slice_index, r.path))
        middle = (len(slices) - 1) / 2
        queues.append(
            sorted(slices, key=lambda r, s=slices: (abs(s.index(r) - middle), s.index(r)))
        )
    chosen = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [queue[depth] for queue in queues if depth < len(queue)]
    return chosen[:count]


def real_counterparts(records: Sequence[SliceRecord], labels: np.ndarray) -> list[SliceRecord]:
    """Real records matching sample `labels`: as many of each class, or spread over all for -1."""
    chosen: list[SliceRecord] = []
    for value in sorted(set(np.asarray(labels).tolist())):
        count = int(np.sum(labels == value))
        pool = records if value < 0 else [r for r in records if r.label == value]
        chosen += spread_records(pool, count)
    return chosen


def load_images(
    records: Sequence[SliceRecord], image_size: int, batch_size: int = 64
) -> np.ndarray:
    """Images `[N, S, S, 1]` float32 of `records`, in order."""
    if not records:
        return np.zeros((0, image_size, image_size, 1), np.float32)
    return np.concatenate(
        [images.numpy() for images, _ in make_dataset(records, image_size, batch_size, cache="")]
    )


# -- SSIM statistics --------------------------------------------------------------------------------
def _blur(images):
    """The 11x11 Gaussian (sigma 1.5) of `tf.image.ssim`, separable and VALID: `[N, H-10, W-10, 1]`."""
    offsets = tf.range(SSIM_FILTER_SIZE, dtype=tf.float32) - (SSIM_FILTER_SIZE - 1) / 2
    taps = tf.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    taps = taps / tf.reduce_sum(taps)
    images = tf.nn.conv2d(images, tf.reshape(taps, [1, -1, 1, 1]), 1, "VALID")
    return tf.nn.conv2d(images, tf.reshape(taps, [-1, 1, 1, 1]), 1, "VALID")


@tf.function(reduce_retracing=True)
def _ssim_block(queries, query_mu, query_sq, references, reference_mu, reference_sq):
    """SSIM `[q, r]` of every query against every reference, from their cached local moments."""
    q, r = tf.shape(queries)[0], tf.shape(references)[0]
    products = queries[:, None] * references[None, :]  # [q, r, H, W, 1]
    shape = tf.shape(products)
    xy = _blur(tf.reshape(products, tf.concat([[q * r], shape[2:]], 0)))
    xy = tf.reshape(xy, tf.concat([[q, r], tf.shape(xy)[1:]], 0))
    mu_x, mu_y = query_mu[:, None], reference_mu[None, :]
    c1, c2 = 0.01**2, 0.03**2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * (xy - mu_x * mu_y) + c2) / (
        query_sq[:, None] - mu_x**2 + reference_sq[None, :] - mu_y**2 + c2
    )
    return tf.reduce_mean(luminance * contrast_structure, axis=[2, 3, 4])


def ssim_matrix_max(
    queries: np.ndarray, references: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """For each query image, the highest SSIM (`tf.image.ssim`, max_val 1) to any reference: `[N]`.

    Batched in TF: the references' local means and squares are computed once per chunk, so
    each (query, reference) pair costs one blurred product instead of five blurred moments.

    Args:
        queries: `[N, H, W, 1]` in [0, 1].
        references: `[M, H, W, 1]` in [0, 1].
        exclude: optional `[N]` reference index to skip for each query (-1: none), e.g. the
            query itself when queries are drawn from the references.
    """
    queries = tf.constant(np.asarray(queries, np.float32))
    references = np.asarray(references, np.float32)
    pixels = int(np.prod(queries.shape[1:]))
    query_mu, query_sq = _blur(queries), _blur(queries * queries)
    count = int(queries.shape[0])
    query_block = max(1, min(count, _PAIR_PIXELS // (pixels * 64)))
    reference_block = max(1, _PAIR_PIXELS // (pixels * query_block))
    best = np.full(count, -np.inf, np.float32)
    for start in range(0, len(references), reference_block):
        chunk = tf.constant(references[start : start + reference_block])
        chunk_mu, chunk_sq = _blur(chunk), _blur(chunk * chunk)
        for q in range(0, count, query_block):
            block = _ssim_block(
                queries[q : q + query_block],
                query_mu[q : q + query_block],
                query_sq[q : q + query_block],
                chunk,
                chunk_mu,
                chunk_sq,
            ).numpy()
            if exclude is not None:
                for row, skip in enumerate(exclude[q : q + query_block]):
                    if start <= skip < start + len(chunk):
                        block[row, skip - start] = -np.inf
            best[q : q + query_block] = np.maximum(best[q : q + query_block], block.max(axis=1))
    return best


def pairwise_diversity(images: np.ndarray) -> tuple[float | None, str]:
    """Mean over all pairs of `1 - MS-SSIM` (or `1 - SSIM` below 161 px), and which it was.

    None when there are fewer than two images.
    """
    images = np.asarray(images, np.float32)
    size = min(images.shape[1:3])
    name = "1 - MS-SSIM" if size >= MS_SSIM_MIN_SIZE else "1 - SSIM"
    first, second = np.triu_indices(len(images), k=1)
    if not len(first):
        return None, name
    step = max(1, _PAIR_PIXELS // int(np.prod(images.shape[1:])))
    scores = []
    for start in range(0, len(first), step):
        a = tf.constant(images[first[start : start + step]])
        b = tf.constant(images[second[start : start + step]])
        score = (
            tf.image.ssim_multiscale(a, b, 1.0)
            if size >= MS_SSIM_MIN_SIZE
            else fast_ssim_per_image(a, b)
        )
        scores.append(score.numpy())
    return float(np.mean(1.0 - np.concatenate(scores))), name


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
        "prior_bits_per_code": bits_per_code(prior, codes, labels, batch_size),
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
    metrics.update(
        {
            "num_samples": num_samples,
            "num_real": len(chosen),
            "sample_seed": seed,
            "diversity_metric": diversity_metric,
            "sample_diversity": sample_diversity,
            "real_diversity": real_diversity,
            "sample_nn_ssim": float(np.mean(ssim_matrix_max(samples, train_images))),
            "real_nn_ssim": float(np.mean(ssim_matrix_max(real, train_images, exclude)))
            if len(real)
            else None,
        }
    )
    plots.plot_samples_vs_real(
        (samples, sample_labels),
        (real, np.array([r.label for r in chosen])),
        paths.plots / "samples_vs_real.png",
        f"Samples (seed {seed}) beside real {split} slices",
    )
    return metrics
