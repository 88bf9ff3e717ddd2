"""Synthetic patients: stacks of slices, each drawn given the previous one (issue 18)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import ARCHITECTURES, random_prior
from PIL import Image

from keras_vqpix.data.discover import SliceRecord
from keras_vqpix.data.stacks import position_bins, stack_context
from keras_vqpix.sampling import (
    position_bins_graph,
    sample_codes,
    sample_stacks,
    slice_seed,
    stacks_graph,
    wavefront_stacks_graph,
)
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")


@pytest.fixture(scope="module")
def random_stack_prior():
    """The quick architecture with random weights on 5x6 maps (biases and embeddings too)."""
    return random_prior((5, 6), **ARCHITECTURES["quick"])


# -- Stacks in a data set ---------------------------------------------------------------------------
def test_position_bins_spread_a_stack_over_the_bins_and_the_graph_twin_agrees():
    np.testing.assert_array_equal(position_bins(20, 20), np.arange(20))
    np.testing.assert_array_equal(position_bins(5, 20), [0, 5, 10, 14, 19])  # 4.75 -> 5, 14.25
    np.testing.assert_array_equal(position_bins(3, 4), [0, 2, 3])  # 1.5 rounds up
    np.testing.assert_array_equal(position_bins(1, 20), [-1])  # one slice: unknown
    np.testing.assert_array_equal(position_bins(4, 0), [-1] * 4)  # no positions
    for slices in range(1, 41):
        for bins in (0, 1, 4, 20):
            np.testing.assert_array_equal(
                position_bins_graph(slices, bins).numpy(), position_bins(slices, bins)
            )


def test_stack_context_pairs_each_slice_with_its_patients_previous_slice():
    records = [
        SliceRecord("b", 71, "b71", 1),
        SliceRecord("a", 10, "a10", 0),
        SliceRecord("b", 70, "b70", 1),
        SliceRecord("a", 12, "a12", 0),  # a gap: slice 11 is missing
        SliceRecord("a", 11, "a11", 0),
        SliceRecord("c", 5, "c5", 0),  # a patient of one slice
        SliceRecord("b", 73, "b73", 1),  # a gap: 72 is missing, so 73 has no previous slice
    ]
    previous, positions = stack_context(records, 4)
    assert previous.tolist() == [2, -1, -1, 4, 1, -1, -1]
    # Ranks in each patient's stack, spread over 4 bins: a (3 slices) 0, 2, 3; b (3) likewise.
    assert positions.tolist() == [2, 0, 0, 3, 2, -1, 3]


# -- Sampling stacks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quick_prior", "random_stack_prior"])
def test_the_wavefront_draws_the_reference_stacks(request, name):
    prior = request.getfixturevalue(name)
    labels = [0, 1, -1]
    fast = sample_stacks(prior, 3, 5, 11, labels, 0.9, batch_size=2)
    reference = sample_stacks(prior, 3, 5, 11, labels, 0.9, method="reference")
    np.testing.assert_array_equal(fast, reference)
    assert len(np.unique(fast)) > 3  # not a degenerate stack
    # Slice after slice with the same engine: the same codes (the schedule changes nothing).
    height, width = prior.code_shape
    sequential = tf.function(
        lambda: wavefront_stacks_graph(
            prior, 3, 5, 11, tf.constant(labels), 0.9, height, width, wavefront=False
        ),
        autograph=False,
    )().numpy()
    np.testing.assert_array_equal(sequential, fast)
    # In one graph (what the exported sample_patient runs), with both methods.
    for method in ("fast", "reference"):
        graph = tf.function(
            lambda method=method: stacks_graph(
                prior, 3, 5, 11, tf.constant(labels), 0.9, height, width, method
            ),
            autograph=False,
        )().numpy()
        np.testing.assert_array_equal(graph, fast, err_msg=method)


def test_guided_stacks_draw_the_reference_stacks(random_stack_prior):
    labels = [1, 0]
    fast = sample_stacks(random_stack_prior, 2, 4, 3, labels, guidance=2.0)
    reference = sample_stacks(random_stack_prior, 2, 4, 3, labels, method="reference", guidance=2.0)
    np.testing.assert_array_equal(fast, reference)
    assert not np.array_equal(fast, sample_stacks(random_stack_prior, 2, 4, 3, labels))


def test_slice_z_is_drawn_from_slice_z_minus_1_alone(quick_prior):
    # Each slice is the draw of sample_codes given the slice before it (and its seed and
    # position): nothing of slice z itself or of a later slice enters, and a stack's first
    # slice has no previous slice.
    labels = np.array([1, 0], np.int32)
    stacks = sample_stacks(quick_prior, 2, 6, 5, labels)
    bins = position_bins(6, quick_prior.slice_positions)
    previous = None
    for z in range(6):
        drawn = sample_codes(
            quick_prior,
            2,
            int(slice_seed(5, z)),
            labels,
            previous=previous,
            positions=int(bins[z]),
        )
        np.testing.assert_array_equal(stacks[:, z], drawn, err_msg=f"slice {z}")
        previous = drawn
    # The previous slice is read: another one gives another slice 1.
    other = sample_codes(
        quick_prior,
        2,
        int(slice_seed(5, 1)),
        labels,
        previous=stacks[::-1, 0],
        positions=int(bins[1]),
    )
    assert not np.array_equal(other, stacks[:, 1])
    # A stack does not depend on how many others are drawn, nor on the batching.
    np.testing.assert_array_equal(sample_stacks(quick_prior, 1, 6, 5, labels[:1]), stacks[:1])


def test_stacks_refuse_a_prior_that_does_not_read_the_previous_slice():
    prior = random_prior((4, 5), **ARCHITECTURES["dilated"])
    with pytest.raises(ValueError, match="does not read the previous slice"):
        sample_stacks(prior, 1, 3)
    with pytest.raises(ValueError, match="num_slices must be an int >= 1"):
        sample_stacks(random_prior((4, 5), **ARCHITECTURES["quick"]), 1, 0)


# -- The commands -------------------------------------------------------------------------------------
def test_generate_writes_whole_patients_split_by_patient(quick_run, tmp_path):
    out = tmp_path / "patients"
    result = CliRunner().invoke(
        main,
        ["generate", str(quick_run), "--out", str(out), "--per-class", "12"]
        + ["--slices-per-patient", "4", "--test-fraction", "0.34", "--seed", "3"],
    )
    print(result.output)
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpeg"))
    assert len(files) == 24
    patients: dict[str, set] = {}
    for file in files:
        split, label, name = file.split("/")
        patient, number = name[: -len(".jpeg")].rsplit("_", 1)
        patients.setdefault((patient, label), set()).add((split, int(number)))
    assert len(patients) == 6  # 3 per class
    for slices in patients.values():
        assert {number for _, number in slices} == {0, 1, 2, 3}  # consecutive slices
        assert len({split for split, _ in slices}) == 1  # one split per patient
    tests = [key for key, slices in patients.items() if next(iter(slices))[0] == "test"]
    assert len(tests) == 2  # one test patient per class
    record = json.loads((out / "generator.json").read_text())
    assert record["options"]["slices_per_patient"] == 4
    assert "--slices-per-patient 4" in record["command"]
    bad = CliRunner().invoke(
        main,
        ["generate", str(quick_run), "--out", str(tmp_path / "x"), "--per-class", "10"]
        + ["--slices-per-patient", "4"],
    )
    assert bad.exit_code == 2 and "multiple of --slices-per-patient" in bad.output


def test_sample_patient_writes_strips(quick_run, quick_prior, tmp_path):
    out = tmp_path / "strips"
    result = CliRunner().invoke(
        main,
        ["sample", str(quick_run), "--patient", "--num", "2", "--slices", "5", "--label", "AD"]
        + ["--seed", "4", "--out", str(out)],
    )
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "Wrote 2 patients" in result.output
    codes = np.load(out / "patient_001_AD.npy")
    np.testing.assert_array_equal(codes, sample_stacks(quick_prior, 2, 5, 4, 1)[1])
    strip = np.asarray(Image.open(out / "patient_001_AD.png"))
    side = codes.shape[1] * 4  # the quick VQ-VAE downsamples by 4
    assert strip.shape == (side, 5 * side)
    assert (out / "grid.png").is_file()
    assert json.loads((out / "samples.json").read_text())["slices_per_patient"] == 5
    bad = CliRunner().invoke(
        main, ["sample", str(quick_run), "--slices", "5", "--out", str(tmp_path / "y")]
    )
    assert bad.exit_code == 2 and "--slices applies to --patient only" in bad.output
