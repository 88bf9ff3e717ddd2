"""The fast sampler draws the reference sampler's codes, in graph mode, in a SavedModel, from `vqpix sample`."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import ARCHITECTURES, random_prior

from keras_vqpix import sampling
from keras_vqpix.sampling import (
    SEED_SALT,
    fast_codes_graph,
    map_seeds,
    row_seed,
    sample_codes,
    sample_codes_fast,
    sample_codes_reference,
)
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")


@pytest.fixture(scope="module")
def default_prior():
    """The default architecture (10 blocks of 32 filters, K = 256), random weights, 5x7 maps."""
    return random_prior((5, 7), **ARCHITECTURES["default"])


@pytest.fixture(scope="module")
def small_prior():
    """The quick architecture (3 blocks of 16 filters, K = 16), random weights, 5x6 maps."""
    return random_prior((5, 6), **ARCHITECTURES["quick"])


@pytest.fixture(scope="module")
def unconditional_prior():
    return random_prior((5, 7), **ARCHITECTURES["kernel5_unconditional"])


def test_map_seeds_are_fold_in_map_by_map():
    for seed, row in ((0, 0), (7, 13), (-(2**31), 1023), (2**31 - 1, 5)):
        at_row = row_seed(seed, row)
        expected = [
            tf.random.experimental.stateless_fold_in(at_row, i, alg="philox").numpy()
            for i in range(5)
        ]
        np.testing.assert_array_equal(map_seeds(at_row, 5).numpy(), expected)
    fold_in = tf.random.experimental.stateless_fold_in
    np.testing.assert_array_equal(
        row_seed(3, 17), fold_in(tf.constant([3, SEED_SALT]), 17, alg="philox")
    )


CASES = [  # (seed, labels, temperature)
    (0, [0, 1, -1, 1], 1.0),
    (7, [1, 1, 0, -1], 0.6),
    (-123456, [-1, 0, 0, 1], 1.7),
]


@pytest.fixture(scope="module")
def dilated_prior():
    """Vertical stacks dilated 1, 2, 4, 1 (`dilation_cycle=3`), random weights, 5x7 maps."""
    return random_prior((5, 7), **ARCHITECTURES["dilated"])


@pytest.fixture(scope="module")
def attention_prior():
    """Causal self-attention after blocks 1 and 3 (`attention_every=2`), random weights, 4x6
    maps (the reference's cost grows with the square of the positions under attention); the
    attention's output weights large, so that what it reads moves the draws."""
    prior = random_prior((4, 6), **ARCHITECTURES["attention"])
    for attention in prior.attentions:
        if attention is not None:
            attention.output_kernel.assign(3.0 * attention.output_kernel)
    return prior


@pytest.fixture(params=["quick_prior", "default_prior", "dilated_prior", "attention_prior"])
def prior(request):
    return request.getfixturevalue(request.param)


def test_the_fast_sampler_draws_the_reference_codes(prior):
    for seed, labels, temperature in CASES:
        reference = sample_codes_reference(prior, 4, seed, labels, temperature)
        fast = sample_codes_fast(prior, 4, seed, labels, temperature)
        np.testing.assert_array_equal(fast, reference, err_msg=f"{seed}, {labels}, {temperature}")
        # Not a degenerate map: the draws vary over positions and maps.
        assert len(np.unique(reference)) > 3
    if prior.has_slice_context:  # the slices' positions and, if read, their previous slices
        context = {"positions": [0, 1, -1, 2]}
        if prior.previous_slice:  # the next slices of those maps
            context["previous"] = sample_codes_reference(prior, 4, 5, [0, 1, -1, 1])
            context["previous"][3] = -1  # none
        arguments = (prior, 4, 9, [1, 0, 1, -1], 0.9)
        reference = sample_codes_reference(*arguments, **context)
        fast = sample_codes_fast(*arguments, **context)
        np.testing.assert_array_equal(fast, reference)
        assert not np.array_equal(fast, sample_codes_fast(*arguments))  # the context is read
    assert (
        sample_codes(prior, 4, *CASES[0]).tolist()
        == sample_codes_fast(prior, 4, *CASES[0]).tolist()
    )


def test_the_fast_sampler_draws_the_reference_codes_of_an_unconditional_prior(unconditional_prior):
    for seed, temperature in ((1, 1.0), (2, 0.8)):
        np.testing.assert_array_equal(
            sample_codes_fast(unconditional_prior, 3, seed, temperature=temperature),
            sample_codes_reference(unconditional_prior, 3, seed, temperature=temperature),
        )


def test_one_graph_call_or_row_by_row_with_progress_agree(small_prior):
    rows = []
    by_row = sample_codes_fast(
        small_prior, 3, 11, [0, -1, 1], 0.9, on_row=lambda done, total: rows.append((done, total))
    )
    assert rows == [(r + 1, 5) for r in range(5)]
    # One traced call over every row, the number of samples a Python int (static shapes).
    at_once = tf.function(
        lambda: fast_codes_graph(small_prior, 3, 11, [0, -1, 1], 0.9, 5, 6), autograph=False
    )()
    np.testing.assert_array_equal(at_once.numpy(), by_row)


@pytest.mark.parametrize("name", ["small_prior", "dilated_prior"])
def test_the_fast_sampler_in_a_saved_model_signature(tmp_path, request, name):
    """A dynamic number of samples, one label for all, as `vqpix export`'s generator takes them."""
    small_prior = request.getfixturevalue(name)
    height, width = small_prior.code_shape
    module = tf.Module()
    module.prior = small_prior

    @tf.function(
        input_signature=[
            tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="seed"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="label"),
        ],
        autograph=False,
    )
    def sample(num_samples, seed, temperature, label):
        codes = fast_codes_graph(module.prior, num_samples, seed, label, temperature, height, width)
        return {"codes": codes}

    module.sample = sample
    tf.saved_model.save(module, str(tmp_path / "generator"), signatures={"sample": sample})
    signature = tf.saved_model.load(str(tmp_path / "generator")).signatures["sample"]
    for num_samples, label in ((2, 1), (3, -1)):
        codes = signature(
            num_samples=tf.constant(num_samples),
            seed=tf.constant(5),
            temperature=tf.constant(1.0),
            label=tf.constant(label),
        )["codes"]
        assert codes.dtype == tf.int32 and codes.shape == (num_samples, height, width)
        np.testing.assert_array_equal(
            codes.numpy(), sample_codes_reference(small_prior, num_samples, 5, label)
        )


def test_vqpix_sample_draws_with_the_fast_sampler(quick_run, quick_prior, tmp_path, monkeypatch):
    expected = sample_codes_reference(quick_prior, 4, 3)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference sampler ran")

    monkeypatch.setitem(sampling.SAMPLERS, "reference", sampling.Sampler(refuse, refuse))
    monkeypatch.setattr(sampling, "sample_codes_reference", refuse)
    result = CliRunner().invoke(
        main, ["sample", str(quick_run), "--num", "4", "--seed", "3", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert "Sampling code rows" in result.output
    written = [np.load(path) for path in sorted((tmp_path / "s").glob("*.npy"))]
    np.testing.assert_array_equal(np.stack(written), expected)


def test_sample_codes_rejects_an_unknown_method(quick_prior):
    with pytest.raises(ValueError, match="method must be one of"):
        sample_codes(quick_prior, 1, method="slow")


def test_guided_sampling_draws_the_same_codes_with_every_sampler(small_prior):
    """Classifier-free guidance (`guidance=w`): fast == reference == in one graph, w = 1 is the
    conditional prior itself (the same codes as no guidance), other weights change the draws."""
    labels = [0, 1, 1, -1]
    plain = sample_codes(small_prior, 4, 5, labels)
    for weight in (0.0, 2.5):
        fast = sample_codes_fast(small_prior, 4, 5, labels, guidance=weight)
        reference = sample_codes_reference(small_prior, 4, 5, labels, guidance=weight)
        np.testing.assert_array_equal(fast, reference, err_msg=str(weight))
        graph = tf.function(
            lambda weight=weight: fast_codes_graph(
                small_prior, 4, 5, tf.constant(labels), 1.0, 5, 6, guidance=tf.constant(weight)
            ),
            autograph=False,
        )().numpy()
        np.testing.assert_array_equal(graph, fast, err_msg=str(weight))
        assert not np.array_equal(fast[:3], plain[:3])  # labelled maps move
        np.testing.assert_array_equal(fast[3], plain[3])  # label -1: c = u, nothing to guide
    np.testing.assert_array_equal(sample_codes(small_prior, 4, 5, labels, guidance=1.0), plain)
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
            sample_codes(small_prior, 1, guidance=bad)


def test_an_attention_prior_draws_the_same_codes_guided_and_redrawn(attention_prior):
    """The attention caches run along with the guided maps' second run, and through rows a
    redraw leaves alone (their horizontal stacks are still read by later positions)."""
    labels = [0, 1, -1]
    fast = sample_codes_fast(attention_prior, 3, 4, labels, guidance=2.0)
    np.testing.assert_array_equal(
        fast, sample_codes_reference(attention_prior, 3, 4, labels, guidance=2.0)
    )
    redraw = np.zeros((3, 4, 6), bool)
    redraw[:, 3:] = True  # rows 0-2 kept, but attended to
    redraw[1, 1, 2] = True
    codes, redraw = tf.constant(fast), tf.constant(redraw)
    labels, positions = tf.constant(labels, tf.int32), tf.fill([3], -1)
    resample = sampling._resampler(attention_prior, 4, 6)
    redrawn = resample(codes, redraw, labels, positions, tf.constant(6), tf.constant(1.0)).numpy()
    reference = sampling.sample_rows_reference
    expected = tf.function(
        lambda: reference(attention_prior, codes, labels, 6, 1.0, 0, 4, redraw=redraw),
        autograph=False,
    )().numpy()
    redraw = redraw.numpy()
    np.testing.assert_array_equal(redrawn, expected)
    np.testing.assert_array_equal(redrawn[~redraw], fast[~redraw])
    assert not np.array_equal(redrawn[redraw], fast[redraw])
