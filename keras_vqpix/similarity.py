"""Image-set similarity shared by `vqpix evaluate --samples` and `vqpix compare`.

- `ssim_matrix_max`: each query's SSIM (`tf.image.ssim`) to its nearest reference, exactly;
  `nearest_ssim` the same after an L2 pre-selection of candidates, for large sets.
- `pairwise_diversity`: mean over pairs of `1 - MS-SSIM` (`1 - SSIM` below 161 px).
- `memorisation_share`: the share of synthetic images closer (nearest-neighbour SSIM) to the
  training set than the `percentile`-th real *unseen* image is, the memorisation figure of
  `vqpix compare` (5% at the 95th percentile: no closer than real unseen slices).
- `stack_consistency`: how alike neighbouring slices of each patient's stack are (brain SSIM of
  every consecutive pair), overall and along the stack; `profile_gap` compares two profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from keras_vqpix.data.stacks import consecutive_pairs
from keras_vqpix.metrics import (
    MS_SSIM_MIN_SIZE,
    SSIM_FILTER_SIZE,
    fast_ssim_per_image,
    ssim_foreground_symmetric,
)

_SSIM_SIGMA = 1.5
_PAIR_PIXELS = 1 << 23  # pixels of the image pairs compared at once (32 MB of float32)


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


def nearest_ssim(
    queries: np.ndarray,
    references: np.ndarray,
    exclude: np.ndarray | None = None,
    *,
    candidates: int = 32,
) -> np.ndarray:
    """Each query's highest SSIM to a reference, searched among its `candidates` L2-nearest: `[N]`.

    With more than `4 * candidates` references, the candidates are the references nearest in
    Euclidean distance after a 4x average pooling (a copy or a near copy is always among them),
    and SSIM is computed for those pairs only: the cost grows with N * candidates instead of
    N * M. With fewer references this is `ssim_matrix_max` exactly.

    Args:
        queries: `[N, H, W, 1]` in [0, 1].
        references: `[M, H, W, 1]` in [0, 1].
        exclude: optional `[N]` reference index to skip for each query (-1: none).
        candidates: references compared by SSIM per query.
    """
    queries = np.asarray(queries, np.float32)
    references = np.asarray(references, np.float32)
    if len(references) <= 4 * candidates or not len(queries):
        return ssim_matrix_max(queries, references, exclude)
    pool = max(1, min(4, min(queries.shape[1:3]) // 8))

    def pooled(images):
        flat = tf.nn.avg_pool2d(images, pool, pool, "VALID").numpy().reshape(len(images), -1)
        return flat, np.sum(flat * flat, axis=1)

    reference_flat, reference_norm = pooled(references)
    chosen = np.empty((len(queries), candidates), np.int64)
    for start in range(0, len(queries), 256):
        query_flat, query_norm = pooled(queries[start : start + 256])
        distance = query_norm[:, None] + reference_norm[None] - 2 * query_flat @ reference_flat.T
        if exclude is not None:
            for row, skip in enumerate(exclude[start : start + 256]):
                if skip >= 0:
                    distance[row, skip] = np.inf
        chosen[start : start + 256] = np.argpartition(distance, candidates, axis=1)[:, :candidates]
    best = np.empty(len(queries), np.float32)
    per_block = max(1, _PAIR_PIXELS // (int(np.prod(queries.shape[1:])) * candidates))
    for start in range(0, len(queries), per_block):
        block = chosen[start : start + per_block]
        pairs_a = np.repeat(queries[start : start + per_block], candidates, axis=0)
        pairs_b = references[block.reshape(-1)]
        scores = fast_ssim_per_image(tf.constant(pairs_a), tf.constant(pairs_b)).numpy()
        best[start : start + len(block)] = scores.reshape(len(block), candidates).max(axis=1)
    return best


def memorisation_share(
    synthetic_nn_ssim: np.ndarray, real_nn_ssim: np.ndarray, percentile: float = 95.0
) -> float | None:
    """Share of synthetic images whose nearest-training SSIM exceeds real unseen images' `percentile`.

    `real_nn_ssim` holds the same figure for real images the generator never saw (real test
    slices against the real training slices): by construction `1 - percentile / 100` of
    those lie above the threshold, so that share (5%) means "no closer than real unseen
    slices" and 1.0 means every synthetic image is a near copy. None without real figures.
    """
    synthetic_nn_ssim = np.asarray(synthetic_nn_ssim, np.float64)
    real_nn_ssim = np.asarray(real_nn_ssim, np.float64)
    if not len(real_nn_ssim) or not len(synthetic_nn_ssim):
        return None
    threshold = np.percentile(real_nn_ssim, percentile)
    return float(np.mean(synthetic_nn_ssim > threshold))


# -- Stacks of consecutive slices ------------------------------------------------------------------
@dataclass(frozen=True)
class StackConsistency:
    """Brain SSIM of consecutive slices of each patient (`stack_consistency`).

    Attributes:
        mean: the mean over patients of each patient's mean pair SSIM (every patient counts
            once, however long its stack); None without a pair.
        profile: entry p is the mean SSIM of the pairs at position p of their stacks (the pair
            of slices `first + p` and `first + p + 1`, `first` the patient's lowest slice number),
            over the patients that have that pair; None where no patient has one.
        profile_patients: entry p is how many patients have a pair at position p.
        patients: patients with at least one pair.
        pairs: pairs in all.
    """

    mean: float | None
    profile: list[float | None]
    profile_patients: list[int]
    patients: int
    pairs: int


def stack_consistency(
    images: np.ndarray, patients: np.ndarray, slices: np.ndarray, *, batch_size: int = 256
) -> StackConsistency:
    """Brain SSIM (`ssim_foreground_symmetric`) of every consecutive pair of each patient's slices.

    A synthetic data set of single-slice patients (each slice drawn on its own) has no pair:
    `mean` is None and the profile empty. Real stacks of one brain score high and evenly along
    the stack; slices of different brains, or shuffled within a patient, score far lower.

    Args:
        images: `[N, H, W, 1]` in [0, 1].
        patients: `[N]` patient ids.
        slices: `[N]` slice numbers (the `<slice>` of `<patient>_<slice>.jpeg`).
        batch_size: pairs compared at once.
    """
    first, second, position = consecutive_pairs(patients, slices)
    if not len(first):
        return StackConsistency(None, [], [], 0, 0)
    images = np.asarray(images, np.float32)
    scores = np.concatenate(
        [
            ssim_foreground_symmetric(
                images[first[i : i + batch_size]], images[second[i : i + batch_size]]
            ).numpy()
            for i in range(0, len(first), batch_size)
        ]
    ).astype(np.float64)
    # A pair of blank slices (no head in either) has no brain to compare: it is left out.
    known = ~np.isnan(scores)
    if not known.any():
        return StackConsistency(None, [], [], 0, 0)
    first, position, scores = first[known], position[known], scores[known]
    names, index = np.unique(np.asarray(patients)[first], return_inverse=True)
    per_patient = np.bincount(index, scores) / np.bincount(index)
    counts = np.bincount(position)
    sums = np.bincount(position, scores)
    return StackConsistency(
        mean=float(np.mean(per_patient)),
        # None at a position that every patient's stack skips (a gap shared by all).
        profile=[
            float(total / count) if count else None
            for total, count in zip(sums, counts, strict=True)
        ],
        profile_patients=[int(count) for count in counts],
        patients=len(names),
        pairs=len(first),
    )


def profile_gap(profile: list, reference: list) -> float | None:
    """The largest `|profile[p] - reference[p]|` over the positions both have; None if none."""
    gaps = [
        abs(value - other)
        for value, other in zip(profile, reference, strict=False)  # positions both have
        if value is not None and other is not None
    ]
    return max(gaps) if gaps else None
