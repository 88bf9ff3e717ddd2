"""`vqpix compare`: known answers on the demo data (real vs real, corrupted, swapped, copied)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix.compare import (
    SEEDED_NAMES,
    SET_NAMES,
    STACK_NAMES,
    Comparison,
    SliceSet,
    _stack_rows,
    carries_noise,
    format_comparison,
    frechet_distance,
    judge_once,
    kernel_distance,
    noise_note,
    per_patient,
    plot_stacks,
    roc_auc,
    set_figures,
    size_note,
    stack_figures,
)
from keras_vqpix.config import CompareConfig
from keras_vqpix.data.discover import discover_folder
from keras_vqpix.data.stacks import consecutive_pairs
from keras_vqpix.models.slice_classifier import SliceClassifier
from keras_vqpix_cli.main import main

# Small budgets for tiny sets; the code path of the default budget.
BUDGET = CompareConfig(image_size=44, epochs=6, seeds=(0,), batch_size=16, learning_rate=3e-3)


def test_roc_auc_and_patient_scores_known_answers():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([1, 1], [0.1, 0.2]) is None
    labels, scores = per_patient(
        np.array(["a", "a", "b"]), np.array([1, 1, 0]), np.array([0.2, 0.4, 0.9])
    )
    np.testing.assert_allclose(scores, [0.3, 0.9])
    assert labels.tolist() == [1, 0]


def test_distances_known_answers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    assert frechet_distance(a, b) < 0.05 and abs(kernel_distance(a, b)) < 0.01
    shifted = b + np.array([2.0, 0, 0, 0])
    assert abs(frechet_distance(a, shifted) - 4.0) < 0.3  # |mu_a - mu_b|^2
    assert kernel_distance(a, shifted) > 0.5
    scaled = rng.normal(size=(4000, 4)) * 2.0  # Tr(S_a + S_b - 2 sqrt(S_a S_b)) = 4 * (1 + 4 - 4)
    assert abs(frechet_distance(rng.normal(size=(4000, 4)), scaled) - 4.0) < 0.4


def test_slice_classifier_shapes_and_config():
    model = SliceClassifier(widths=(4, 8))
    images = np.zeros((3, 16, 16, 1), np.float32)
    assert tuple(model(images).shape) == (3,)
    assert tuple(model.features(images).shape) == (3, 8)
    clone = SliceClassifier.from_config(model.get_config())
    assert clone.widths == (4, 8)
    with pytest.raises(ValueError, match="widths"):
        SliceClassifier(widths=())


def _link(records, root: Path, split: str, *, swap: bool = False, prefix: str = "") -> None:
    for record in records:
        label = ("AD", "NC")[record.label] if swap else ("NC", "AD")[record.label]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(record.path, folder / (prefix + Path(record.path).name))


@pytest.fixture(scope="module")
def demo_halves(demo_data, tmp_path_factory):
    """Disjoint patients of the demo set, every fourth slice: `real` (train: 8 patients per
    class, test: the demo test set, 4 per class) and `other` (train: 4 other train patients per
    class, test: the last 4), so each test side holds 4 patients per class."""
    base = tmp_path_factory.mktemp("compare")
    train = [r for r in discover_folder(demo_data, "train") if r.slice_index % 4 == 0]
    test = [r for r in discover_folder(demo_data, "test") if r.slice_index % 4 == 0]
    order = {label: sorted({r.patient for r in train if r.label == label}) for label in (0, 1)}
    rank = {p: i for label in (0, 1) for i, p in enumerate(order[label])}
    real, other = base / "real", base / "other"
    _link([r for r in train if rank[r.patient] < 8], real, "train")
    _link(test, real, "test")
    _link([r for r in train if 8 <= rank[r.patient] < 12], other, "train")
    _link([r for r in train if rank[r.patient] >= 12], other, "test")
    return real, other


@pytest.fixture(scope="module")
def ellipse_sets(tiny_adni, tmp_path_factory):
    """`tiny_adni` (AD and NC told apart at once: smaller heads) as real slices, as images."""
    from keras_vqpix.compare import SliceSet

    return tuple(
        SliceSet.load(discover_folder(tiny_adni, split), BUDGET.image_size)
        for split in ("train", "test")
    )


def test_real_vs_real_is_indistinguishable_and_cli_writes_every_key(demo_halves, tmp_path):
    real, other = demo_halves
    result = CliRunner().invoke(
        main,
        [
            "compare",
            str(other),
            "--real",
            str(real),
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
            "--plot-patients",
            str(tmp_path / "patients.png"),
            "--image-size",
            "48",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r.json").read_text())
    for name in (*SEEDED_NAMES, *SET_NAMES, *STACK_NAMES):
        for key in (name, f"{name}_down4"):
            assert key in metrics, key
    assert "c2st_auc_std" in metrics and "c2st_auc" in metrics["per_seed"]
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert (tmp_path / "patients.png").stat().st_size > 10_000
    # Every fourth slice of each patient: gaps everywhere, so no consecutive pair on either side.
    assert metrics["adjacent_ssim"] is None and metrics["adjacent_ssim_real_down4"] is None
    assert "no stacks" in result.output
    assert "c2st_auc" in result.output and "down4" in result.output
    # Known answers: two disjoint sets of real patients cannot be told apart, lie as far from
    # the real train slices as the real test slices do, and are no copies.
    assert abs(metrics["c2st_auc"] - 0.5) < 0.2, metrics["c2st_auc"]
    assert abs(metrics["c2st_auc_down4"] - 0.5) < 0.2, metrics["c2st_auc_down4"]
    assert 0.4 < metrics["fd"] / metrics["fd_real"] < 2.5, (metrics["fd"], metrics["fd_real"])
    # 5% by construction for sets of many patients; 40 real test slices of 8 patients give a
    # coarse 95th percentile, so only "no copies" is asserted here.
    assert metrics["memorisation"] < 0.5
    assert 0.6 < metrics["diversity"] / metrics["diversity_real"] < 1.6


def test_noisy_slices_are_told_apart(ellipse_sets):
    real_train, real_test = ellipse_sets
    rng = np.random.default_rng(0)

    def noisy(images: SliceSet) -> SliceSet:
        pixels = images.images + rng.normal(0, 0.1, images.images.shape)
        return SliceSet(np.clip(pixels, 0, 1).astype(np.float32), images.labels, images.patients)

    # The held-apart "synthetic" slices are the real test slices plus noise: noise is all
    # that tells the two test sides apart.
    figures = judge_once(real_train, real_test, noisy(real_train), noisy(real_test), BUDGET, 0)
    assert figures["c2st_auc"] > 0.9, figures["c2st_auc"]
    assert figures["fd"] > figures["fd_real"], (figures["fd"], figures["fd_real"])


def test_noise_on_one_class_shows_in_that_class_c2st_only(ellipse_sets):
    real_train, real_test = ellipse_sets
    rng = np.random.default_rng(1)

    def noisy_nc(images: SliceSet) -> SliceSet:
        noise = rng.normal(0, 0.1, images.images.shape) * (images.labels == 0)[:, None, None, None]
        pixels = np.clip(images.images + noise, 0, 1).astype(np.float32)
        return SliceSet(pixels, images.labels, images.patients)

    # Synthetic NC slices are noisy copies, synthetic AD slices the real ones unchanged.
    figures = judge_once(
        real_train, real_test, noisy_nc(real_train), noisy_nc(real_test), BUDGET, 0
    )
    assert figures["c2st_auc_nc"] > 0.9, figures["c2st_auc_nc"]
    assert abs(figures["c2st_auc_ad"] - 0.5) < 0.05, figures["c2st_auc_ad"]  # the same images
    assert figures["c2st_auc_ad"] < figures["c2st_auc"] < figures["c2st_auc_nc"], figures


def test_swapped_labels_score_well_below_half(ellipse_sets):
    real_train, real_test = ellipse_sets

    def swapped(images: SliceSet) -> SliceSet:
        return SliceSet(images.images, 1 - images.labels, images.patients)

    figures = judge_once(real_train, real_test, swapped(real_train), swapped(real_test), BUDGET, 0)
    assert figures["trtr_auc"] > 0.9
    assert figures["fidelity_auc"] < 0.1 and figures["tstr_auc"] < 0.1, figures
    assert figures["fidelity_auc_patient"] < 0.1 and figures["tstr_auc_patient"] < 0.1


def test_copies_of_training_slices_are_memorised(ellipse_sets):
    real_train, real_test = ellipse_sets
    copies = real_train.subset(np.arange(0, len(real_train), 2))
    every = np.arange(len(copies))
    figures = set_figures(real_train, real_test, copies, BUDGET, every, np.arange(len(real_test)))
    assert figures["memorisation"] == 1.0 and figures["nn_ssim"] > 0.999
    # Real unseen slices are the reference: about 1 - 95% of them lie above the threshold.
    fresh = set_figures(real_train, real_test, real_test, BUDGET, every[:10], every[:10])
    assert fresh["memorisation"] <= 0.1


def test_compare_refuses_shared_patients_and_bad_options(demo_halves):
    real, _ = demo_halves
    result = CliRunner().invoke(main, ["compare", str(real), "--real", str(real)])
    assert result.exit_code == 2 and "share patient" in result.output
    result = CliRunner().invoke(main, ["compare", str(real), "--image-size", "50"])
    assert result.exit_code == 2 and "multiple of 4" in result.output


def test_size_note_names_a_smaller_synthetic_train_split():
    small = {"num_synthetic_train": 640, "num_real_train": 1600}
    assert "640 synthetic train slices against 1600 real" in size_note(small)
    assert size_note(small) in format_comparison(small)
    for equal in (1600, 1500, 2000):
        metrics = {"num_synthetic_train": equal, "num_real_train": 1600}
        assert size_note(metrics) is None and "note:" not in format_comparison(metrics)
    assert size_note({}) is None  # reports written before the counts


def test_noise_note_names_the_side_that_carries_noise(tmp_path):
    def generated(name, options):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generator.json").write_text(json.dumps({"options": options}))
        return tmp_path / name

    noisy, clean = generated("noisy", {"noise": True}), generated("clean", {"noise": False})
    older = generated("older", {"size": [256, 240]})  # written before the option: noise-free
    scans = tmp_path / "scans"
    scans.mkdir()
    assert [carries_noise(p) for p in (noisy, clean, older, scans)] == [True, False, False, True]
    for synthetic, real in ((clean, noisy), (older, scans), (noisy, clean)):
        metrics = {"synthetic_noise": carries_noise(synthetic), "real_noise": carries_noise(real)}
        note = noise_note(metrics)
        first = "--real" if carries_noise(real) else "the synthetic set"
        assert note.startswith(f"note: {first} carries acquisition noise")
        assert note in format_comparison(metrics)
    for synthetic, real in ((noisy, scans), (clean, older)):
        metrics = {"synthetic_noise": carries_noise(synthetic), "real_noise": carries_noise(real)}
        assert noise_note(metrics) is None
    assert noise_note({}) is None  # reports written before the keys


# -- Stacks: adjacent-slice SSIM of patients -------------------------------------------------------
def test_consecutive_pairs_skip_gaps_and_repeated_slices():
    patients = np.array(["b", "a", "a", "a", "b", "a", "c", "a"])
    slices = np.array([5, 3, 1, 2, 6, 2, 9, 5])
    first, second, position = consecutive_pairs(patients, slices)
    # a: 1, 2, 2 (the first file counts), 3, then 5 after a gap; b: 5, 6; c: alone.
    assert first.tolist() == [2, 3, 0] and second.tolist() == [3, 1, 4]
    assert position.tolist() == [0, 1, 0]
    assert all(len(x) == 0 for x in consecutive_pairs(np.array([]), np.array([])))


@pytest.fixture(scope="module")
def demo_stacks(demo_data):
    """The demo test split (8 patients, 20 consecutive slices each) at the test budget's size."""
    return SliceSet.load(discover_folder(demo_data, "test"), BUDGET.image_size)


def _relabelled(images: SliceSet, patients=None, slices=None, order=None) -> SliceSet:
    order = np.arange(len(images)) if order is None else order
    return SliceSet(
        images.images[order],
        images.labels,
        images.patients if patients is None else patients,
        images.slices if slices is None else slices,
    )


def test_stack_figures_known_answers(demo_stacks, tmp_path):
    real = demo_stacks
    same = stack_figures(real, real)
    assert (
        same["adjacent_ssim"] == same["adjacent_ssim_real"] and same["adjacent_ssim_max_gap"] == 0
    )
    assert same["adjacent_ssim_patients_real"] == 8
    assert same["adjacent_ssim_profile_patients_real"] == [8] * 19  # 20 slices: 19 pairs each
    assert 0.85 < same["adjacent_ssim_real"] < 1.0, same["adjacent_ssim_real"]

    # Slices shuffled within each patient: the same brains, no longer in order.
    rng = np.random.default_rng(0)
    order = np.arange(len(real))
    for patient in np.unique(real.patients):
        index = np.flatnonzero(real.patients == patient)
        order[index] = rng.permutation(index)
    shuffled = stack_figures(real, _relabelled(real, order=order))
    # Every other slice taken from another patient (same slice position): neighbours of two brains.
    names = np.unique(real.patients)
    other = {patient: names[(i + 1) % len(names)] for i, patient in enumerate(names)}
    order = np.arange(len(real))
    for patient in names:
        index = np.flatnonzero(real.patients == patient)
        donor = np.flatnonzero(real.patients == other[patient])
        order[index[1::2]] = donor[1::2]
    mixed = stack_figures(real, _relabelled(real, order=order))
    for broken in (shuffled, mixed):
        assert broken["adjacent_ssim"] < same["adjacent_ssim_real"] - 0.15, broken
        assert broken["adjacent_ssim_max_gap"] > 0.1

    # Every slice its own patient (`vqpix generate` without --slices-per-patient): no stacks.
    single = stack_figures(real, _relabelled(real, patients=np.arange(len(real)).astype(str)))
    assert single["adjacent_ssim"] is None and single["adjacent_ssim_max_gap"] is None
    assert single["adjacent_ssim_profile"] == [] and single["adjacent_ssim_patients"] == 0
    assert single["adjacent_ssim_real"] == same["adjacent_ssim_real"]
    table = format_comparison({**single, **{k + "_down4": v for k, v in single.items()}})
    assert "no stacks" in table and f"{same['adjacent_ssim_real']:.3f}" in table

    # Slices 2, 5, 8, ... of each stack missing: only the pairs left count, at their positions.
    first = {p: real.slices[real.patients == p].min() for p in names}
    kept = np.array(
        [(s - first[p]) % 3 != 2 for p, s in zip(real.patients, real.slices, strict=True)]
    )
    gapped = stack_figures(real, real.subset(np.flatnonzero(kept)))
    profile, full = gapped["adjacent_ssim_profile"], same["adjacent_ssim_profile_real"]
    assert [p for p, v in enumerate(profile) if v is not None] == [0, 3, 6, 9, 12, 15, 18]
    np.testing.assert_allclose([profile[p] for p in (0, 3, 18)], [full[p] for p in (0, 3, 18)])
    assert gapped["adjacent_ssim_max_gap"] < 1e-6

    # The figure: two synthetic patients (NC, AD) above two real ones, every slice in order.
    rows = _stack_rows(real, _relabelled(real, order=order))
    assert [label.split("\n")[0] for label, _, _ in rows] == [
        "synthetic NC",
        "synthetic AD",
        "real test NC",
        "real test AD",
    ]
    assert all(np.all(np.diff(numbers) == 1) and len(numbers) == 20 for _, _, numbers in rows)
    comparison = Comparison(metrics=mixed, stacks=rows)
    assert plot_stacks(comparison, tmp_path / "p.png", "mixed").stat().st_size > 10_000
