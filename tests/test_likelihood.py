"""The prior's likelihoods: the AD/NC log-likelihood ratio, anomaly maps and healing, the two
commands, and the synthetic lesions that measure them."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix.codes import encode_records
from keras_vqpix.data.discover import discover_splits
from keras_vqpix.data.pipeline import load_images
from keras_vqpix.likelihood import (
    balanced_threshold,
    classification_scores,
    classify_run,
    code_log_likelihoods,
    detect_anomalies,
    format_classification,
    log_likelihood_ratios,
)
from keras_vqpix.models.pixelcnn import bits_per_code
from keras_vqpix.run_folder import load_prior, load_vqvae
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.large


@pytest.fixture(scope="module")
def models(quick_run):
    vqvae, config, meta = load_vqvae(quick_run)
    prior, _ = load_prior(quick_run, meta)
    return vqvae, prior, config


@pytest.fixture(scope="module")
def test_slices(models, tiny_adni):
    """The tiny set's test records, images [n, 32, 32, 1] and codes."""
    vqvae, _, config = models
    records = discover_splits(tiny_adni, config.data.validation_fraction, config.seed).test
    codes, labels = encode_records(vqvae, records, config)
    return records, load_images(records, config.data.image_size), codes, labels


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_log_likelihood_ratio_is_the_difference_of_the_per_label_bits(models, test_slices):
    _, prior, _ = models
    _, _, codes, _ = test_slices
    ratios = log_likelihood_ratios(prior, codes)
    per_map = codes.shape[1] * codes.shape[2] * math.log(2.0)  # bits per code -> nats per map
    last = codes[-1:]
    nc, ad = (bits_per_code(prior, last, np.array([label])) for label in (0, 1))
    assert ratios[-1] == pytest.approx((nc - ad) * per_map, rel=1e-5, abs=1e-4)
    # Per code, over the whole set: the prior's bits per code under NC.
    mean = code_log_likelihoods(prior, codes, 0).mean()
    assert -mean / math.log(2.0) == pytest.approx(
        bits_per_code(prior, codes, np.zeros(len(codes))), rel=1e-5
    )
    # And the ratio is the difference of those per-code sums, map by map.
    difference = code_log_likelihoods(prior, codes, 1) - code_log_likelihoods(prior, codes, 0)
    assert ratios == pytest.approx(difference.sum(axis=(1, 2)), rel=1e-5, abs=1e-4)


def test_a_prior_with_slice_positions_is_scored_at_each_slice_s_position(
    quick_run, tiny_adni, models, test_slices
):
    # The quick prior reads position bins (as the patients preset's): its likelihoods must be
    # those of its training maps, each slice at its bin in its stack, not "unknown" (dropout).
    from keras_vqpix.data.stacks import stack_context
    from keras_vqpix.likelihood import slice_positions

    _, prior, _ = models
    records, _, codes, labels = test_slices
    assert prior.slice_positions > 0
    positions = slice_positions(prior, records)
    np.testing.assert_array_equal(positions, stack_context(records, prior.slice_positions)[1])
    assert (positions >= 0).all() and len(set(positions.tolist())) > 1
    nats = code_log_likelihoods(prior, codes, 0, positions=positions)
    assert -nats.mean() / math.log(2.0) == pytest.approx(
        bits_per_code(prior, codes, np.zeros(len(codes)), positions=positions), rel=1e-5
    )
    assert not np.allclose(nats, code_log_likelihoods(prior, codes, 0))  # unknown differs
    ratios = log_likelihood_ratios(prior, codes, positions=positions)
    result = classify_run(quick_run, tiny_adni, baseline=None)
    by_file = {row["file"]: row["log_likelihood_ratio"] for row in result["slices"]}
    reported = [by_file[row_file] for row_file in (r.path for r in records)]
    assert reported == pytest.approx(ratios.tolist(), rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="positions must be"):
        code_log_likelihoods(prior, codes, 0, positions=positions[:-1])
    # The anomaly maps score (and heal) at the same positions.
    vqvae = models[0]
    images = test_slices[1]
    maps = detect_anomalies(vqvae, prior, images, label=0, threshold=3.0, positions=positions)
    np.testing.assert_allclose(maps.surprise, -nats, rtol=1e-5, atol=1e-5)


def test_classification_scores_known_answers():
    labels = [0, 0, 1, 1, 0, 1]
    patients = ["a", "a", "b", "b", "c", "d"]
    ratios = [-1.0, -2.0, 3.0, 0.5, 0.2, -0.1]
    figures, tables = classification_scores(labels, patients, ratios, 0.0, math.log(2.0))
    assert tables["patients"] == ["a", "b", "c", "d"]
    assert tables["patient_log_ratios"] == pytest.approx([-3.0, 3.5, 0.2, -0.1])
    # Slices: 0.2 (NC) outranks -0.1 (AD), all else is ordered: 8 of 9 pairs.
    assert figures["slice_auc"] == pytest.approx(8 / 9)
    # P(AD) > 0.5 where the ratio is > 0: AD 2 of 3 right, NC 2 of 3 right.
    assert figures["slice_balanced_accuracy"] == pytest.approx(2 / 3)
    # Patients: the prior odds 2:1 turn d (-0.1) into AD and c (0.2) too: AD 2/2, NC 1/2.
    assert figures["patient_balanced_accuracy"] == pytest.approx(0.75)
    assert figures["patient_auc"] == pytest.approx(0.75)
    assert balanced_threshold([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0]) == 2.5
    assert balanced_threshold([0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0]) == 3.5  # the later of two ties
    assert balanced_threshold([1, 1], [1.0, 2.0]) is None


def test_classify_run_reports_the_prior_beside_a_baseline(quick_run, tiny_adni, test_slices):
    records, _, _, labels = test_slices

    def oracle(splits, evaluated, config, seed):  # a classifier that knows the answer
        assert len(splits.train) and list(evaluated) == list(records)
        return np.array([0.9 if r.label else 0.1 for r in evaluated])

    result = classify_run(quick_run, tiny_adni, baseline=oracle, baseline_name="oracle")
    assert result["num_slices"] == len(records) and result["num_patients"] == 4
    assert result["oracle_slice_auc"] == 1.0 and result["oracle_patient_balanced_accuracy"] == 1.0
    assert 0.0 <= result["slice_auc"] <= 1.0 and 0.0 <= result["patient_auc"] <= 1.0
    assert result["prior_log_odds_slice"] == 0.0  # the tiny set is balanced
    for level in ("slice", "patient"):
        assert 0.0 <= result[f"{level}_balanced_accuracy_validation_threshold"] <= 1.0
    slices = {row["file"]: row for row in result["slices"]}
    for patient in result["patients"]:
        own = [
            row["log_likelihood_ratio"]
            for row in slices.values()
            if row["patient"] == patient["patient"]
        ]
        assert patient["log_likelihood_ratio"] == pytest.approx(sum(own))


def with_lesion(image: np.ndarray, row: int = 14, col: int = 16, radius: float = 4.0):
    """`image [H, W, 1]` with a disc of pixel-wide checkerboard (0 / 1): a texture no training
    slice has, so the VQ-VAE never saw it."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    disc = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
    out = image.copy()
    out[disc, 0] = ((yy + xx) % 2)[disc]
    return out, disc


def test_a_lesion_the_vqvae_never_saw_scores_higher_than_the_same_slice_without_it(
    models, test_slices
):
    vqvae, prior, _ = models
    _, images, _, _ = test_slices
    clean = images[:4]
    lesioned = np.stack([with_lesion(image)[0] for image in clean])
    disc = with_lesion(clean[0])[1]
    maps = detect_anomalies(vqvae, prior, np.concatenate([clean, lesioned]), label=0, threshold=3.0)
    # The slice: more surprising codes in all (-log p of the map, and the excess over the
    # threshold that is the slice score) ...
    total_surprise = maps.surprise.sum(axis=(1, 2))
    assert np.all(total_surprise[4:] > total_surprise[:4])
    assert np.all(maps.slice_scores[4:] > maps.slice_scores[:4])
    # ... and the pixel map higher on the lesion than on the same pixels of the clean slice.
    assert np.all(maps.residual[4:, disc].mean(axis=1) > maps.residual[:4, disc].mean(axis=1))


def test_healing_changes_only_the_redrawn_codes(models, test_slices):
    """Exact statements: the healed code map equals the input's code map at every position
    not redrawn; a slice with nothing redrawn decodes to its reconstruction bit for bit (the
    same codes through the same decoder batches). Pixels near a redrawn code change through
    the decoder's receptive field, so the healed image is compared with the reconstruction,
    never with the input itself (which no decoded image equals)."""
    vqvae, prior, _ = models
    _, images, codes, _ = test_slices
    # A threshold between the slices' largest surprises: some slices have codes to redraw,
    # others none.
    largest = (-code_log_likelihoods(prior, codes, 0)).max(axis=(1, 2))
    threshold = float(np.median(largest))
    maps = detect_anomalies(vqvae, prior, images, label=0, threshold=threshold, seed=3)
    assert np.array_equal(maps.healed_codes[~maps.redrawn], maps.codes[~maps.redrawn])
    untouched = ~maps.redrawn.any(axis=(1, 2))
    assert untouched.any() and not untouched.all()
    assert np.array_equal(maps.healed[untouched], maps.reconstructions[untouched])
    assert np.all(maps.slice_scores[untouched] == 0) and np.all(maps.slice_scores[~untouched] > 0)
    changed = (maps.healed_codes != maps.codes).any(axis=(1, 2))
    assert changed.any() and not np.array_equal(maps.healed[changed], maps.reconstructions[changed])


def test_classify_and_anomaly_commands(quick_run, tiny_adni, tmp_path):
    result = invoke(
        "classify",
        quick_run,
        "--data",
        tiny_adni,
        "--json",
        tmp_path / "c.json",
        "--plot",
        tmp_path / "roc.png",
        "--no-cnn",
    )
    assert result.exit_code == 0, result.output
    assert "slice AUC" in result.output and (tmp_path / "roc.png").stat().st_size > 0
    figures = json.loads((tmp_path / "c.json").read_text())
    names = ("slice_auc", "patient_auc", "slice_balanced_accuracy", "patient_balanced_accuracy")
    # --no-cnn: the prior's figures only (the CNN's fit would take ~20 s here; the plumbing
    # of a second classifier is tested with an oracle above).
    assert set(names) <= set(figures) and not any(key.startswith("cnn_") for key in figures)

    images = sorted((tiny_adni / "test" / "AD").glob("*.jpeg"))[:2]
    # A mask beside each slice turns on the lesion figures.
    for image in images:
        mask = np.zeros((240, 256), np.uint8)
        if image == images[0]:
            mask[100:120, 120:140] = 1
        np.save(tmp_path / f"{image.stem}.mask.npy", mask)
        (tmp_path / image.name).write_bytes(image.read_bytes())
    copies = [tmp_path / image.name for image in images]
    out = tmp_path / "maps"
    result = invoke(
        "anomaly", quick_run, *copies, "--out", out, "--label", "-1", "--threshold", "2"
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "anomaly.json").read_text())
    assert record["label"] == "unconditional" and record["threshold_source"] == "given"
    assert record["lesions"]["slices_with_lesions"] == 1
    for stem in (image.stem for image in images):
        for suffix in ("_overlay.png", "_healed.png"):
            assert (out / f"{stem}{suffix}").stat().st_size > 0
        assert np.load(out / f"{stem}_residual.npy").shape == (32, 32)
        assert np.load(out / f"{stem}_surprise.npy").shape == (32, 32)
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "{run}", "--data", "{data}", "--split", "bogus"], "--split"),
        (["classify", "{data}", "--data", "{data}"], "not a run folder"),
        (["classify", "{run}", "--data", "{data}", "--json", "{tmp}/no/such/c.json"], "--json"),
        (["anomaly", "{run}", "--out", "{tmp}/a"], "either --data DIR or IMAGE"),
        (["anomaly", "{run}", "{image}", "--data", "{data}", "--out", "{tmp}/a"], "either --data"),
        (["anomaly", "{run}", "--data", "{data}", "--out", "{tmp}/a", "--label", "AD"], "--label"),
        (
            ["anomaly", "{run}", "--data", "{data}", "--out", "{tmp}/a", "--threshold", "-1"],
            "--threshold",
        ),
        (["anomaly", "{run}", "--data", "{tmp}", "--out", "{tmp}/a"], "is missing"),
    ],
)
def test_bad_options_exit_2_in_one_line(quick_run, tiny_adni, tmp_path, args, message):
    image = next((tiny_adni / "test" / "NC").glob("*.jpeg"))
    values = {"run": quick_run, "data": tiny_adni, "tmp": tmp_path, "image": image}
    result = invoke(*(arg.format(**values) for arg in args))
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and message in error[0], result.output
    assert not (tmp_path / "a").exists()


def test_classify_and_anomaly_on_external_data(quick_run, tmp_path):
    # Patients the run never saw: classified with the run's own training prior and validation
    # threshold (from the data it recorded), and reported as external.
    from keras_vqpix.data.demo import generate_demo_dataset

    other = tmp_path / "other"
    generate_demo_dataset(
        other, seed=3, train_patients_per_class=1, test_patients_per_class=1, slices_per_patient=2
    )
    result = classify_run(quick_run, other)
    assert (result["external"], result["split"], result["num_slices"]) == (True, "test", 4)
    assert result["num_patients"] == 2 and 0.0 <= result["slice_auc"] <= 1.0
    assert "external data" in format_classification(result).splitlines()[0]
    nc_only = tmp_path / "nc_only"
    shutil.copytree(other / "test" / "NC", nc_only / "test" / "NC")  # one patient, one class
    out = tmp_path / "maps"
    result = invoke("anomaly", quick_run, "--data", nc_only, "--out", out, "--threshold", "2")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "anomaly.json").read_text())
    assert (record["external"], record["split"], record["num_slices"]) == (True, "test", 2)
    refused = invoke("classify", quick_run, "--data", nc_only, "--split", "val", "--no-cnn")
    assert refused.exit_code == 2 and "has no validation split" in refused.output
