"""The PixelCNN's row and column steps compute its logits: cached or from scratch, at every position."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ARCHITECTURES, random_prior

from keras_vqpix.models.pixelcnn import PixelCNN
from keras_vqpix.models.pixelcnn_steps import PixelCNNSteps

pytestmark = pytest.mark.usefixtures("time_limit")


def cached_logits(prior, codes, labels, previous=None, positions=None, steps=None) -> np.ndarray:
    """Logits `[n, h, w, K]` of `codes` from the cached steps (`steps`, or the prior's for these
    labels and context), as the fast sampler runs them."""
    _, height, width = codes.shape
    steps = steps or PixelCNNSteps(prior, labels, width, previous, positions)
    state = steps.start()
    rows = []
    for r in range(height):
        row_state, columns = steps.start_row(state), []
        for c in range(width):
            logits, row_state = steps.column(state, row_state, c)
            row_state = steps.push_code(row_state, codes[:, r, c], r, c)
            columns.append(logits)
        rows.append(tf.stack(columns, axis=1))
        state = steps.finish_row(steps.end_row(state, row_state), codes[:, r], r)
    return tf.stack(rows, axis=1).numpy()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_steps_compute_the_model_logits_at_every_position(name):
    prior = random_prior(**ARCHITECTURES[name])
    rng = np.random.default_rng(0)
    codes = tf.constant(rng.integers(0, prior.num_embeddings, (3, 4, 5)), tf.int32)
    labels = tf.constant([0, 1, -1], tf.int32)
    context = ()
    if prior.has_slice_context:  # a previous slice (map 2: none) and positions (map 1: unknown)
        previous = None
        if prior.previous_slice:
            previous = rng.integers(0, prior.num_embeddings, (3, 4, 5))
            previous[2] = -1
            previous = tf.constant(previous, tf.int32)
        context = (previous, tf.constant([1, -1, 3], tf.int32))
    expected = prior(codes, labels, *context, training=False).numpy()
    scale = np.abs(expected).max()
    cached = cached_logits(prior, codes, labels, *context)
    # Other operation shapes round differently: equal to float rounding, not bit for bit.
    np.testing.assert_allclose(cached, expected, rtol=0, atol=1e-5 * scale)
    position_logits = tf.function(
        lambda row, col: PixelCNNSteps(prior, labels, 5, *context).position_logits(codes, row, col),
        autograph=False,
    )
    from_scratch = np.stack(
        [
            np.stack([position_logits(tf.constant(r), tf.constant(c)) for c in range(5)], axis=1)
            for r in range(4)
        ],
        axis=1,
    )
    # From scratch, every step sees the same operations on the same values as when cached; and
    # the bits do not depend on where the steps run (here: eagerly, and traced).
    np.testing.assert_array_equal(from_scratch, cached)


def test_the_steps_compute_a_layout_priors_logits_at_every_position():
    # The layout's condition is computed once, whole, by `start`: row and column steps then
    # read it as they read a slice context.
    keras.utils.set_random_seed(0)
    prior = PixelCNN(
        num_embeddings=16,
        num_layers=3,
        filters=8,
        embedding_dim=4,
        code_shape=(4, 6),
        position_embedding=True,
        dilation_cycle=2,
        layout_levels=5,
        layout_upsample=2,
    )
    rng = np.random.default_rng(0)
    codes = tf.constant(rng.integers(0, 16, (3, 4, 6)), tf.int32)
    layout = tf.constant(rng.integers(0, 5, (3, 2, 3)), tf.int32)
    labels = tf.constant([0, 1, -1], tf.int32)
    expected = prior(codes, labels, layout=layout).numpy()
    steps = PixelCNNSteps(prior, labels, 6, layout=layout)
    cached = cached_logits(prior, codes, labels, steps=steps)
    np.testing.assert_allclose(cached, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(steps.position_logits(codes, 3, 5).numpy(), cached[:, 3, 5])
    with pytest.raises(ValueError, match="needs a layout"):
        PixelCNNSteps(prior, labels, 6).start()


def test_the_steps_keep_the_logits_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        prior = random_prior((5, 6), **ARCHITECTURES["quick"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    codes = tf.constant(np.random.default_rng(1).integers(0, 16, (2, 5, 6)), tf.int32)
    labels = tf.constant([1, -1], tf.int32)
    logits = PixelCNNSteps(prior, labels, 6).position_logits(codes, 4, 5)
    assert logits.dtype == tf.float32
    expected = prior(codes, labels).numpy()[:, 4, 5]
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=0.02 * np.abs(expected).max())
