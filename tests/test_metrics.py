"""SSIM against an independent implementation, the fast SSIM, the head mask and the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_slice
from PIL import Image

from keras_vqpix.metrics import (
    CodebookUsage,
    bilinear_baseline,
    box_average,
    fast_ssim_map,
    fast_ssim_per_image,
    head_mask,
    ms_ssim_per_image,
    ssim_foreground_per_image,
    ssim_foreground_symmetric,
    ssim_per_image,
)


@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """Brain-like slices and degraded copies (noise, blur, JPEG, shift), [N, 96, 96, 1] in [0, 1]."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    references, degraded = [], []
    for i in range(6):
        path = folder / f"p_{i}.png"
        write_slice(path, rng, size=(96, 96), radius_scale=0.8 + 0.05 * i)
        image = np.asarray(Image.open(path), np.float32) / 255.0
        kind = i % 3
        if kind == 0:
            other = image + rng.normal(0, 0.05, image.shape)
        elif kind == 1:
            other = tf.nn.avg_pool2d(image[None, ..., None], 3, 1, "SAME").numpy()[0, ..., 0]
        else:
            other = np.roll(image, 2, axis=1) * 0.9
        references.append(image)
        degraded.append(np.clip(other, 0, 1))
    return np.stack(references)[..., None], np.stack(degraded)[..., None].astype(np.float32)


def test_tf_ssim_agrees_with_scikit_image(image_pairs):
    from skimage.metrics import structural_similarity

    references, degraded = image_pairs
    ours = ssim_per_image(references, degraded).numpy()
    theirs = [
        structural_similarity(
            a[..., 0],
            b[..., 0],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for a, b in zip(references, degraded, strict=True)
    ]
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert np.all(ours <= 1.0) and np.all(ours > 0.1)


def test_fast_ssim_equals_tf_image_ssim(image_pairs):
    references, degraded = image_pairs
    expected_map = tf.image.ssim(references, degraded, 1.0, return_index_map=True).numpy()
    # Both compute local variances as E[x^2] - E[x]^2 in float32; a different summation order
    # moves single map values by up to a few 1e-4, and image means by far less.
    np.testing.assert_allclose(fast_ssim_map(references, degraded).numpy(), expected_map, atol=1e-3)
    np.testing.assert_allclose(
        fast_ssim_per_image(references, degraded).numpy(),
        ssim_per_image(references, degraded).numpy(),
        atol=5e-5,
    )


def test_identical_images_score_one():
    images = np.random.default_rng(1).random((2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(ssim_per_image(images, images).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(ssim_foreground_per_image(images, images).numpy(), 1.0, atol=1e-6)


def test_head_mask_covers_the_brain_including_dark_ventricles():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    brain = ((yy - 32) / 22) ** 2 + ((xx - 32) / 18) ** 2 <= 1
    ventricle = ((yy - 32) / 6) ** 2 + ((xx - 32) / 3) ** 2 <= 1
    image = np.where(brain, 0.6, 0.0) * np.where(ventricle, 0.05, 1.0)
    image = image + np.random.default_rng(2).normal(0, 0.01, image.shape)
    mask = head_mask(np.clip(image, 0, 1)[None, ..., None].astype(np.float32)).numpy()[0]
    assert mask[ventricle].all(), "dark ventricles inside the brain are part of the mask"
    assert mask[brain].mean() > 0.97
    assert not mask[~brain].mean() > 0.1


@pytest.mark.parametrize("shape", [(2, 7, 9, 1), (1, 5, 5, 3), (3, 64, 48, 1)])
def test_box_average_is_avg_pool_same(shape):
    images = np.random.default_rng(4).uniform(size=shape).astype(np.float32)
    np.testing.assert_allclose(
        box_average(images, 5).numpy(),
        tf.nn.avg_pool2d(images, 5, 1, "SAME").numpy(),
        rtol=1e-6,
        atol=1e-7,
    )


def test_head_mask_is_the_avg_pool_mask(image_pairs):
    """The box average changed how the mask is computed, not which pixels it holds."""
    for images in image_pairs:
        smooth = tf.nn.avg_pool2d(images, 5, 1, "SAME")[..., 0]
        foreground = tf.cast(smooth > 0.1 * tf.reduce_max(smooth, [1, 2], keepdims=True), tf.int32)
        inside = [
            (tf.cumsum(foreground, axis=axis) > 0) & (tf.cumsum(foreground, axis, reverse=True) > 0)
            for axis in (1, 2)
        ]
        np.testing.assert_array_equal(head_mask(images).numpy(), (inside[0] & inside[1]).numpy())


def test_foreground_ssim_ignores_the_background():
    rng = np.random.default_rng(3)
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    brain = (((yy - 32) / 24) ** 2 + ((xx - 32) / 20) ** 2 <= 1).astype(np.float32)
    texture = 0.5 + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    reference = np.clip(brain * texture + rng.normal(0, 0.02, brain.shape), 0, 1)[None, ..., None]
    # Exact inside the brain, background noise removed: foreground SSIM near 1.
    exact_inside = (reference * brain[None, ..., None]).astype(np.float32)
    fg = ssim_foreground_per_image(reference.astype(np.float32), exact_inside).numpy()[0]
    full = ssim_per_image(reference.astype(np.float32), exact_inside).numpy()[0]
    assert fg > 0.97
    assert full < fg - 0.05, "full-image SSIM is dominated by the background noise"


def test_empty_mask_is_nan():
    black = np.zeros((1, 32, 32, 1), np.float32)
    assert np.isnan(ssim_foreground_per_image(black, black).numpy()[0])


def test_bilinear_baseline_shapes_and_is_worse_than_identity(image_pairs):
    references, _ = image_pairs
    baseline = bilinear_baseline(tf.constant(references), 4).numpy()
    assert baseline.shape == references.shape
    assert baseline.min() >= 0 and baseline.max() <= 1
    scores = ssim_foreground_per_image(references, baseline).numpy()
    assert np.all(scores < 0.99) and np.all(scores > 0.2)


def test_ms_ssim_needs_161_pixels():
    small = np.random.default_rng(4).random((1, 128, 128, 1)).astype(np.float32)
    assert ms_ssim_per_image(small, small) is None
    large = np.random.default_rng(5).random((1, 176, 176, 1)).astype(np.float32)
    np.testing.assert_allclose(ms_ssim_per_image(large, large).numpy(), 1.0, atol=1e-5)


def test_codebook_usage_metric_accumulates_over_batches():
    metric = CodebookUsage(8)
    metric.update_state(np.array([[0, 1], [0, 1]]))
    metric.update_state(np.array([[2, 3], [2, 3]]))
    result = metric.result()
    assert float(result["codes_used"]) == 4
    np.testing.assert_allclose(float(result["perplexity"]), 4.0, rtol=1e-4)
    metric.reset_state()
    assert float(metric.result()["codes_used"]) == 0


def test_image_metrics_agree_with_the_single_metrics(image_pairs):
    from keras_vqpix.metrics import image_metrics, mse_per_image, psnr_per_image

    references, degraded = image_pairs
    metrics = image_metrics(references, degraded)
    np.testing.assert_allclose(
        metrics["ssim"], ssim_per_image(references, degraded).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        metrics["ssim_foreground"],
        ssim_foreground_per_image(references, degraded).numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        metrics["psnr"], psnr_per_image(references, degraded).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        metrics["mse"], np.mean((references - degraded) ** 2, axis=(1, 2, 3)), atol=1e-6
    )
    np.testing.assert_allclose(
        metrics["mse"], mse_per_image(references, degraded).numpy(), atol=1e-7
    )
    assert "ms_ssim" not in metrics  # 96 px: too small for five scales


def test_ranking_scores_known_answers():
    from keras_vqpix.metrics import average_precision, balanced_accuracy, best_dice, roc_auc

    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([1, 1], [0.1, 0.2]) is None
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # with ties
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    brute = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert roc_auc(labels, scores) == pytest.approx(brute, abs=1e-12)
    # Positives ranked 1st and 3rd of 4: precision 1 at recall 1/2, 2/3 at recall 1.
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(labels, labels.astype(float)) == 1.0
    # Best Dice: a threshold at 0.7 finds both positives plus one negative: 2*2/(3+2).
    dice, threshold = best_dice([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert dice == pytest.approx(0.8) and threshold == pytest.approx(0.7)
    assert best_dice(labels, labels.astype(float))[0] == 1.0
    assert balanced_accuracy([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy([1, 1], [1, 0]) is None


def test_symmetric_brain_ssim_averages_over_both_heads(image_pairs):
    references, degraded = image_pairs
    forward = ssim_foreground_symmetric(references, degraded).numpy()
    np.testing.assert_allclose(forward, ssim_foreground_symmetric(degraded, references), atol=1e-6)
    np.testing.assert_allclose(ssim_foreground_symmetric(references, references), 1.0, atol=1e-5)
    # A head shrunk inside the other (same slice, smaller): the union is the larger head's mask,
    # so the figure is the foreground SSIM with the larger head as the reference, either way.
    small = tf.image.resize(references, [64, 64]).numpy()
    shrunk = np.pad(small, [[0, 0], [16, 16], [16, 16], [0, 0]])
    expected = ssim_foreground_per_image(references, shrunk).numpy()
    np.testing.assert_allclose(ssim_foreground_symmetric(shrunk, references), expected, atol=1e-6)
    assert np.all(ssim_foreground_per_image(shrunk, references).numpy() > expected)
    assert np.isnan(ssim_foreground_symmetric(np.zeros((1, 32, 32, 1)), np.zeros((1, 32, 32, 1))))
