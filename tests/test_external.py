"""External validation (`vqpix evaluate RUN --data OTHER`), tracing the encoder once, a quiet CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_slice

from keras_vqpix.data.discover import DatasetLayoutError, discover_records
from keras_vqpix.evaluation import evaluation_records
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")


def one_patient_nc(root: Path, patient: str = "exNC000_S_0000", slices: int = 3) -> Path:
    """ROOT/test/NC holding one patient, nothing else."""
    rng = np.random.default_rng(5)
    for s in range(slices):
        write_slice(root / "test" / "NC" / f"{patient}_{80 + s}.jpeg", rng, size=(64, 60))
    return root


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    """Demo data of patients the quick run never saw: one per class in train/ and in test/, 2 slices each."""
    from keras_vqpix.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("unseen") / "data"
    generate_demo_dataset(
        root, seed=3, train_patients_per_class=1, test_patients_per_class=1, slices_per_patient=2
    )
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def evaluate(*args) -> tuple[dict, str]:
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    assert result.exit_code == 0, result.output
    json_path = Path(args[args.index("--json") + 1])
    return json.loads(json_path.read_text()), result.output


def test_discover_records_reads_test_alone_one_class_one_patient(tmp_path):
    root = one_patient_nc(tmp_path / "ext")
    records, skipped = discover_records(root)
    assert [(r.patient, r.slice_index, r.label) for r in records] == [
        ("exNC000_S_0000", 80 + s, 0) for s in range(3)
    ]
    assert skipped == ()
    assert discover_records(root, None)[0] == records  # every folder present: test/ alone
    with pytest.raises(DatasetLayoutError, match=re.escape(str(root / "train"))):
        discover_records(root, ("train",))
    with pytest.raises(DatasetLayoutError, match="neither a train nor a test folder"):
        discover_records(tmp_path, None)


def test_external_copy_of_the_test_folder_gives_the_test_split_figures(
    quick_run, tiny_adni, tmp_path
):
    from keras_vqpix.evaluation import evaluate_reconstructions
    from keras_vqpix.run_folder import load_vqvae

    shutil.copytree(tiny_adni / "test", tmp_path / "copy" / "test")
    external, _ = evaluate(
        quick_run, "--data", tmp_path / "copy", "--json", tmp_path / "external.json"
    )
    assert external["external"] is True and external["num_images"] == 16
    own = evaluation_records(quick_run, tiny_adni)
    assert not own.external and own.splits is not None
    assert own.describe() == "test split: 16 images of 4 patients (NC 8, AD 8)"
    model, config, _ = load_vqvae(quick_run)
    size, batch = config.data.image_size, config.data.batch_size
    factor = config.vqvae.downsample_factor
    expected = evaluate_reconstructions(model, own.records, size, batch, factor)
    # ... and the prior's bits per code on the test split, recorded when it was trained.
    expected["prior_bits_per_code"] = json.loads((quick_run / "prior.json").read_text())[
        "test_bits_per_code"
    ]
    for key in ("ssim", "ssim_foreground", "psnr", "mse", "perplexity", "prior_bits_per_code"):
        assert external[key] == pytest.approx(expected[key], rel=1e-6), key
    # The run's own data keeps its checks: every slice of it would mix in training slices.
    with pytest.raises(ValueError, match="--split all would mix its training slices"):
        evaluation_records(quick_run, tiny_adni, "all")


def test_external_data_of_unseen_patients_every_slice_or_test_folder(quick_run, unseen, tmp_path):
    data = evaluation_records(quick_run, unseen, "all")
    assert data.external and data.splits is None and data.split == "all"
    assert (len(data.records), len({r.patient for r in data.records})) == (8, 4)
    assert data.describe() == (
        f"external data {unseen} (every slice): 8 images of 4 patients (NC 4, AD 4)"
    )
    test = evaluation_records(quick_run, unseen, "test")
    assert [r.path for r in test.records] == [
        r.path for r in data.records if Path(r.path).parent.parent.name == "test"
    ]
    # A folder holding a patient the run was trained on is no external test.
    root = tmp_path / "leaky"
    shutil.copytree(unseen / "test", root / "test")
    split = json.loads((quick_run / "split.json").read_text())
    trained = next(Path(split["data"]).glob(f"train/*/{split['train'][0]}_*"))
    shutil.copy(trained, root / "test" / trained.parent.name)
    with pytest.raises(ValueError, match="model never saw"):
        evaluation_records(quick_run, root, "test")


def test_encoding_several_splits_traces_the_encoder_once(tiny_adni):
    import keras

    from keras_vqpix.codes import encode_function, encode_records
    from keras_vqpix.config import get_config
    from keras_vqpix.data.discover import discover_splits
    from keras_vqpix.models.vqvae import VQVAE
    from keras_vqpix.sample_quality import load_images

    config = get_config("quick")
    keras.utils.set_random_seed(0)
    model = VQVAE.from_run_config(config.vqvae, seed=0)
    size = config.data.image_size
    model(np.zeros((1, size, size, 1), np.float32))  # built, as a trained model is
    splits = discover_splits(tiny_adni)
    batch = config.data.batch_size
    # Splits whose last batches differ in size: before, each split and shape was traced anew.
    records = [splits.train[:5], splits.train[:11], splits.train[: batch + 3]]
    traces = []
    encode = model.encode
    model.encode = lambda images: traces.append(images.shape) or encode(images)
    codes = [encode_records(model, r, config)[0] for r in records]
    assert len(traces) == 1 and traces[0].as_list() == [None, size, size, 1]
    function = encode_function(model, size)
    assert function.experimental_get_tracing_count() == 1
    assert encode_function(model, size) is function
    images = load_images(records[-1], size)
    np.testing.assert_array_equal(codes[-1], encode(images).numpy())
    np.testing.assert_array_equal(codes[0], codes[-1][:5])


def test_external_test_folder_of_one_patient_in_a_quiet_cli(quick_run, unseen, tmp_path):
    """`vqpix evaluate` as a user runs it: external data, and none of TensorFlow's log lines."""
    root = tmp_path / "ext"
    shutil.copytree(unseen / "test" / "NC", root / "test" / "NC")  # one patient, 2 slices
    before = snapshot(quick_run)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "keras_vqpix_cli.main", "evaluate", str(quick_run)]
    result = subprocess.run(
        [*command, "--data", str(root), "--json", str(tmp_path / "m.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    noise = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cuda|remapper", re.I | re.M)
    assert not noise.search(result.stdout + result.stderr), result.stdout + result.stderr
    assert f"external data {root} (test/): 2 images of 1 patients (NC 2, AD 0)" in result.stdout
    assert "external validation" in result.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["external"] is True and metrics["data"] == str(root.resolve())
    assert (metrics["split"], metrics["num_images"], metrics["num_patients"]) == ("test", 2, 1)
    assert 0 < metrics["ssim"] <= 1 and metrics["prior_bits_per_code"] > 0
    assert snapshot(quick_run) == before  # nothing written into the run (no code cache)

    # No train or validation split of someone else's data; samples need the run's own data.
    for split in ("validation", "train"):
        with pytest.raises(ValueError, match=f"has no {split} split of that run"):
            evaluation_records(quick_run, root, split)
    refused = CliRunner().invoke(
        main, ["evaluate", str(quick_run), "--data", str(root), "--split", "val"]
    )
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    refused = CliRunner().invoke(
        main, ["evaluate", str(quick_run), "--data", str(root), "--samples", "2"]
    )
    assert refused.exit_code == 2 and "is external data" in refused.output

    # A user's own log level is kept (checked without importing TensorFlow).
    code = "import os; from keras_vqpix_cli.quiet import quiet_tensorflow; quiet_tensorflow(); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    for given, expected in (("0", "0"), (None, "3")):
        child_env = env if given is None else {**env, "TF_CPP_MIN_LOG_LEVEL": given}
        out = subprocess.run(
            [sys.executable, "-c", code], env=child_env, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr
