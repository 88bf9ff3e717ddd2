"""The PixelCNN's row and column steps compute its logits: cached or from scratch, at every position."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vqpix.models.pixelcnn import PixelCNN
from keras_vqpix.models.pixelcnn_steps import PixelCNNSteps

pytestmark = pytest.mark.usefixtures("time_limit")


def random_prior(shape=(4, 5), **kwargs) -> PixelCNN:
    """A built prior whose biases and label embeddings are random too (not zeros)."""
    keras.utils.set_random_seed(1)
    prior = PixelCNN(code_shape=shape, **kwargs)
    prior(tf.zeros((1, *shape), tf.int32), tf.zeros((1,), tf.int32))
    for variable in prior.weights:
        if any(part in variable.path for part in ("bias", "label", "position")):
            variable.assign(tf.random.normal(variable.shape, stddev=0.5, seed=2))
    return prior


def cached_logits(prior, codes, labels) -> np.ndarray:
    """Logits `[n, h, w, K]` of `codes` from the cached steps, as the fast sampler runs them."""
    _, height, width = codes.shape
    steps = PixelCNNSteps(prior, labels, width)
    state = steps.start()
    rows = []
    for r in range(height):
        row_state, columns = steps.start_row(), []
        for c in range(width):
            logits, row_state = steps.column(state, row_state, c)
            row_state = steps.push_code(row_state, codes[:, r, c], r, c)
            columns.append(logits)
        rows.append(tf.stack(columns, axis=1))
        state = steps.finish_row(state, codes[:, r], r)
    return tf.stack(rows, axis=1).numpy()


ARCHITECTURES = {
    # The default prior (PriorConfig) with K = 256.
    "default": dict(
        num_embeddings=256,
        num_layers=9,
        filters=32,
        embedding_dim=32,
        position_embedding=True,
        dilation_cycle=4,
    ),
    "quick": dict(
        num_embeddings=16, num_layers=2, filters=16, embedding_dim=8, position_embedding=True
    ),
    "kernel5_unconditional": dict(
        num_embeddings=8, num_layers=2, filters=8, kernel_size=5, embedding_dim=3, conditional=False
    ),
    # Vertical stacks dilated 1, 2, 4, 1: reaches beyond the 4-row map, as on a real map.
    "dilated": dict(
        num_embeddings=16,
        num_layers=3,
        filters=8,
        embedding_dim=4,
        dilation_cycle=3,
        position_embedding=True,
    ),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_steps_compute_the_model_logits_at_every_position(name):
    prior = random_prior(**ARCHITECTURES[name])
    rng = np.random.default_rng(0)
    codes = tf.constant(rng.integers(0, prior.num_embeddings, (3, 4, 5)), tf.int32)
    labels = tf.constant([0, 1, -1], tf.int32)
    expected = prior(codes, labels, training=False).numpy()
    scale = np.abs(expected).max()
    cached = cached_logits(prior, codes, labels)
    # Other operation shapes round differently: equal to float rounding, not bit for bit.
    np.testing.assert_allclose(cached, expected, rtol=0, atol=1e-5 * scale)
    position_logits = tf.function(
        lambda row, col: PixelCNNSteps(prior, labels, 5).position_logits(codes, row, col),
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
