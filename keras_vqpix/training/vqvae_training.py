"""Train the VQ-VAE stage of a run: fit, checkpoints, best model, history, TensorBoard, plots."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_vqpix.codes import cached_codes
from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits
from keras_vqpix.data.pipeline import make_dataset, steps_per_epoch
from keras_vqpix.models.vqvae import VQVAE
from keras_vqpix.run_folder import RunPaths, read_json
from keras_vqpix.training.callbacks import Stage, read_history, seeded_construction, train_stage
from keras_vqpix.training.distribute import (
    Cluster,
    dtype_policy,
    float32_twin,
    single_process,
    training_optimizer,
)
from keras_vqpix.training.schedule import learning_rate_schedule

PLOT_IMAGES = 8
# The best model is the one with the best brain (foreground) SSIM on the validation patients.
MONITOR = "val_ssim_foreground"
CURVE_PANELS = (
    ("loss", ("loss", "reconstruction_loss")),
    ("SSIM", ("ssim", "ssim_foreground")),
    ("codebook", ("perplexity", "codes_used")),
)


def training_dataset(
    records, config: RunConfig, first_epoch: int = 0, min_batch: int = 1
) -> tf.data.Dataset:
    """The VQ-VAE's training pipeline for `config`: shuffled per epoch from `first_epoch` on, endless.

    `min_batch`: the number of replicas (no batch smaller, `keras_vqpix.data.pipeline.batch_sizes`).
    """
    data = config.data
    return make_dataset(
        records,
        data.image_size,
        data.batch_size,
        shuffle=True,
        seed=config.seed,
        first_epoch=first_epoch,
        shuffle_buffer=data.shuffle_buffer,
        cache=data.cache,
        min_batch=min_batch,
    )


def build_vqvae(config: RunConfig, steps_per_epoch: int = 1) -> VQVAE:
    """A compiled, built VQ-VAE for `config` (weights initialised from `config.seed`).

    It computes in `config.precision`; build it under the strategy scope it trains with.
    """
    with seeded_construction(config.seed):
        with dtype_policy(config.precision):
            model = VQVAE.from_run_config(config.vqvae, seed=config.seed)
        schedule = learning_rate_schedule(
            config.vqvae.learning_rate,
            config.vqvae.final_learning_rate_ratio,
            config.vqvae.epochs * steps_per_epoch,
        )
        optimizer = training_optimizer(keras.optimizers.Adam(schedule), config.precision)
        model.compile(optimizer=optimizer)
        _build(model, config)
        # Create the optimizer's slots now, so a checkpoint restores into existing variables.
        model.optimizer.build(model.trainable_variables)
    return model


def _build(model: VQVAE, config: RunConfig) -> VQVAE:
    size = config.data.image_size
    model(tf.zeros((1, size, size, 1)))
    return model


def float32_vqvae(model: VQVAE, config: RunConfig) -> VQVAE:
    """What `vqvae.keras` holds: `model`, or its float32 twin when it trained in mixed precision."""
    return float32_twin(
        model,
        lambda: _build(VQVAE.from_run_config(config.vqvae, seed=config.seed), config),
        config.precision,
    )


def train_vqvae(
    paths: RunPaths,
    splits: DataSplits,
    config: RunConfig,
    *,
    verbose: int | str = "auto",
    log=print,
    cluster: Cluster | None = None,
) -> dict:
    """Train (or resume) the VQ-VAE of a run; return the best epoch's metadata.

    The metadata (`vqvae.json`) gains `last_epoch` and `last_fingerprint`: the epoch trained
    last and the fingerprint of its weights (those of the newest checkpoint).

    Under `cluster` (default: one device) the model trains on all its replicas; every worker
    must call this with the same arguments but its own `paths` (see `train_run`).
    """
    cluster = cluster or single_process()
    # No replica may get an empty slice of a batch (`keras_vqpix.data.pipeline.batch_sizes`).
    replicas = cluster.replicas
    steps = steps_per_epoch(len(splits.train), config.data.batch_size, min_batch=replicas)
    with cluster.strategy.scope():
        model = build_vqvae(config, steps)
    stage = Stage(
        "VQ-VAE",
        paths.vqvae_checkpoints,
        paths.history,
        paths.vqvae_logs,
        paths.vqvae_model,
        paths.vqvae_meta,
        MONITOR,
        "max",
        config.vqvae.epochs,
    )

    def make_data(first_epoch: int):
        data = config.data
        validation_data = make_dataset(
            splits.validation,
            data.image_size,
            data.batch_size,
            cache=data.cache,
            min_batch=replicas,
        )
        train_data = training_dataset(splits.train, config, first_epoch, replicas)
        return train_data, validation_data

    _, last = train_stage(
        model,
        stage,
        steps=steps,
        make_data=make_data,
        saved_model=lambda: float32_vqvae(model, config),
        best_fields=lambda logs: {MONITOR: logs.get(MONITOR), "val_ssim": logs.get("val_ssim")},
        cluster=cluster,
        verbose=verbose,
        log=log,
    )
    if cluster.is_chief:  # the other workers' files are temporary
        plot_vqvae(paths, splits, config)
    return {**read_json(paths.vqvae_meta), **last}


def plot_vqvae(paths: RunPaths, splits: DataSplits, config: RunConfig) -> None:
    """Curves, reconstructions of train and test slices, and codebook usage of the best model."""
    from keras_vqpix import plots
    from keras_vqpix.metrics import ssim_foreground_per_image
    from keras_vqpix.run_folder import load_vqvae

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
        plots.plot_reconstructions(
            images.numpy(),
            reconstructions.numpy(),
            paths.plots / f"reconstructions_{name}.png",
            f"VQ-VAE reconstructions, {name} split (epoch {meta['epoch']})",
            scores,
        )
    codes, _ = cached_codes(paths, "train", model, meta["fingerprint"], splits.train, config)
    counts = np.bincount(codes.ravel(), minlength=config.vqvae.num_embeddings)
    plots.plot_codebook_usage(
        counts, paths.plots / "codebook_usage.png", "Codebook usage on the train split"
    )
