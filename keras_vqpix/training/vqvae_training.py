"""Train the VQ-VAE stage of a run: fit, checkpoints, best model, history, TensorBoard, plots."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits
from keras_vqpix.data.pipeline import make_dataset, steps_per_epoch
from keras_vqpix.models.vqvae import VQVAE
from keras_vqpix.training.artifacts import (
    RunPaths,
    read_json,
    save_model,
    weights_fingerprint,
    write_json,
)
from keras_vqpix.training.callbacks import (
    EpochCheckpoint,
    StopOnNonFiniteLoss,
    read_history,
    restore_latest,
    training_checkpoint,
    write_history,
)
from keras_vqpix.training.codes import cached_codes

PLOT_IMAGES = 8
CURVE_PANELS = (
    ("loss", ("loss", "reconstruction_loss")),
    ("SSIM", ("ssim",)),
    ("codebook", ("perplexity", "codes_used")),
)


def build_vqvae(config: RunConfig) -> VQVAE:
    """A compiled, built VQ-VAE for `config` (weights initialised from `config.seed`)."""
    keras.utils.set_random_seed(config.seed)
    model = VQVAE.from_run_config(config.vqvae, seed=config.seed)
    model.compile(optimizer=keras.optimizers.Adam(config.vqvae.learning_rate))
    size = config.data.image_size
    model(tf.zeros((1, size, size, 1)))
    # Create the optimizer's slots now, so a checkpoint restores into existing variables.
    model.optimizer.build(model.trainable_variables)
    return model


def train_vqvae(paths: RunPaths, splits: DataSplits, config: RunConfig, *, verbose: int | str = "auto",
                log=print) -> dict:  # fmt: skip
    """Train (or resume) the VQ-VAE of a run; return the best epoch's metadata."""
    model = build_vqvae(config)
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = training_checkpoint(model, epoch_variable)
    manager = tf.train.CheckpointManager(checkpoint, str(paths.vqvae_checkpoints), max_to_keep=2)
    first_epoch = restore_latest(manager, checkpoint, epoch_variable, log=log)
    history = [row for row in read_history(paths.history) if row["epoch"] <= first_epoch]
    best = read_json(paths.vqvae_meta) if first_epoch and paths.vqvae_meta.is_file() else {}
    epochs = config.vqvae.epochs
    if first_epoch:
        todo = f"epochs {first_epoch + 1}-{epochs} to go" if first_epoch < epochs else "all done"
        log(f"VQ-VAE: resuming from epoch {first_epoch} (checkpoint {manager.latest_checkpoint}); {todo}")  # fmt: skip
        write_history(paths.history, history)

    def save_best(epoch: int, logs: dict) -> None:
        save_model(model, paths.vqvae_model)
        meta = {
            "epoch": epoch,
            "val_ssim": logs.get("val_ssim"),
            "fingerprint": weights_fingerprint(model),
        }
        write_json(paths.vqvae_meta, {**meta, "metrics": logs})
        best.update(meta)

    saved_best = best.get("val_ssim")
    epoch_checkpoint = EpochCheckpoint(paths.history, manager, epoch_variable, "val_ssim", save_best,
                                       best=-math.inf if saved_best is None else saved_best,
                                       history=history)  # fmt: skip
    epoch_checkpoint.save_missing_best()
    if first_epoch < epochs:
        data = config.data
        train_data = make_dataset(splits.train, data.image_size, data.batch_size, shuffle=True, seed=config.seed,
                                  first_epoch=first_epoch, shuffle_buffer=data.shuffle_buffer, cache=data.cache)  # fmt: skip
        validation_data = make_dataset(
            splits.validation, data.image_size, data.batch_size, cache=data.cache
        )
        callbacks = [
            StopOnNonFiniteLoss(),
            epoch_checkpoint,
            keras.callbacks.TensorBoard(str(paths.vqvae_logs), write_graph=False, profile_batch=0),
        ]
        model.fit(
            train_data,
            steps_per_epoch=steps_per_epoch(len(splits.train), data.batch_size),
            epochs=epochs,
            initial_epoch=first_epoch,
            validation_data=validation_data,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself, reproducibly per epoch
            verbose=verbose,
        )
    plot_vqvae(paths, splits, config)
    return read_json(paths.vqvae_meta)


def plot_vqvae(paths: RunPaths, splits: DataSplits, config: RunConfig) -> None:
    """Curves, reconstructions of train and test slices, and codebook usage of the best model."""
    from keras_vqpix import plots
    from keras_vqpix.metrics import ssim_foreground_per_image
    from keras_vqpix.training.artifacts import load_vqvae

    plots.plot_curves(
        read_history(paths.history),
        paths.plots / "vqvae_curves.png",
        CURVE_PANELS,
        "VQ-VAE training",
    )
    model, _, meta = load_vqvae(paths.root)
    for name, records in (("train", splits.train), ("test", splits.test)):
        # Slices spread over the split (several patients), not the first patient's neighbours.
        chosen = [
            records[i]
            for i in np.linspace(0, len(records) - 1, min(PLOT_IMAGES, len(records))).astype(int)
        ]
        images = next(iter(make_dataset(chosen, config.data.image_size, len(chosen), cache="")))[0]
        reconstructions = model(images)["reconstruction"]
        scores = ssim_foreground_per_image(images, reconstructions).numpy()
        plots.plot_reconstructions(images.numpy(), reconstructions.numpy(), paths.plots / f"reconstructions_{name}.png",
                                   f"VQ-VAE reconstructions, {name} split (epoch {meta['epoch']})", scores)  # fmt: skip
    codes, _ = cached_codes(paths, "train", model, meta["fingerprint"], splits.train, config)
    counts = np.bincount(codes.ravel(), minlength=config.vqvae.num_embeddings)
    plots.plot_codebook_usage(
        counts, paths.plots / "codebook_usage.png", "Codebook usage on the train split"
    )
