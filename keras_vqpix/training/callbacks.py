"""Keras callbacks shared by both training stages: history, checkpoints, best model, divergence."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from keras_vqpix.io import atomic_write_text


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


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
    checkpoint (model, optimizer, finished-epoch count) via `tf.train.CheckpointManager`, whose
    index file is replaced atomically, so a resumed run starts after the last epoch whose
    checkpoint is complete and drops history rows beyond it.

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
        value = logs.get(self.monitor)
        improved = value is not None and (
            value > self.best if self.mode == "max" else value < self.best
        )
        if improved:
            self.best = value
            self.on_best(epoch + 1, logs)
        self.epoch_variable.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


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


def restore_latest(
    manager: tf.train.CheckpointManager,
    checkpoint: tf.train.Checkpoint,
    epoch_variable: tf.Variable,
) -> int:
    """Restore the newest complete checkpoint, if any; the number of finished epochs."""
    if manager.latest_checkpoint is None:
        return 0
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    return int(epoch_variable.numpy())
