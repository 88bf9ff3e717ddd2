"""Ancestral sampling: the seeding contract, determinism, temperature, labels, the drawn distribution."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import placed_prior

from keras_vqpix.models.pixelcnn import PixelCNN
from keras_vqpix.sampling import (
    SEED_SALT,
    codes_graph,
    decode_codes,
    draw_codes,
    resample_codes,
    resolve_labels,
    row_noise,
    sample_codes,
    sample_codes_reference,
    sample_rows_reference,
)


@pytest.fixture(scope="module")
def prior() -> PixelCNN:
    keras.utils.set_random_seed(0)
    model = PixelCNN(num_embeddings=16, num_layers=2, filters=8, embedding_dim=4, code_shape=(4, 5))
    model(tf.zeros((1, 4, 5), tf.int32), tf.zeros((1,), tf.int32))
    return model


class FixedPrior:
    """A stand-in prior whose logits we choose: `logits_fn(codes, labels) -> [n, h, w, K]`."""

    conditional = True
    num_classes = 2

    def __init__(self, logits_fn, code_shape=(3, 4)):
        self.logits_fn = logits_fn
        self.code_shape = code_shape

    def __call__(self, codes, labels=None, training=False):
        return self.logits_fn(codes, labels)


def test_the_seeding_contract(prior):
    """An eager, position-by-position implementation of the documented contract draws the same codes.

    This is what a faster sampler must reproduce: the logits of (r, c) from the codes drawn so
    far, divided by the temperature, plus the Gumbel noise of map i's row r,
    `tfp.distributions.Gumbel(0, 1).sample([w, K], seed=fold_in(fold_in((seed, SEED_SALT), r),
    i))` at column c, and the argmax (the Gumbel-max trick).
    """
    seed, temperature, labels = 7, 0.8, np.array([0, 1, -1], np.int32)
    codes = np.zeros((3, 4, 5), np.int32)
    fold_in = tf.random.experimental.stateless_fold_in
    standard_gumbel = tfp.distributions.Gumbel(np.float32(0), np.float32(1))
    for r in range(4):
        row_seed = fold_in(tf.constant([seed, SEED_SALT], tf.int32), r, alg="philox")
        noise = [
            standard_gumbel.sample([5, 16], seed=fold_in(row_seed, i, alg="philox")).numpy()
            for i in range(3)
        ]
        for c in range(5):
            logits = prior(codes, labels, training=False)[:, r, c, :].numpy()
            for i in range(3):
                codes[i, r, c] = np.argmax(logits[i] / np.float32(temperature) + noise[i][c])
    sampled = sample_codes_reference(prior, 3, seed, labels, temperature)
    np.testing.assert_array_equal(sampled, codes)
    np.testing.assert_array_equal(sample_codes(prior, 3, seed, labels, temperature), codes)


def test_same_seed_same_codes_other_seed_other_codes(prior):
    first = sample_codes_reference(prior, 4, seed=3)
    assert first.shape == (4, 4, 5) and first.dtype == np.int32
    assert first.min() >= 0 and first.max() < 16
    np.testing.assert_array_equal(sample_codes_reference(prior, 4, seed=3), first)
    assert (sample_codes_reference(prior, 4, seed=4) != first).any()


def test_a_sample_depends_on_its_index_not_on_the_number_drawn(prior):
    many = sample_codes_reference(prior, 6, seed=5, labels=[0, 1, 1, 0, 1, 0])
    few = sample_codes_reference(prior, 2, seed=5, labels=[0, 1])
    np.testing.assert_array_equal(few, many[:2])
    # With K = 256 a batched [n, K] `stateless_categorical` is split into thread shards whose
    # boundaries move with n (and with the CPU count); each map's own noise does not move.
    logits = np.random.default_rng(3).normal(size=(2, 2, 256)).astype(np.float32) * 3
    fixed = FixedPrior(
        lambda codes, labels: tf.broadcast_to(logits, tf.concat([tf.shape(codes), [256]], 0)),
        (2, 2),
    )
    np.testing.assert_array_equal(
        sample_codes_reference(fixed, 12, seed=5, labels=0),
        sample_codes_reference(fixed, 16, seed=5, labels=0)[:12],
    )


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_a_large_request_drawn_in_batches_draws_the_codes_of_one_call(prior, method):
    """`sample_codes` draws `batch_size` maps per graph call (bounded memory for any n); each
    map keeps its index in the whole request, so the codes do not depend on the batching."""
    labels = [0, 1, -1, 1, 0, 1, 1]
    whole = sample_codes(prior, 7, 11, labels, 0.9, method=method)
    progress = []
    batched = sample_codes(
        prior,
        7,
        11,
        labels,
        0.9,
        method=method,
        batch_size=3,
        on_row=lambda done, rows: progress.append((done, rows)),
    )
    assert batched.dtype == np.int32 and batched.shape == (7, 4, 5)
    np.testing.assert_array_equal(batched, whole)
    # Batches [0:3], [3:6], [6:7]: a map drawn in the last batch alone is still map 6.
    np.testing.assert_array_equal(sample_codes_reference(prior, 7, 11, labels, 0.9)[6], batched[6])
    assert progress == [(done, 12) for done in range(1, 13)]  # 4 rows x 3 batches, in order
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            sample_codes(prior, 2, 0, batch_size=bad)


def test_a_tiny_temperature_draws_the_most_likely_code_never_an_out_of_range_one():
    """At temperature 1e-30 the largest logits overflow to +inf (and inf - inf is NaN): the draw
    must still be the argmax, as the limit T -> 0 of the distribution says."""
    logits = tf.constant([[3.0, 1.0, 2.0, -1.0], [0.5, 4.0, 4.0, -2.0], [-5.0, -1.0, -3.0, -9.0]])
    for temperature in (1e-30, 2e-38, 1e-6):
        for seed in range(8):
            noise = row_noise(seed, 3, 3, 1, 4)[:, 0]
            codes = draw_codes(logits, noise, temperature).numpy()
            assert codes[0] == 0 and codes[1] in (1, 2) and codes[2] == 1, (temperature, codes)
    # A huge temperature gives (nearly) uniform draws, all in range.
    drawn = np.stack([draw_codes(logits, row_noise(s, 0, 3, 1, 4)[:, 0], 3e38) for s in range(40)])
    assert drawn.min() >= 0 and drawn.max() < 4 and len(np.unique(drawn[:, 0])) == 4


def test_rows_drawn_in_one_call_or_row_by_row_agree(prior):
    labels = tf.constant([1, 0], tf.int32)
    empty = tf.zeros((2, 4, 5), tf.int32)
    at_once = sample_rows_reference(prior, empty, labels, 9, 1.0, 0, 4).numpy()
    np.testing.assert_array_equal(sample_codes_reference(prior, 2, 9, [1, 0]), at_once)


def test_codes_graph_runs_whole_in_a_graph_and_draws_the_codes_of_sample_codes(prior):
    """What the exported generator runs: traced without autograph, n dynamic, same codes."""
    spec = tf.TensorSpec

    @tf.function(
        autograph=False,
        input_signature=[
            spec([], tf.int32),
            spec([], tf.int32),
            spec([None], tf.int32),
            spec([], tf.float32),
        ],
    )
    def draw(num_samples, seed, labels, temperature):
        return codes_graph(prior, num_samples, seed, labels, temperature, 4, 5)

    labels = [0, 1, -1]
    codes = draw(tf.constant(3), tf.constant(7), tf.constant(labels), tf.constant(0.8))
    assert codes.dtype == tf.int32 and codes.shape == (3, 4, 5)
    assert draw.get_concrete_function().structured_outputs.shape.as_list() == [None, 4, 5]
    np.testing.assert_array_equal(codes.numpy(), sample_codes(prior, 3, 7, labels, 0.8))
    with pytest.raises(ValueError, match="method"):
        codes_graph(prior, 1, 0, [0], 1.0, 4, 5, method="nope")


@pytest.mark.parametrize("temperature", [1e-39, 5e-45, 1e39])
def test_temperature_must_be_a_normal_float32(prior, temperature):
    with pytest.raises(ValueError, match="temperature must be a normal float32"):
        sample_codes(prior, 1, 0, temperature=temperature)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), "warm", None])
def test_temperature_must_be_positive_and_finite(prior, temperature):
    with pytest.raises(
        ValueError, match="temperature must be a finite number > 0. Received: temperature="
    ):
        sample_codes_reference(prior, 1, 0, temperature=temperature)


@pytest.mark.parametrize("seed", [2**31, -(2**31) - 1, 1.5, "1"])
def test_seed_must_be_an_int32(prior, seed):
    with pytest.raises(ValueError, match="seed must be an int32"):
        sample_codes_reference(prior, 1, seed)


def test_labels(prior):
    np.testing.assert_array_equal(resolve_labels(prior, 5), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(resolve_labels(prior, 3, "ad"), [1, 1, 1])
    np.testing.assert_array_equal(resolve_labels(prior, 2, ["NC", -1]), [0, -1])
    with pytest.raises(ValueError, match="labels must be in -1 .. 1"):
        resolve_labels(prior, 2, 2)
    with pytest.raises(ValueError, match="label must be one of NC, AD"):
        resolve_labels(prior, 2, "MCI")
    with pytest.raises(ValueError, match="one label or one per sample"):
        resolve_labels(prior, 3, [0, 1])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        resolve_labels(prior, 0)
    unconditional = PixelCNN(num_embeddings=4, conditional=False)
    np.testing.assert_array_equal(resolve_labels(unconditional, 2), [-1, -1])
    with pytest.raises(ValueError, match="this prior is unconditional"):
        resolve_labels(unconditional, 2, "AD")


def test_the_sampler_feeds_each_drawn_code_to_the_later_positions():
    """Forced logits: code(p) = code(p - 1) + 1 + label (mod K), code(0) = label, in raster order."""
    num_codes = 32

    def logits_fn(codes, labels):
        h, w = codes.shape[1], codes.shape[2]
        flat = tf.reshape(codes, (-1, h * w))
        previous = tf.concat([tf.fill((tf.shape(flat)[0], 1), -1), flat[:, :-1]], axis=1)
        target = (previous + 1 + labels[:, None]) % num_codes
        target = tf.where(tf.range(h * w)[None, :] == 0, labels[:, None], target)
        return tf.reshape(60.0 * tf.one_hot(target, num_codes), (-1, h, w, num_codes))

    codes = sample_codes_reference(FixedPrior(logits_fn), 2, seed=0, labels=[0, 1])
    np.testing.assert_array_equal(codes[0].ravel(), np.arange(12))
    np.testing.assert_array_equal(codes[1].ravel(), (1 + 2 * np.arange(12)) % num_codes)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_codes_follow_the_model_distribution(temperature):
    probabilities = np.array([0.6, 0.3, 0.1, 0.0])
    logits = np.log(np.maximum(probabilities, 1e-30)).astype(np.float32)
    fixed = FixedPrior(
        lambda codes, labels: tf.broadcast_to(logits, tf.concat([tf.shape(codes), [4]], 0)), (4, 4)
    )
    codes = sample_codes_reference(fixed, 250, seed=1, labels=0, temperature=temperature)
    frequencies = np.bincount(codes.ravel(), minlength=4) / codes.size
    expected = probabilities ** (1 / temperature) / np.sum(probabilities ** (1 / temperature))
    # 4000 draws: a standard error below 0.008 per frequency.
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
    assert frequencies[3] == 0


def test_zero_images_are_refused_or_answered_without_running_a_model(prior):
    # No entry point runs a model on an empty batch (oneDNN's Conv2D gets its shape wrong).
    from keras_vqpix.evaluation import evaluate_reconstructions
    from keras_vqpix.models.vqvae import VQVAE

    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_codes(prior, 0, seed=1)
    vqvae = VQVAE(hidden_channels=4, residual_channels=2, num_residual_blocks=0, num_embeddings=8)
    images = decode_codes(vqvae, np.zeros((0, 3, 5), np.int32))
    assert images.shape == (0, 12, 20, 1) and images.dtype == np.float32
    with pytest.raises(ValueError, match="no slices to evaluate"):
        evaluate_reconstructions(vqvae, [], 16, 4, 4)


def test_resample_codes_redrawing_everything_draws_the_codes_of_sample_codes(prior):
    labels = np.array([0, 1, -1], np.int32)
    drawn = sample_codes(prior, 3, seed=5, labels=labels)
    start = np.full((3, 4, 5), 7, np.int32)
    assert np.array_equal(
        resample_codes(prior, start, np.ones((3, 4, 5), bool), seed=5, labels=labels), drawn
    )


def test_resample_codes_of_a_prior_with_slice_positions_heals_at_the_given_positions():
    # Redrawing everything at the positions sample_codes drew gives its maps; healing with the
    # position unknown (the default) is another draw, so the positions do reach the sampler.
    from keras_vqpix.sampling import draw_positions

    prior = placed_prior((4, 5))
    labels = np.array([0, 1, 0], np.int32)
    drawn = sample_codes(prior, 3, seed=5, labels=labels)
    start, everything = np.full((3, 4, 5), 7, np.int32), np.ones((3, 4, 5), bool)
    positions = draw_positions(prior, 3, 5)
    healed = resample_codes(prior, start, everything, seed=5, labels=labels, positions=positions)
    assert np.array_equal(healed, drawn)
    assert not np.array_equal(
        resample_codes(prior, start, everything, seed=5, labels=labels), drawn
    )
    with pytest.raises(ValueError, match="positions"):
        resample_codes(prior, start, everything, positions=[0, 1])


def test_resample_codes_keeps_unmarked_codes_and_conditions_on_them():
    # Each position's logits put all mass on (the code before it in raster order + 1) mod K.
    num_codes = 16

    def next_code(codes, labels):
        flat = tf.reshape(tf.cast(codes, tf.int32), (tf.shape(codes)[0], -1))
        before = tf.concat([tf.zeros_like(flat[:, :1]), flat[:, :-1]], axis=1)
        target = tf.reshape((before + 1) % num_codes, tf.shape(codes))
        return 100.0 * tf.one_hot(target, num_codes)

    codes = np.arange(24, dtype=np.int32).reshape(2, 3, 4) % 5
    redraw = np.zeros_like(codes, bool)
    redraw[0, 1, 2] = redraw[0, 1, 3] = redraw[0, 2, 0] = True  # a run crossing a row end
    healed = resample_codes(FixedPrior(next_code), codes, redraw, seed=1, labels=0)
    assert np.array_equal(healed[~redraw], codes[~redraw])  # kept codes unchanged
    kept_before = codes[0, 1, 1]
    assert healed[0, 1, 2] == kept_before + 1  # drawn given the kept code before it
    assert healed[0, 1, 3] == kept_before + 2 and healed[0, 2, 0] == kept_before + 3
    assert np.array_equal(healed[1], codes[1])  # nothing marked: the map as it was
    # Nothing marked anywhere: returned as is, without running the prior.
    assert np.array_equal(resample_codes(FixedPrior(None), codes, np.zeros_like(redraw)), codes)


def test_decoding_batch_after_batch_traces_the_decoder_once():
    from keras_vqpix.models.vqvae import VQVAE

    vqvae = VQVAE(hidden_channels=4, residual_channels=2, num_residual_blocks=0, num_embeddings=8)
    vqvae(tf.zeros((1, 12, 20, 1)))  # built
    traces = []
    decode = vqvae.decode
    vqvae.decode = lambda codes: traces.append(1) or decode(codes)
    rng = np.random.default_rng(0)
    for count in (5, 3, 7):  # batches of 2: last batches of 1, 1 and 1
        images = decode_codes(vqvae, rng.integers(0, 8, (count, 3, 5)), batch_size=2)
        assert images.shape == (count, 12, 20, 1)
    assert len(traces) == 1
