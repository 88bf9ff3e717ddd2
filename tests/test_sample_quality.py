"""Sample statistics: nearest-neighbour SSIM, pairwise diversity, choosing real slices."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_vqpix.data.discover import SliceRecord, spread_records
from keras_vqpix.sample_quality import real_counterparts
from keras_vqpix.similarity import (
    memorisation_share,
    nearest_ssim,
    pairwise_diversity,
    ssim_matrix_max,
)


def smooth_images(count: int, size: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(count, size // 4, size // 4, 1)).astype(np.float32)
    return tf.image.resize(images, (size, size)).numpy().clip(0, 1)


def test_nearest_ssim_equals_brute_force_tf_image_ssim():
    queries, references = smooth_images(5, seed=1), smooth_images(13, seed=2)
    brute = np.array(
        [tf.image.ssim(np.repeat(q[None], 13, 0), references, 1.0).numpy().max() for q in queries]
    )
    np.testing.assert_allclose(ssim_matrix_max(queries, references), brute, atol=1e-5)
    # A query among the references finds itself unless excluded.
    np.testing.assert_allclose(ssim_matrix_max(references[:3], references), 1.0, atol=1e-5)
    excluded = ssim_matrix_max(references[:3], references, exclude=np.array([0, 1, 2]))
    assert (excluded < 0.999).all()


def test_pairwise_diversity():
    images = smooth_images(4)
    value, name = pairwise_diversity(images)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([1 - tf.image.ssim(images[i], images[j], 1.0).numpy() for i, j in pairs])
    assert name == "1 - SSIM" and abs(value - expected) < 1e-5
    assert pairwise_diversity(np.repeat(images[:1], 3, 0))[0] < 1e-6
    assert pairwise_diversity(images[:1])[0] is None
    large = np.repeat(smooth_images(2, size=168), 1, 0)
    assert pairwise_diversity(large)[1] == "1 - MS-SSIM"


def test_real_slices_are_spread_over_patients_and_match_the_labels():
    records = [
        SliceRecord(f"{label}{p}", s, f"/x/{label}{p}_{s}.jpeg", label)
        for label in (0, 1)
        for p in range(3)
        for s in range(5)
    ]
    chosen = spread_records(records, 7)
    assert len({r.patient for r in chosen[:6]}) == 6
    assert all(r.slice_index == 2 for r in chosen[:6])  # middle slices first
    assert chosen == spread_records(list(reversed(records)), 7)
    assert len(spread_records(records, 100)) == len(records)
    matched = real_counterparts(records, np.array([0, 0, 1, 1, 1]))
    assert [r.label for r in matched] == [0, 0, 1, 1, 1]
    assert len(real_counterparts(records, np.array([-1] * 4))) == 4


def test_nearest_ssim_finds_copies_and_matches_exact_search():
    references = smooth_images(200, seed=3)
    noise = np.random.default_rng(5).normal(0, 0.02, references[:5].shape).astype(np.float32)
    queries = np.concatenate([references[:5], np.clip(references[5:10] + noise, 0, 1)])
    unrelated = smooth_images(5, seed=4)
    exact = ssim_matrix_max(queries, references)
    found = nearest_ssim(queries, references, candidates=16)
    np.testing.assert_allclose(found[:5], 1.0, atol=1e-5)  # copies always among the candidates
    np.testing.assert_allclose(found, exact, atol=1e-5)  # and near copies
    # Unrelated images: a lower bound of the exact search (its nearest may lie outside the
    # L2 candidates).
    assert (
        nearest_ssim(unrelated, references, candidates=16)
        <= ssim_matrix_max(unrelated, references) + 1e-5
    ).all()
    excluded = nearest_ssim(references[:3], references, np.array([0, 1, 2]), candidates=16)
    assert (excluded < 0.999).all()


def test_memorisation_share_known_answers():
    rng = np.random.default_rng(0)
    real = rng.uniform(0.3, 0.6, 1000)
    assert abs(memorisation_share(rng.uniform(0.3, 0.6, 1000), real) - 0.05) < 0.03
    assert memorisation_share(np.ones(20), real) == 1.0  # copies
    assert memorisation_share(np.full(20, 0.1), real) == 0.0
    assert memorisation_share(np.ones(3), np.zeros(0)) is None


def test_samples_beside_real_show_sixteen_per_class_each_row_above_its_class():
    # Issue 14 asks for 16 samples per class beside real slices: rows of 8, each row of
    # samples directly above real slices of the same class, and no more than 16 however many
    # samples the statistics drew.
    from keras_vqpix.plots import samples_vs_real_rows

    labels = np.repeat([0, 1], 20)
    samples = (np.arange(40, dtype=np.float32)[:, None, None, None], labels)
    real = (100 + np.arange(40, dtype=np.float32)[:, None, None, None], labels[::-1].copy())
    rows = samples_vs_real_rows(samples, real)
    assert [name for name, _ in rows] == ["NC samples", "NC real"] * 2 + [
        "AD samples",
        "AD real",
    ] * 2
    assert all(len(images) == 8 for _, images in rows)
    for (_, drawn), (_, shown) in zip(rows[::2], rows[1::2], strict=True):
        drawn_labels = labels[drawn.ravel().astype(int)]
        real_labels = real[1][shown.ravel().astype(int) - 100]
        assert len(set(drawn_labels)) == 1 and set(real_labels) == set(drawn_labels)
    shown_samples = np.concatenate([images.ravel() for name, images in rows if "samples" in name])
    assert len(set(shown_samples.tolist())) == 32
