"""Keras callbacks shared by both training stages: history, checkpoints, best model, divergence."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from keras_vqpix.io import atomic_write_text
from keras_vqpix.run_folder import (
    RunFolderError,
    fingerprint_number,
    read_json,
    save_model,
    weights_fingerprint,
    write_json,
)
from keras_vqpix.training.distribute import last_weights


@contextlib.contextmanager
def seeded_construction(seed: int) -> Iterator[None]:
    """Models built in the block draw their initial weights from `seed`, and only they.

    Keras gives every initializer and `SeedGenerator` created without a seed one drawn from
    Python's `random` module at creation. This block seeds that module with `seed` (what
    `keras.utils.set_random_seed(seed)` does to it, so the weights are the same) and restores
    its state afterwards: building a model no longer reseeds the process's global RNGs
    (`random`, NumPy, TensorFlow, Keras), which code around it may rely on.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite (the message names the epoch, and the step if known)."""


def read_history(path: Path) -> list[dict[str, float]]:
    """Rows of a history CSV as dicts of floats (epoch as int)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Write history rows atomically (the whole file each time: never a torn last line)."""
    columns = ["epoch"] + sorted({key for row in rows for key in row if key != "epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in columns})
    atomic_write_text(path, buffer.getvalue())


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: history row, resumable checkpoint, and the best model so far.

    Order matters for a kill at any moment: the history row is written first, then the
    checkpoint (see `training_checkpoint`) via `tf.train.CheckpointManager`, whose index file is
    replaced atomically, then the best model. A resumed run starts after the last epoch whose
    checkpoint is complete and drops history rows beyond it; a kill between an epoch's
    checkpoint and its best-model save is mended by `save_missing_best` on resuming (the
    restored weights are that epoch's).

    Args:
        history_path: CSV file, one row per epoch.
        manager: `tf.train.CheckpointManager` of a checkpoint holding an `epoch` variable.
        epoch_variable: the checkpoint's `tf.Variable` count of finished epochs.
        monitor: metric deciding the best model, e.g. "val_ssim".
        on_best: called with (epoch, logs) when `monitor` improves on `best`.
        best: the best value so far (from an earlier, resumed run); default: none yet.
        history: rows of earlier epochs (from an earlier, resumed run).
        mode: "max" (higher `monitor` is better, e.g. SSIM) or "min" (e.g. bits per code).
    """

    def __init__(
        self,
        history_path: Path,
        manager: tf.train.CheckpointManager,
        epoch_variable: tf.Variable,
        monitor: str,
        on_best: Callable[[int, dict], None],
        best: float | None = None,
        history: list[dict[str, float]] | None = None,
        mode: str = "max",
    ):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'. Received: mode={mode!r}")
        self.mode = mode
        if best is None:
            best = -math.inf if mode == "max" else math.inf
        self.history_path = Path(history_path)
        self.manager = manager
        self.epoch_variable = epoch_variable
        self.monitor = monitor
        self.on_best = on_best
        self.best = best
        self.rows = list(history or [])

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        bad = [key for key, value in logs.items() if not math.isfinite(value) and "loss" in key]
        if bad:
            raise TrainingDivergedError(
                f"{bad[0]} is {logs[bad[0]]} at the end of epoch {epoch + 1}"
            )
        self.rows.append({"epoch": epoch + 1, **logs})
        write_history(self.history_path, self.rows)
        self.epoch_variable.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)
        self._save_if_best(epoch + 1, logs)

    def save_missing_best(self) -> None:
        """After a restore: save the restored epoch as the best model if it is and was not saved.

        A kill between an epoch's checkpoint and its best-model save leaves that epoch's history
        row beating the saved best; the restored weights are that epoch's, so save them now.
        """
        finished = int(self.epoch_variable.numpy())
        if self.rows and self.rows[-1]["epoch"] == finished:
            row = self.rows[-1]
            self._save_if_best(finished, {k: v for k, v in row.items() if k != "epoch"})

    def _save_if_best(self, epoch: int, logs: dict) -> None:
        value = logs.get(self.monitor)
        improved = value is not None and (
            value > self.best if self.mode == "max" else value < self.best
        )
        if improved:
            self.best = value
            self.on_best(epoch, logs)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite, naming the epoch and step.

    The exception propagates out of `fit` before the epoch's checkpoint is written, so the last
    good checkpoint stays untouched.
    """

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDivergedError(
                f"the loss became {float(loss)} at epoch {self.epoch + 1}, step {batch + 1}"
            )


def training_checkpoint(model: keras.Model, epoch_variable: tf.Variable) -> tf.train.Checkpoint:
    """A checkpoint of everything a resumed `fit` needs to continue exactly where it stopped.

    The model's weights, the optimizer (slots and iteration count), the finished-epoch count,
    and the random state of the model's seeded layers: the states of their
    `keras.random.SeedGenerator`s are in `model.variables` but not in `model.weights`, and
    `tf.train.Checkpoint(model=model)` does not reach them. Without them a resumed run draws other
    random numbers than an uninterrupted one (the VQ quantizer's dead-code restarts did). They are
    saved by position, which is fixed by the architecture (their names are not: Keras numbers
    them per process).

    Args:
        model: a compiled, built Keras model (its optimizer built too, so restored slots land in
            existing variables).
        epoch_variable: int64 `tf.Variable` counting finished epochs.
    """
    weights = {id(variable) for variable in model.weights}
    random_state = [variable for variable in model.variables if id(variable) not in weights]
    return tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, epoch=epoch_variable, random_state=random_state
    )


def restore_latest(
    manager: tf.train.CheckpointManager,
    checkpoint: tf.train.Checkpoint,
    epoch_variable: tf.Variable,
    log: Callable[[str], None] = print,
) -> int:
    """Restore the newest checkpoint that reads back; the number of finished epochs (0: none).

    A checkpoint whose files were damaged or removed after it was written is reported and the
    next older one is tried (the manager keeps `max_to_keep`). When none reads back, nothing is
    restarted from scratch behind the user's back: `RunFolderError` says what to do.
    """
    for path in reversed(manager.checkpoints):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        # Damaged files raise tf.errors.OpError, IndexError ("Read less bytes than requested")
        # or ValueError/AssertionError (objects not matched): any failure means "try older".
        except Exception as error:  # noqa: BLE001
            log(
                f"warning: checkpoint {path} cannot be read ({_first_line(error)}); trying an older one"
            )
            continue
        return int(epoch_variable.numpy())
    if manager.checkpoints:
        raise RunFolderError(
            f"no checkpoint in {manager.directory} can be read; move the folder away to keep it, "
            "or pass --overwrite to train the run again from scratch"
        )
    return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


# -- One training stage (the VQ-VAE's or the prior's), resumable ---------------------------------
@dataclass
class StageProgress:
    """Where a stage resumes: its checkpoint manager, epoch count, history and best so far."""

    manager: tf.train.CheckpointManager
    epoch_variable: tf.Variable
    first_epoch: int
    history: list[dict[str, float]]
    best: dict[str, Any]


def resume_stage(
    model: keras.Model,
    name: str,
    checkpoint_dir: Path,
    history_path: Path,
    meta_path: Path,
    epochs: int,
    cluster,
    log: Callable[[str], None] = print,
) -> StageProgress:
    """Restore a stage's newest checkpoint into `model` (built, compiled) and its history.

    `name` ("VQ-VAE", "prior") names the stage in messages; `meta_path` is its best model's
    metadata. Every worker of `cluster` must restore the same epoch and weights. History rows
    beyond the restored epoch (written before a kill) are dropped.
    """
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = training_checkpoint(model, epoch_variable)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
    first_epoch = restore_latest(manager, checkpoint, epoch_variable, log=log)
    cluster.check_same(
        f"the {name}'s restored epoch and weights",
        [first_epoch, fingerprint_number(weights_fingerprint(model))],
    )
    history = [row for row in read_history(history_path) if row["epoch"] <= first_epoch]
    best = read_json(meta_path) if first_epoch and meta_path.is_file() else {}
    if first_epoch:
        todo = f"epochs {first_epoch + 1}-{epochs} to go" if first_epoch < epochs else "all done"
        log(
            f"{name[:1].upper()}{name[1:]}: resuming from epoch {first_epoch} "
            f"(checkpoint {manager.latest_checkpoint}); {todo}"
        )
        write_history(history_path, history)
    return StageProgress(manager, epoch_variable, first_epoch, history, best)


def fit_stage(
    model: keras.Model,
    progress: StageProgress,
    history_path: Path,
    *,
    epochs: int,
    steps: int,
    monitor: str,
    on_best: Callable[[int, dict], None],
    mode: str,
    make_data: Callable[[], tuple[tf.data.Dataset, tf.data.Dataset]],
    logs_dir: Path,
    verbose: int | str = "auto",
) -> None:
    """Train `model` from `progress.first_epoch` to `epochs` (`fit`), checkpointing every epoch.

    `on_best(epoch, logs)` saves the best model by `monitor` (`mode` "max" or "min", as
    `EpochCheckpoint`); a best model missing after a kill is saved first. `make_data()` gives
    the (train, validation) datasets, built only when there is an epoch left to train.
    """
    epoch_checkpoint = EpochCheckpoint(
        history_path,
        progress.manager,
        progress.epoch_variable,
        monitor,
        on_best,
        best=progress.best.get(monitor),
        history=progress.history,
        mode=mode,
    )
    epoch_checkpoint.save_missing_best()
    if progress.first_epoch >= epochs:
        return
    train_data, validation_data = make_data()
    callbacks = [
        StopOnNonFiniteLoss(),
        epoch_checkpoint,
        keras.callbacks.TensorBoard(str(logs_dir), write_graph=False, profile_batch=0),
    ]
    model.fit(
        train_data,
        steps_per_epoch=steps,
        epochs=epochs,
        initial_epoch=progress.first_epoch,
        validation_data=validation_data,
        callbacks=callbacks,
        shuffle=False,  # the datasets shuffle themselves, reproducibly per epoch
        verbose=verbose,
    )


@dataclass(frozen=True)
class Stage:
    """One training stage's files and choice of best model (the VQ-VAE's or the prior's).

    Attributes:
        name: "VQ-VAE" or "prior", in messages.
        checkpoints, history, logs: its checkpoint folder, history CSV and TensorBoard folder.
        model_path, meta_path: where its best model and that model's metadata go.
        monitor, mode: the validation metric deciding the best model, "max" or "min".
        epochs: epochs to train in all (a resumed run trains the rest).
    """

    name: str
    checkpoints: Path
    history: Path
    logs: Path
    model_path: Path
    meta_path: Path
    monitor: str
    mode: str
    epochs: int


def train_stage(
    model: keras.Model,
    stage: Stage,
    *,
    steps: int,
    make_data: Callable[[int], tuple[tf.data.Dataset, tf.data.Dataset]],
    saved_model: Callable[[], keras.Model],
    best_fields: Callable[[dict], dict[str, Any]],
    cluster,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> tuple[StageProgress, dict[str, Any]]:
    """Train (or resume) one stage: restore, `fit` to `stage.epochs`, save the best model.

    Both stages run this. After each epoch that improves `stage.monitor`, `saved_model()` (the
    model to keep: `model` or its float32 twin) is saved to `stage.model_path` and its metadata
    to `stage.meta_path`: `epoch`, the `best_fields(logs)`, the weights' `fingerprint`,
    `trained_with` (the cluster) and every metric of the epoch under `metrics`.

    Args:
        model: built and compiled, under `cluster`'s strategy.
        steps: steps per epoch.
        make_data: `first_epoch -> (train, validation)` datasets, built only when there is an
            epoch left to train.
        cluster: the `keras_vqpix.training.distribute.Cluster` it trains on.

    Returns:
        `(progress, last)`: where the stage resumed, and `last_epoch` / `last_fingerprint` of
        the weights after training (the same on every worker).
    """
    progress = resume_stage(
        model,
        stage.name,
        stage.checkpoints,
        stage.history,
        stage.meta_path,
        stage.epochs,
        cluster,
        log,
    )

    def save_best(epoch: int, logs: dict) -> None:
        save_model(saved_model(), stage.model_path)
        meta = {
            "epoch": epoch,
            **best_fields(logs),
            "fingerprint": weights_fingerprint(model),
            "trained_with": cluster.record(),
        }
        write_json(stage.meta_path, {**meta, "metrics": logs})

    fit_stage(
        model,
        progress,
        stage.history,
        epochs=stage.epochs,
        steps=steps,
        monitor=stage.monitor,
        on_best=save_best,
        mode=stage.mode,
        make_data=lambda: make_data(progress.first_epoch),
        logs_dir=stage.logs,
        verbose=verbose,
    )
    return progress, last_weights(model, progress.epoch_variable, cluster, stage.name)
