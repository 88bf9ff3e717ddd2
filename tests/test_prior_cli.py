"""End to end on the tiny ADNI fixture: vqpix train (both stages), sample and evaluate with a prior."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keras_vqpix_cli.main import main

pytestmark = pytest.mark.large


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(quick_run) -> Path:
    """A run of the quick config, both stages (trained once per session, see conftest)."""
    return quick_run


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A copy of the trained run that a test may change."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_train_writes_the_prior_beside_the_vqvae(run):
    meta = read(run / "prior.json")
    assert meta["vqvae_fingerprint"] == read(run / "vqvae.json")["fingerprint"]
    assert meta["max_bits_per_code"] == math.log2(16)
    # The prior learnt something: below the 4 bits per code of a uniform prior over K = 16.
    assert meta["val_bits_per_code"] < math.log2(16)
    assert meta["test_bits_per_code"] < math.log2(16)
    assert set(meta) >= {"epoch", "fingerprint", "test_bits_per_code_unconditional"}
    history = (run / "prior_history.csv").read_text().splitlines()
    assert history[0].split(",")[:2] == ["epoch", "bits_per_code"] and len(history) == 1 + 3
    for name in (
        "prior.keras",
        "plots/prior_curves.png",
        "plots/prior_samples.png",
        "codes/train.npz",
    ):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "prior" / "checkpoint").is_file()
    assert any((run / "logs" / "prior").rglob("*tfevents*"))


def test_sample_is_reproducible_for_a_seed(run, tmp_path):
    outputs = {}
    for name, seed in (("A", 1), ("B", 1), ("C", 2)):
        result = invoke("sample", run, "--num", 4, "--seed", seed, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert "Wrote 4 samples" in result.output
        outputs[name] = {p.name: np.load(p) for p in sorted((tmp_path / name).glob("*.npy"))}
    assert list(outputs["A"]) == [
        f"sample_00{i}_{c}.npy" for i, c in enumerate(["NC", "NC", "AD", "AD"])
    ]
    assert outputs["A"].keys() == outputs["B"].keys()
    for name, codes in outputs["A"].items():
        assert codes.shape == (8, 8) and codes.dtype == np.int32
        np.testing.assert_array_equal(codes, outputs["B"][name])
    assert any((outputs["A"][n] != outputs["C"][n]).any() for n in outputs["A"])
    image = Image.open(tmp_path / "A" / "sample_000_NC.png")
    assert image.mode == "L" and image.size == (32, 32)
    assert (tmp_path / "A" / "grid.png").is_file()
    assert read(tmp_path / "A" / "samples.json")["seed"] == 1


def test_sample_a_label_and_refuse_a_non_empty_out(run, tmp_path):
    result = invoke("sample", run, "--num", 3, "--label", "AD", "--out", tmp_path / "ad")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ad").glob("*.png")) == [
        "grid.png",
        "sample_000_AD.png",
        "sample_001_AD.png",
        "sample_002_AD.png",
    ]
    result = invoke("sample", run, "--num", 2, "--label", "none", "--out", tmp_path / "any")
    assert result.exit_code == 0, result.output
    assert read(tmp_path / "any" / "samples.json")["labels"] == ["unconditional"] * 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = invoke("sample", run, "--num", 2, "--out", busy)
    assert result.exit_code == 2, result.output
    assert "exists and is not empty" in result.output
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    result = invoke("sample", run, "--num", 2, "--temperature", 0, "--out", tmp_path / "cold")
    assert result.exit_code == 2, result.output
    assert "--temperature" in result.output


def test_evaluate_reports_prior_and_sample_statistics(run, tiny_adni, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("evaluate", run, "--data", tiny_adni, "--samples", 4, "--json", report)
    assert result.exit_code == 0, result.output
    metrics = read(report)
    assert metrics["max_bits_per_code"] == math.log2(16)
    assert 0 < metrics["prior_bits_per_code"] < math.log2(16)
    for name in ("sample_diversity", "real_diversity"):
        assert 0 <= metrics[name] <= 2, name
    for name in ("sample_nn_ssim", "real_nn_ssim"):
        assert -1 <= metrics[name] <= 1, name
    assert metrics["num_samples"] == metrics["num_real"] == 4
    assert metrics["diversity_metric"] == "1 - SSIM"  # 32 px: too small for MS-SSIM
    assert (run / "plots" / "samples_vs_real.png").is_file()
    assert "prior_bits_per_code" in result.output and "sample_nn_ssim" in result.output

    result = invoke("evaluate", run, "--data", tiny_adni, "--json", report)
    assert result.exit_code == 0, result.output
    metrics = read(report)
    assert "prior_bits_per_code" in metrics and "sample_diversity" not in metrics


def retrain_vqvae(run_dir: Path) -> str:
    """Stand-in for retraining the VQ-VAE: change its weights, save it and its metadata."""
    from keras_vqpix.run_folder import save_model, weights_fingerprint, write_json

    model = keras.saving.load_model(run_dir / "vqvae.keras", compile=False)
    bias = model.decoder.output_conv.bias
    bias.assign(bias.numpy() + 0.5)
    save_model(model, run_dir / "vqvae.keras")
    fingerprint = weights_fingerprint(
        keras.saving.load_model(run_dir / "vqvae.keras", compile=False)
    )
    write_json(run_dir / "vqvae.json", read(run_dir / "vqvae.json") | {"fingerprint": fingerprint})
    return fingerprint


def test_a_prior_of_another_vqvae_is_refused_and_its_checkpoints_discarded(run_copy, tmp_path):
    from keras_vqpix.run_folder import RunFolderError, RunPaths, load_prior
    from keras_vqpix.training.prior_training import _discard_stale_prior

    fingerprint = retrain_vqvae(run_copy)
    result = invoke("sample", run_copy, "--num", 2, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    assert "retrained or replaced" in result.output and "--stage prior" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(RunFolderError, match="trained on the codes of VQ-VAE"):
        load_prior(run_copy)
    # What `vqpix train --stage prior` does first: the old prior's checkpoints are not resumed.
    messages = []
    paths = RunPaths(run_copy)
    _discard_stale_prior(paths, fingerprint, messages.append)
    assert messages == [
        "Prior: the VQ-VAE changed since the prior was trained; training the prior afresh"
    ]
    assert not paths.prior_model.exists() and not paths.prior_meta.exists()
    assert not list(paths.prior_checkpoints.glob("ckpt-*"))
    assert (paths.prior_checkpoints / "vqvae_fingerprint.txt").read_text().strip() == fingerprint
    _discard_stale_prior(paths, fingerprint, messages.append)
    assert len(messages) == 1


def test_train_stage_prior_resumes_and_trains_longer(run_copy, tiny_adni):
    result = invoke(
        "train", "--stage", "prior", "--prior-epochs", 4, "--data", tiny_adni, "--out", run_copy
    )
    assert result.exit_code == 0, result.output
    assert "Prior: resuming from epoch 3" in result.output
    rows = (run_copy / "prior_history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]


def test_a_prior_resumed_from_an_older_checkpoint_ends_as_the_uninterrupted_one(
    run_copy, tiny_adni
):
    # The newest prior checkpoint (epoch 3 of 3) damaged: the run resumes from epoch 2 and
    # must train epoch 3 again bit for bit, label-dropout draws included.
    import tensorflow as tf

    def checkpoint_values(path: str) -> dict[str, np.ndarray]:
        reader = tf.train.load_checkpoint(path)
        names = reader.get_variable_to_shape_map()
        return {n: reader.get_tensor(n) for n in names if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}

    checkpoints = run_copy / "checkpoints" / "prior"
    newest = tf.train.latest_checkpoint(str(checkpoints))
    assert newest.endswith("ckpt-3")
    expected = checkpoint_values(newest)
    history = (run_copy / "prior_history.csv").read_text()
    data_file = Path(newest + ".data-00000-of-00001")
    data_file.write_bytes(data_file.read_bytes()[:100])

    result = invoke("train", "--stage", "prior", "--data", tiny_adni, "--out", run_copy)
    assert result.exit_code == 0, result.output
    assert "cannot be read" in result.output
    assert "Prior: resuming from epoch 2" in result.output
    actual = checkpoint_values(tf.train.latest_checkpoint(str(checkpoints)))
    assert sorted(actual) == sorted(expected)
    assert any(name.startswith("random_state/") for name in actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert (run_copy / "prior_history.csv").read_text() == history


def test_an_unconditional_prior_refuses_a_label(run_copy, tmp_path):
    from keras_vqpix.models.pixelcnn import PixelCNN
    from keras_vqpix.run_folder import save_model, weights_fingerprint, write_json

    prior = PixelCNN(
        num_embeddings=16,
        num_layers=1,
        filters=8,
        embedding_dim=4,
        conditional=False,
        code_shape=(8, 8),
    )
    prior(np.zeros((1, 8, 8), np.int32))
    save_model(prior, run_copy / "prior.keras")
    meta = read(run_copy / "prior.json") | {"fingerprint": weights_fingerprint(prior)}
    write_json(run_copy / "prior.json", meta)
    result = invoke("sample", run_copy, "--num", 2, "--label", "NC", "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    assert "unconditional" in result.output and "--label" in result.output
    result = invoke("sample", run_copy, "--num", 2, "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "s").glob("*.npy")) == [
        "sample_000_unconditional.npy",
        "sample_001_unconditional.npy",
    ]


def test_evaluate_samples_without_a_prior_is_refused(run_copy, tiny_adni):
    (run_copy / "prior.keras").unlink()
    result = invoke("evaluate", run_copy, "--data", tiny_adni, "--samples", 2)
    assert result.exit_code == 2, result.output
    assert "--samples 2 needs the prior" in result.output
