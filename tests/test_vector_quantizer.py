"""Vector quantizers: assignment against NumPy, straight-through gradients, EMA, restarts, config."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_config_round_trip

from keras_vqpix.layers.vector_quantizer import VectorQuantizer, VectorQuantizerEMA

VARIANTS = [
    pytest.param(lambda **kw: VectorQuantizer(**kw), id="gradient"),
    pytest.param(lambda **kw: VectorQuantizerEMA(decay=0.9, **kw), id="ema"),
]


@pytest.mark.parametrize("make", VARIANTS)
def test_assignment_matches_numpy_nearest_code(make):
    layer = make(num_embeddings=7, embedding_dim=3)
    inputs = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
    out = layer(inputs)
    codebook = layer.embeddings.numpy()
    distances = ((inputs[..., None, :] - codebook) ** 2).sum(-1)
    expected = distances.argmin(-1)
    np.testing.assert_array_equal(out["encoding_indices"].numpy(), expected)
    np.testing.assert_allclose(out["quantize"].numpy(), codebook[expected], atol=1e-5)
    np.testing.assert_allclose(layer.lookup(expected).numpy(), codebook[expected], atol=1e-6)
    assert out["encoding_indices"].dtype == tf.int32
    assert out["encoding_indices"].shape == (2, 4, 5)


@pytest.mark.parametrize("make", VARIANTS)
def test_perplexity_and_codes_used(make):
    layer = make(num_embeddings=4, embedding_dim=2)
    layer.build((None, 2))
    codebook = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    layer.embeddings.assign(codebook)
    # Two codes used equally: perplexity 2.
    inputs = np.array([[0.1, 0], [9.9, 0.1]] * 8, np.float32)
    out = layer(inputs)
    assert float(out["codes_used"]) == 2
    np.testing.assert_allclose(float(out["perplexity"]), 2.0, rtol=1e-4)


def test_straight_through_gradient_reaches_the_encoder_and_codebook_learns_from_the_vq_loss():
    layer = VectorQuantizer(num_embeddings=5, embedding_dim=3, commitment_cost=0.25)
    inputs = tf.Variable(np.random.default_rng(1).normal(size=(4, 6, 3)).astype(np.float32))
    target = tf.constant(np.random.default_rng(2).normal(size=(4, 6, 3)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        out = layer(inputs, training=True)
        decoder_loss = tf.reduce_sum(tf.square(out["quantize"] - target))
        vq_loss = out["loss"]
    # Straight-through: d(decoder loss)/d(encoder output) is d(loss)/d(quantized), copied unchanged.
    encoder_grad = tape.gradient(decoder_loss, inputs)
    expected = 2 * (out["quantize"] - target)
    np.testing.assert_allclose(encoder_grad.numpy(), expected.numpy(), atol=1e-5)
    assert np.abs(encoder_grad.numpy()).sum() > 0
    # The decoder's loss does not move the codebook; the VQ loss does (codebook term).
    assert tape.gradient(decoder_loss, layer.embeddings) is None
    codebook_grad = tape.gradient(vq_loss, layer.embeddings)
    assert (
        codebook_grad is not None and np.abs(tf.convert_to_tensor(codebook_grad).numpy()).sum() > 0
    )
    # The gradient is dense (one-hot matmul), not IndexedSlices from a gather.
    assert not isinstance(codebook_grad, tf.IndexedSlices)
    # Commitment term: the encoder output is pulled toward its code.
    commitment_grad = tape.gradient(vq_loss, inputs).numpy()
    quantized = layer.lookup(out["encoding_indices"]).numpy()
    np.testing.assert_allclose(
        commitment_grad,
        0.25 * 2 * (inputs.numpy() - quantized) / inputs.numpy().size,
        rtol=1e-4,
        atol=1e-7,
    )


def test_ema_quantizer_loss_is_commitment_only_and_codebook_is_not_trainable():
    layer = VectorQuantizerEMA(num_embeddings=5, embedding_dim=3, commitment_cost=0.5)
    inputs = np.random.default_rng(3).normal(size=(10, 3)).astype(np.float32)
    out = layer(inputs)
    quantized = layer.lookup(out["encoding_indices"]).numpy()
    np.testing.assert_allclose(
        float(out["loss"]), 0.5 * np.mean((inputs - quantized) ** 2), rtol=1e-5
    )
    assert layer.embeddings not in layer.trainable_weights


def test_ema_update_moves_codes_toward_the_mean_of_their_inputs():
    layer = VectorQuantizerEMA(num_embeddings=2, embedding_dim=2, decay=0.5)
    layer.build((None, 2))
    layer.embeddings.assign(np.array([[0.0, 0.0], [10.0, 10.0]], np.float32))
    layer.ema_dw.assign(layer.embeddings)
    cluster_a = np.array([[1.0, 1.0], [3.0, 1.0]], np.float32)  # mean (2, 1)
    cluster_b = np.array([[8.0, 8.0], [8.0, 6.0]], np.float32)  # mean (8, 7)
    inputs = np.concatenate([cluster_a, cluster_b])
    before = layer.embeddings.numpy().copy()
    distance_before = np.abs(before - [[2, 1], [8, 7]]).sum()
    for _ in range(20):
        layer(inputs, training=True)
    after = layer.embeddings.numpy()
    assert np.abs(after - [[2, 1], [8, 7]]).sum() < 0.01 * distance_before
    np.testing.assert_allclose(after, [[2, 1], [8, 7]], atol=1e-2)


@pytest.mark.parametrize("make", VARIANTS)
def test_dead_codes_are_restarted_from_encoder_outputs(make):
    layer = make(num_embeddings=4, embedding_dim=2, dead_code_steps=3, seed=0)
    layer.build((None, 2))
    layer.steps_since_used.assign(np.zeros(4, np.float32))  # as if every code had just been used
    far = np.array([[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]], np.float32)
    layer.embeddings.assign(np.concatenate([[[0.0, 0.0]], far]).astype(np.float32))
    if isinstance(layer, VectorQuantizerEMA):
        layer.ema_dw.assign(layer.embeddings)
    inputs = np.random.default_rng(4).normal(scale=0.5, size=(64, 2)).astype(np.float32)
    for _ in range(2):
        out = layer(inputs, training=True)
        assert float(out["codes_used"]) == 1  # only code 0 is near the data
    np.testing.assert_allclose(
        layer.embeddings.numpy()[1:], far, rtol=1e-3
    )  # not yet dead (EMA smoothing aside)
    layer(inputs, training=True)  # third unused step: restart
    restarted = layer.embeddings.numpy()[1:]
    assert np.abs(restarted).max() < 5, "restarted codes must come from the data, not stay far away"
    for code in restarted:
        assert np.min(np.abs(inputs - code).sum(axis=1)) < 1e-5, (
            "each restarted code is an encoder output"
        )
    np.testing.assert_array_equal(layer.steps_since_used.numpy()[1:], 0)
    out = layer(inputs, training=True)
    assert float(out["codes_used"]) > 1


@pytest.mark.parametrize("make", VARIANTS)
def test_first_training_batch_initialises_the_codebook_from_the_data(make):
    layer = make(num_embeddings=8, embedding_dim=3, dead_code_steps=50, seed=1)
    inputs = (np.random.default_rng(6).normal(size=(256, 3)) + 40.0).astype(np.float32)
    out = layer(inputs, training=True)
    assert float(out["codes_used"]) <= 2  # the random initial codes are far from the data
    used = set(np.unique(out["encoding_indices"].numpy()))
    for index, code in enumerate(layer.embeddings.numpy()):
        if index not in used:  # every unused code now is an encoder output
            assert np.min(np.abs(inputs - code).sum(axis=1)) < 1e-4
    assert float(layer(inputs, training=True)["codes_used"]) >= 6


@pytest.mark.parametrize("make", VARIANTS)
def test_inference_does_not_change_the_codebook(make):
    layer = make(num_embeddings=4, embedding_dim=2, dead_code_steps=1)
    inputs = np.random.default_rng(5).normal(size=(16, 2)).astype(np.float32)
    layer(inputs)
    before = [w.numpy().copy() for w in layer.weights]
    for _ in range(3):
        layer(inputs, training=False)
    for a, w in zip(before, layer.weights, strict=True):
        np.testing.assert_array_equal(a, w.numpy())


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(VectorQuantizer, {}), (VectorQuantizerEMA, {"decay": 0.9, "epsilon": 1e-3})],
    ids=["gradient", "ema"],
)
def test_config_round_trip(cls, extra):
    arguments = dict(num_embeddings=9, embedding_dim=4, commitment_cost=0.3, dead_code_steps=7)
    assert_config_round_trip(cls, {**arguments, "seed": 3, **extra})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_embeddings": 1, "embedding_dim": 2},
            "num_embeddings must be >= 2. Received: num_embeddings=1",
        ),
        ({"num_embeddings": 4, "embedding_dim": 0}, "embedding_dim must be >= 1"),
        (
            {"num_embeddings": 4, "embedding_dim": 2, "commitment_cost": -1},
            "commitment_cost must be >= 0",
        ),
        (
            {"num_embeddings": 4, "embedding_dim": 2, "dead_code_steps": -1},
            "dead_code_steps must be >= 0",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VectorQuantizer(**kwargs)
    with pytest.raises(ValueError, match="decay must be in"):
        VectorQuantizerEMA(num_embeddings=4, embedding_dim=2, decay=1.5)


def test_input_depth_must_match_embedding_dim():
    with pytest.raises(ValueError, match="embedding_dim=3"):
        VectorQuantizer(num_embeddings=4, embedding_dim=3)(np.zeros((2, 5), np.float32))


def test_codebook_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = VectorQuantizerEMA(num_embeddings=4, embedding_dim=2)
        out = layer(
            tf.cast(np.random.default_rng(0).normal(size=(8, 2)), tf.bfloat16), training=True
        )
        assert layer.embeddings.dtype == "float32"
        assert out["quantize"].dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
