"""Synthetic patients: stacks of slices, each drawn given the previous one (issue 18)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import ARCHITECTURES, placed_prior, random_prior
from PIL import Image

from keras_vqpix.data.discover import SliceRecord
from keras_vqpix.data.stacks import position_bins, stack_context
from keras_vqpix.run_folder import load_prior
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


def test_a_first_prior_draws_slice_0_and_the_stack_prior_each_later_slice(random_stack_prior):
    stack_prior = random_stack_prior
    first_prior = random_prior((5, 6), num_embeddings=16, num_layers=2, filters=8, embedding_dim=4)
    labels = np.array([0, 1, -1], np.int32)
    fast = sample_stacks(stack_prior, 3, 5, 11, labels, 0.9, batch_size=2, first_prior=first_prior)
    reference = sample_stacks(
        stack_prior, 3, 5, 11, labels, 0.9, method="reference", first_prior=first_prior
    )
    np.testing.assert_array_equal(fast, reference)
    # Slice 0 is the first prior's draw with slice 0's seed; slice z the stack prior's, given
    # slice z - 1, as without a first prior.
    np.testing.assert_array_equal(
        fast[:, 0], sample_codes(first_prior, 3, int(slice_seed(11, 0)), labels, 0.9)
    )
    bins = position_bins(5, stack_prior.slice_positions)
    for z in range(1, 5):
        drawn = sample_codes(
            stack_prior,
            3,
            int(slice_seed(11, z)),
            labels,
            0.9,
            previous=fast[:, z - 1],
            positions=int(bins[z]),
        )
        np.testing.assert_array_equal(fast[:, z], drawn, err_msg=f"slice {z}")
    assert not np.array_equal(fast[:, 0], sample_stacks(stack_prior, 3, 5, 11, labels, 0.9)[:, 0])
    # The engine slice after slice, with the first slices given: the same codes.
    height, width = stack_prior.code_shape
    sequential = tf.function(
        lambda: wavefront_stacks_graph(
            stack_prior,
            3,
            5,
            11,
            tf.constant(labels),
            0.9,
            height,
            width,
            wavefront=False,
            first_slices=tf.constant(fast[:, 0]),
        ),
        autograph=False,
    )().numpy()
    np.testing.assert_array_equal(sequential, fast)
    # A single slice is the first prior's alone.
    np.testing.assert_array_equal(
        sample_stacks(stack_prior, 3, 1, 11, labels, 0.9, first_prior=first_prior)[:, 0], fast[:, 0]
    )
    with pytest.raises(ValueError, match="first_prior reads a previous slice"):
        sample_stacks(stack_prior, 1, 2, first_prior=stack_prior)
    # A first prior that reads positions (no previous slice) draws slice 0 at bin 0.
    placed = placed_prior((5, 6))
    at_start = sample_stacks(stack_prior, 3, 5, 11, labels, 0.9, first_prior=placed)[:, 0]
    seed_0 = int(slice_seed(11, 0))
    np.testing.assert_array_equal(
        at_start, sample_codes(placed, 3, seed_0, labels, 0.9, positions=0)
    )
    assert not np.array_equal(at_start, sample_codes(placed, 3, seed_0, labels, 0.9, positions=3))
    other_shape = random_prior((4, 6), num_embeddings=16, num_layers=1, filters=4, embedding_dim=2)
    with pytest.raises(ValueError, match="same VQ-VAE"):
        sample_stacks(stack_prior, 1, 2, first_prior=other_shape)


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


def test_generate_draws_first_slices_with_another_runs_per_slice_prior(
    quick_run, tiny_adni, tmp_path
):
    import shutil

    # A per-slice prior on the quick run's VQ-VAE: `vqpix train --stage prior` on a copy.
    first_run = tmp_path / "per_slice"
    shutil.copytree(quick_run, first_run)
    for name in ("prior.keras", "prior.json", "prior_history.csv"):
        (first_run / name).unlink()
    for name in ("checkpoints/prior", "logs/prior"):
        shutil.rmtree(first_run / name, ignore_errors=True)
    config = json.loads((first_run / "config.json").read_text())
    config["prior"].update(previous_slice=False, slice_positions=0, epochs=1)
    (first_run / "config.json").write_text(json.dumps(config))
    trained = CliRunner().invoke(
        main, ["train", "--out", str(first_run), "--data", str(tiny_adni), "--stage", "prior"]
    )
    assert trained.exit_code == 0, trained.output

    def generate(out, *extra):
        return CliRunner().invoke(
            main,
            ["generate", str(quick_run), "--out", str(tmp_path / out), "--per-class", "8"]
            + ["--slices-per-patient", "4", "--seed", "3", *extra],
        )

    result = generate("first", "--first-slices", str(first_run))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "first" / "generator.json").read_text())
    assert record["options"]["first_slices_from"] == str(first_run)
    assert f"--first-slices {first_run}" in record["command"]
    assert "slice 0 by the per-slice prior" in record["patients"]
    assert generate("own").exit_code == 0
    pixels = {
        out: {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / out).rglob("*.jpeg"))}
        for out in ("first", "own")
    }
    assert pixels["first"].keys() == pixels["own"].keys()  # the same patients and slices
    first = [name for name in pixels["own"] if name.endswith("_0.jpeg")]
    assert any(not np.array_equal(pixels["first"][n], pixels["own"][n]) for n in first)
    # `vqpix sample --patient` too: slice 0 of each patient is the per-slice prior's draw.
    strips = tmp_path / "strips"
    result = CliRunner().invoke(
        main,
        ["sample", str(quick_run), "--patient", "--slices", "3", "--num", "2", "--seed", "4"]
        + ["--first-slices", str(first_run), "--out", str(strips)],
    )
    assert result.exit_code == 0, result.output
    first_prior, first_meta = load_prior(first_run)
    record = json.loads((strips / "samples.json").read_text())
    assert record["first_slices_prior_fingerprint"] == first_meta["fingerprint"]
    drawn = np.stack([np.load(strips / f"{name}.npy")[0] for name in record["files"]])
    labels = [{"NC": 0, "AD": 1}[name] for name in record["labels"]]
    np.testing.assert_array_equal(
        drawn, sample_codes(first_prior, 2, int(slice_seed(4, 0)), np.array(labels, np.int32))
    )
    # Refused, one line naming the option: a prior that reads a previous slice; single slices.
    bad = generate("bad", "--first-slices", str(quick_run))
    assert bad.exit_code == 2 and "--first-slices" in bad.output and "previous slice" in bad.output
    single = CliRunner().invoke(
        main,
        ["generate", str(quick_run), "--out", str(tmp_path / "one"), "--per-class", "4"]
        + ["--first-slices", str(first_run)],
    )
    assert single.exit_code == 2 and "--first-slices" in single.output


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
