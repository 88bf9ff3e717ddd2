"""Kill -9 and resume, divergence, damaged checkpoints, other configs, two trainers, determinism.

Every run here trains the quick config on `odd_adni` (clean slices plus odd and broken files)
for 3 epochs of about 9 steps (batch 4), so the quantizer's dead-code restarts (after 20 idle
steps) fire within the run and its random draws must survive a resume. The tolerance for
"the same result" is zero: on CPU, a resumed run and a second run of the same seed end with
bit-identical weights, optimizer state and history.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix.data.discover import display_path
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")

EPOCHS = 3
BATCH = 4
TIMEOUT = 300  # seconds for one `vqpix train` subprocess, TensorFlow's import included


def train_args(data: Path, out: Path, epochs: int = EPOCHS, *extra: str) -> list[str]:
    return ["train", "--config", "quick", "--stage", "vqvae", "--image-size", "32"] + [
        "--batch-size",
        str(BATCH),
        "--seed",
        "0",
        "--epochs",
        str(epochs),
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]


def train(data: Path, out: Path, epochs: int = EPOCHS, *extra: str):
    return CliRunner().invoke(main, train_args(data, out, epochs, *extra))


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def checkpoint_values(run: Path) -> dict[str, np.ndarray]:
    """Every variable of the newest checkpoint: weights, optimizer, random state, epoch."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run / "checkpoints" / "vqvae"))
    names = [n for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return {name: np.asarray(reader.get_tensor(name)) for name in names}


def model_weights(run: Path) -> list[np.ndarray]:
    import keras

    from keras_vqpix.models import vqvae  # noqa: F401  (registers the classes)

    return keras.saving.load_model(run / "vqvae.keras", compile=False).get_weights()


def history(run: Path) -> list[dict[str, float]]:
    from keras_vqpix.training.callbacks import read_history

    return read_history(run / "history.csv")


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical checkpoint, best model and history (tolerance 0)."""
    expected, actual = checkpoint_values(reference), checkpoint_values(run)
    assert sorted(actual) == sorted(expected)
    assert any(name.startswith("random_state/") for name in actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    for a, b in zip(model_weights(run), model_weights(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history(run) == history(reference)


def snapshot(run: Path, skip: tuple[str, ...] = ("logs",)) -> dict[str, bytes]:
    """Contents of every file in the run folder, but for the top-level entries in `skip`."""
    return {
        str(path.relative_to(run)): path.read_bytes()
        for path in sorted(run.rglob("*"))
        if path.is_file() and path.relative_to(run).parts[0] not in skip
    }


@pytest.fixture(scope="module")
def reference(time_limit, odd_adni, tmp_path_factory) -> tuple[Path, Path, str]:
    """An uninterrupted run: (data folder, run folder, its output)."""
    data, _ = odd_adni
    run = tmp_path_factory.mktemp("reference") / "run"
    result = train(data, run)
    assert result.exit_code == 0, result.output
    return data, run, result.output


@pytest.mark.large
def test_an_uninterrupted_run_lists_the_skipped_files_and_has_every_epoch_once(reference, odd_adni):
    data, run, output = reference
    _, odd = odd_adni
    unreadable = sorted(display_path(name) for name in odd["unreadable"])
    warnings = [line for line in output.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and str(run / "skipped_files.txt") in warnings[0]
    assert f"skipped {len(unreadable)} of " in warnings[0]
    listed = (run / "skipped_files.txt").read_text().splitlines()
    assert listed[0].startswith("#")
    assert sorted(line.split("\t")[0] for line in listed[1:]) == unreadable
    assert [row["epoch"] for row in history(run)] == list(range(1, EPOCHS + 1))
    assert "resuming" not in output
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]  # no temporary left behind


@pytest.mark.large
def test_two_runs_with_the_same_seed_give_identical_weights(reference, tmp_path):
    data, run, _ = reference
    again = tmp_path / "again"
    result = train(data, again)
    assert result.exit_code == 0, result.output
    assert_same_run(again, run)


class OutputReader:
    """Collect a subprocess's output in a thread, so the test can poll it while it runs."""

    def __init__(self, stream):
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            self.chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def finished_epochs(run: Path) -> int:
    """The epoch of the newest checkpoint named in the CheckpointManager's index file."""
    index = (run / "checkpoints" / "vqvae" / "checkpoint").read_text()
    return int(re.search(r'model_checkpoint_path: ".*ckpt-(\d+)"', index).group(1))


@pytest.mark.large
def test_sigkill_mid_epoch_then_the_same_command_resumes_exactly(reference, tmp_path):
    data, reference_run, _ = reference
    run = tmp_path / "killed"
    # --deterministic too: it must not change CPU results (the reference runs without it).
    command = [sys.executable, "-m", "keras_vqpix_cli.main"]
    command += train_args(data, run, EPOCHS, "--deterministic")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = OutputReader(process.stdout)
    deadline = time.monotonic() + TIMEOUT
    try:
        # Kill once epoch 1 is checkpointed and epoch 2 has finished a step.
        while True:
            text = output.text()
            in_epoch_2 = re.search(r"Epoch 2/\d+\s.*?\d+/\d+", text, re.DOTALL)  # a step's progress
            if (run / "checkpoints" / "vqvae" / "checkpoint").is_file() and in_epoch_2:
                break
            assert process.poll() is None, f"ended before it could be killed:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"epoch 2 never started:\n{text[-3000:]}"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        output.thread.join(timeout=60)
    done = finished_epochs(run)
    assert 1 <= done < EPOCHS, output.text()[-3000:]
    # The history may hold the killed epoch's row (written just before its checkpoint).
    assert [row["epoch"] for row in history(run)] in (
        list(range(1, done + 1)),
        list(range(1, done + 2)),
    )

    restarted = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert f"resuming from epoch {done} " in restarted.stdout
    assert [row["epoch"] for row in history(run)] == list(range(1, EPOCHS + 1))
    assert_same_run(run, reference_run)


@pytest.mark.large
def test_a_diverged_run_exits_1_keeps_its_last_good_epoch_and_resumes_from_it(
    reference, tmp_path, monkeypatch
):
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.data.pipeline import steps_per_epoch
    from keras_vqpix.models.vqvae import VQVAE
    from keras_vqpix.run_folder import load_splits
    from keras_vqpix.training.callbacks import EpochCheckpoint

    data, reference_run, _ = reference
    run = tmp_path / "diverged"
    config = get_config("quick").replace(**{"data.batch_size": BATCH})
    steps = steps_per_epoch(len(load_splits(data, config).train), BATCH)
    healthy = VQVAE.reconstruction_loss

    def poisoned(self, images, reconstruction):
        # NaN from the second step of epoch 2 on (the optimizer counts applied steps).
        loss = healthy(self, images, reconstruction)
        return tf.where(self.optimizer.iterations >= steps + 1, float("nan"), loss)

    # The same command as the reference (same epochs, so the same learning-rate schedule),
    # recording the run folder as each epoch ends.
    snapshots = []
    record = EpochCheckpoint.on_epoch_end

    def recording(self, epoch, logs=None):
        record(self, epoch, logs)
        snapshots.append(snapshot(run, skip=("logs", "config.json")))

    monkeypatch.setattr(VQVAE, "reconstruction_loss", poisoned)
    monkeypatch.setattr(EpochCheckpoint, "on_epoch_end", recording)
    result = train(data, run)
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert "training diverged: the loss became nan at epoch 2, step 2" in line
    assert str(run) in line and "--seed" in line
    assert len(snapshots) == 1, "only epoch 1 finished"
    assert snapshot(run, skip=("logs", "config.json")) == snapshots[0], (
        "epoch 1's files are untouched"
    )

    monkeypatch.undo()
    result = train(data, run)
    assert result.exit_code == 0, result.output
    assert "resuming from epoch 1 " in result.output
    assert_same_run(run, reference_run)


@pytest.mark.large
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path):
    data, reference_run, _ = reference
    run = tmp_path / "damaged"
    shutil.copytree(reference_run, run)
    newest = run / "checkpoints" / "vqvae" / f"ckpt-{EPOCHS}.data-00000-of-00001"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = train(data, run)
    assert result.exit_code == 0, result.output
    assert re.search(rf"warning: checkpoint .*ckpt-{EPOCHS} cannot be read", result.output)
    assert f"resuming from epoch {EPOCHS - 1} " in result.output
    assert_same_run(run, reference_run)


@pytest.mark.large
def test_no_readable_checkpoint_is_refused_and_nothing_is_touched(reference, tmp_path):
    data, reference_run, _ = reference
    run = tmp_path / "unreadable"
    shutil.copytree(reference_run, run)
    for path in (run / "checkpoints" / "vqvae").glob("ckpt-*.index"):
        path.write_bytes(b"garbage")
    before = snapshot(run, skip=())
    result = train(data, run)
    assert result.exit_code == 2, result.output
    assert "no checkpoint in" in error_line(result.output)
    assert "--overwrite" in error_line(result.output)
    assert snapshot(run, skip=()) == before


@pytest.mark.large
def test_a_run_of_another_config_is_refused_and_overwrite_replaces_it(reference, tmp_path):
    data, reference_run, _ = reference
    run = tmp_path / "other"
    shutil.copytree(reference_run, run)
    before = snapshot(run, skip=())
    result = CliRunner().invoke(
        main, train_args(data, run)[:-2] + ["--out", str(run), "--seed", "1"]
    )
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "holds a run of another config (seed: 0 there, 1 here)" in line
    assert "repeat its options to resume it" in line and "--overwrite" in line
    assert snapshot(run, skip=()) == before

    result = train(data, run, 1, "--seed", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert '"seed": 1' in (run / "config.json").read_text()
    assert [row["epoch"] for row in history(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints" / "vqvae").glob("*.index")) == [
        "ckpt-1.index"
    ]
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]


@pytest.mark.large
def test_a_second_trainer_on_the_same_folder_is_refused(reference, tmp_path):
    from keras_vqpix.run_folder import RunPaths, run_folder_lock

    data, reference_run, _ = reference
    run = tmp_path / "busy"
    shutil.copytree(reference_run, run)
    before = snapshot(run, skip=())
    with run_folder_lock(RunPaths(run)):
        result = train(data, run)
    assert result.exit_code == 2, result.output
    assert "in use by another vqpix train" in error_line(result.output)
    assert snapshot(run, skip=()) == before
