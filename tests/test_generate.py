"""`vqpix generate`: synthetic and reconstructed data sets in the ADNI layout."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from keras_vqpix.data.discover import discover_folder, discover_splits
from keras_vqpix.data.pipeline import resize_with_pad
from keras_vqpix.run_folder import RunPaths, load_splits, read_config
from keras_vqpix.synthetic import NOISE_FIT_SLICES, padding_box, run_frame, to_frame
from keras_vqpix_cli.main import main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpeg"))}


def test_to_frame_undoes_the_pipelines_padding():
    for width, height, size in ((256, 240, 32), (240, 256, 64), (300, 100, 48)):
        ones = tf.ones((height, width, 1))
        padded = resize_with_pad(ones, size).numpy()[None]
        top, left, h, w = padding_box((width, height), size)
        assert padded[0, top : top + h, left : left + w].min() > 0.99  # the slice
        assert padded[0].sum() == pytest.approx(h * w, abs=1e-3)  # the rest is padding
        back = to_frame(padded, (width, height))
        assert back.shape == (1, height, width) and back.min() >= 252


def test_generate_writes_a_data_set_that_trains_and_reproduces(quick_run, tmp_path):
    out = tmp_path / "syn"
    # The prior's own draw (single slices are refined by default: the next test).
    args = ["generate", str(quick_run), "--per-class", "5", "--test-fraction", "0.4"]
    args += ["--refine", "1"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "Wrote 10 slices" in result.output
    # The frame was recorded at training time: the tiny data's 256x240 slices.
    assert json.loads((quick_run / "split.json").read_text())["frame"] == [256, 240]
    splits = discover_splits(out)
    train, test = splits.train + splits.validation, splits.test
    assert len(train) == 6 and len(test) == 4
    assert all(r.patient.startswith("syn3-") for r in train + test)
    assert {r.label for r in test} == {0, 1}
    with Image.open(test[0].path) as image:
        assert image.size == (256, 240) and image.mode == "L"
    rows = list(csv.DictReader((out / "manifest.csv").read_text().splitlines()))
    assert len(rows) == 10 and {"file", "split", "label", "seed", "temperature"} <= set(rows[0])
    assert all((out / row["file"]).is_file() for row in rows)
    record = json.loads((out / "generator.json").read_text())
    assert (
        record["kind"] == "samples"
        and record["prior_fingerprint"]
        and record["frame"] == [256, 240]
    )
    assert record["options"]["seed"] == 3 and "vqpix generate" in record["command"]
    assert record["options"]["refine"] == 1 and "--refine" not in record["command"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    # Same seed, same bytes.
    again = tmp_path / "again"
    assert CliRunner().invoke(main, [*args, "--out", str(again), "--seed", "3"]).exit_code == 0
    assert _files(again) == _files(out)

    # `vqpix train` reads it unchanged.
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            "quick",
            "--data",
            str(out),
            "--out",
            str(run),
            "--stage",
            "vqvae",
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output


def test_generate_refuses_bad_options_in_one_line(quick_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (["--out", str(taken)], "not empty"),
        (["--out", str(tmp_path / "a"), "--per-class", "0"], "--per-class"),
        (["--out", str(tmp_path / "b"), "--size", "256"], "WIDTHxHEIGHT"),
        (["--out", str(tmp_path / "c"), "--reconstruct", str(quick_run), "--seed", "2"], "--seed"),
        (["--out", str(tmp_path / "d"), "--temperature", "0"], "--temperature"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(main, ["generate", str(quick_run), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output
    assert (taken / "keep.txt").read_text() == "mine"


def test_reconstruct_keeps_layout_patients_and_frame(quick_run, tiny_adni, tmp_path):
    out = tmp_path / "rec"
    result = CliRunner().invoke(
        main, ["generate", str(quick_run), "--reconstruct", str(tiny_adni), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for split in ("train", "test"):
        source = discover_folder(tiny_adni, split)
        written = discover_folder(out, split)
        assert [f"rec-{r.patient}" for r in source] == [r.patient for r in written]
        assert [r.label for r in source] == [r.label for r in written]
    with Image.open(written[0].path) as image:
        assert image.size == (256, 240)
    assert json.loads((out / "generator.json").read_text())["kind"] == "reconstructions"


def test_run_frame_of_a_run_trained_before_frames_were_recorded(quick_run, tmp_path):
    run = tmp_path / "old_run"
    run.mkdir()
    record = json.loads((quick_run / "split.json").read_text())
    record.pop("frame")
    (run / "split.json").write_text(json.dumps(record))
    assert run_frame(run) == (256, 240)  # read from a slice of the recorded data folder
    (run / "split.json").write_text(json.dumps({**record, "data": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match="--size"):
        run_frame(run)
    assert np.array_equal(padding_box((256, 240), 32), (1, 0, 30, 32))


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(root)): np.asarray(Image.open(p), np.float32) / 255.0
        for p in sorted(root.rglob("*.jpeg"))
    }


def test_generate_draws_the_runs_noise_levels(quick_run, tiny_adni, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    (run / "noise.json").unlink(missing_ok=True)
    args = ["generate", str(run), "--per-class", "4", "--slices-per-patient", "2", "--seed", "1"]

    def generate(out: str, *extra: str) -> Path:
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
        return tmp_path / out

    plain = generate("plain", "--no-noise")
    assert not (run / "noise.json").exists()  # noise-free: nothing fitted
    record = json.loads((plain / "generator.json").read_text())
    assert record["noise"] is None and record["command"].endswith("--no-noise")
    generate("fitted")
    fitted = json.loads((run / "noise.json").read_text())  # fitted on first use, on train
    vqvae_meta = json.loads((run / "vqvae.json").read_text())
    assert fitted["vqvae_fingerprint"] == vqvae_meta["fingerprint"]
    paths = RunPaths(run)
    train = load_splits(tiny_adni, read_config(paths), paths).train
    assert len(fitted["levels"]["brain"]) == min(len(train), NOISE_FIT_SLICES)

    # Known levels in the cache: the slices carry them, one level per patient.
    size = len(fitted["levels"]["labels"])
    known = {**fitted, "levels": {**fitted["levels"], "brain": [0.05] * size}}
    known["levels"]["background"] = [0.02] * size
    (run / "noise.json").write_text(json.dumps(known))
    loud = generate("loud")
    rows = list(csv.DictReader((loud / "manifest.csv").read_text().splitlines()))
    assert {(r["noise_brain"], r["noise_background"]) for r in rows} == {("0.050000", "0.020000")}
    means, noisy = _pixels(plain), _pixels(loud)
    assert means.keys() == noisy.keys()
    for name, mean in means.items():
        # The brain's noise (the tiny run's slices are brain-bright nearly everywhere; the
        # surround's Rayleigh is test_noise's), through 8 bits and JPEG.
        bright = mean > 0.3
        assert bright.mean() > 0.2, name
        assert np.std(noisy[name][bright] - mean[bright]) == pytest.approx(0.05, rel=0.2)

    rec = tmp_path / "rec"
    result = CliRunner().invoke(
        main, ["generate", str(run), "--reconstruct", str(tiny_adni), "--out", str(rec)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((rec / "manifest.csv").read_text().splitlines()))
    assert {r["noise_brain"] for r in rows} == {"0.050000"}
    assert json.loads((rec / "generator.json").read_text())["options"]["noise"] is True

    # A damaged cache is no cache: fitted again (and rewritten) instead of failing.
    (run / "noise.json").write_text("{not json")
    generate("after_damage")
    assert json.loads((run / "noise.json").read_text())["levels"] == fitted["levels"]

    # Levels to fit and no training slices to fit them on: one line naming the way out.
    (run / "noise.json").unlink()
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "data": str(tmp_path / "gone")}))
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "no_data")])
    assert result.exit_code == 2 and "--no-noise" in result.output, result.output
    assert not (tmp_path / "no_data").exists()
    assert (
        CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--no-noise"]).exit_code == 0
    )
    # --refine weighs samples against the same training slices: the same kind of line.
    refined = ["generate", str(run), "--per-class", "2", "--no-noise", "--refine", "2"]
    result = CliRunner().invoke(main, [*refined, "--out", str(tmp_path / "no_refine")])
    assert result.exit_code == 2 and "leave out --refine" in result.output, result.output
    assert not (tmp_path / "no_refine").exists()


def test_generate_refine_keeps_each_class_and_records_each_slices_draw(quick_run, tmp_path):
    from keras_vqpix.run_folder import load_prior, load_vqvae
    from keras_vqpix.sampling import decode_codes, sample_codes
    from keras_vqpix.synthetic import batch_seed

    # Single slices are refined from 3 candidates each unless --refine says otherwise.
    args = ["generate", str(quick_run), "--per-class", "6", "--test-fraction", "0.5"]
    args += ["--no-noise", "--seed", "2"]
    out = tmp_path / "refined"
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Wrote 12 slices" in result.output
    rows = list(csv.DictReader((out / "manifest.csv").read_text().splitlines()))
    for name in ("NC", "AD"):
        assert (
            sorted(r["split"] for r in rows if r["label"] == name) == ["test"] * 3 + ["train"] * 3
        )
    record = json.loads((out / "generator.json").read_text())
    assert record["options"]["refine"] == 3 and "--refine 3" in record["command"]
    assert record["refine"]["candidates"] == 36 and record["refine"]["kept"] == 12
    # By default the real side is every training patient.
    split = json.loads((quick_run / "split.json").read_text())
    assert record["refine"]["real_patients"] == len(split["train"])
    # The kept are 12 distinct maps of the one batch of 36 candidates (18 per class)...
    assert {r["seed"] for r in rows} == {str(batch_seed(2, 0))}
    index = sorted(int(r["map_index"]) for r in rows)
    assert len(set(index)) == 12 and index[5] < 18 <= index[6]
    # ... and each file is its map: drawn again from the manifest's seed and index.
    vqvae, _, vqvae_meta = load_vqvae(quick_run)
    prior, _ = load_prior(quick_run, vqvae_meta)
    labels = np.repeat(np.arange(2, dtype=np.int32), 18)
    redrawn = to_frame(
        decode_codes(vqvae, sample_codes(prior, 36, batch_seed(2, 0), labels)), (256, 240)
    )
    for row in rows:
        written = np.asarray(Image.open(out / row["file"]), np.float32)
        assert np.abs(written - redrawn[int(row["map_index"])]).mean() < 2.0, row["file"]
    again = tmp_path / "again"
    assert CliRunner().invoke(main, [*args, "--out", str(again)]).exit_code == 0
    assert _files(again) == _files(out)  # same seed, same bytes

    for refused, message in (
        ([*args, "--refine", "3", "--slices-per-patient", "2"], "--refine applies to single"),
        (
            ["generate", str(quick_run), "--reconstruct", str(quick_run), "--refine", "2"],
            "--refine applies to sampling",
        ),
    ):
        result = CliRunner().invoke(main, [*refused, "--out", str(tmp_path / "no")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "no").exists()


def test_generate_refine_weighs_against_the_chosen_training_patients_only(quick_run, tmp_path):
    from keras_vqpix.config import RefineConfig
    from keras_vqpix.run_folder import RunFolderError
    from keras_vqpix.synthetic import generate_dataset

    paths = RunPaths(quick_run)
    split = json.loads(paths.split.read_text())
    records = load_splits(split["data"], read_config(paths), paths).train
    chosen = sorted({r.patient for r in records})[:2]
    expected = sum(r.patient in chosen for r in records)

    def generate(name: str, patients: tuple[str, ...]) -> Path:
        out = tmp_path / name
        generate_dataset(
            quick_run,
            out,
            per_class=2,
            seed=1,
            noise=False,
            refine=2,
            refine_config=RefineConfig(patients=patients),
        )
        return out

    record = json.loads((generate("two", tuple(chosen)) / "generator.json").read_text())["refine"]
    assert record["real_patients"] == 2 and record["real_slices"] == expected > 0
    assert record["config"]["patients"] == chosen and len(split["train"]) > 2

    with pytest.raises(RunFolderError, match="nobody_99"):
        generate("unknown", (chosen[0], "nobody_99"))
    assert not (tmp_path / "unknown").exists()
