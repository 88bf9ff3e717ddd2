"""Train the prior stage of a run: a Gated PixelCNN on the code maps of the run's best VQ-VAE.

Mirrors the VQ-VAE stage: resumable checkpoints (model, optimizer, finished epochs), a history
CSV, the best model by a validation metric (here the lowest `val_bits_per_code`), TensorBoard
and plots. The prior belongs to one VQ-VAE: `prior.json` records that VQ-VAE's fingerprint,
`load_prior` refuses any other, and checkpoints of a prior trained on an earlier VQ-VAE (the
VQ-VAE was retrained since) are discarded rather than resumed.
"""

from __future__ import annotations

import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits
from keras_vqpix.data.pipeline import batch_by_plan, shard_by_batch, steps_per_epoch
from keras_vqpix.io import atomic_write_text
from keras_vqpix.models.pixelcnn import LN2, PixelCNN, max_bits_per_code
from keras_vqpix.training.artifacts import (
    RunPaths,
    load_prior,
    load_vqvae,
    read_json,
    save_model,
    weights_fingerprint,
    write_json,
)
from keras_vqpix.training.callbacks import fit_stage, read_history, resume_stage
from keras_vqpix.training.codes import cached_codes
from keras_vqpix.training.distribute import (
    Cluster,
    dtype_policy,
    float32_twin,
    last_weights,
    single_process,
    training_optimizer,
)

PLOT_SAMPLES_PER_CLASS = 4
CURVE_PANELS = (("bits per code", ("bits_per_code",)),)
VQVAE_MARKER = "vqvae_fingerprint.txt"


def code_dataset(
    codes: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    first_epoch: int = 0,
    min_batch: int = 1,
) -> tf.data.Dataset:
    """Batches of `(codes [B, h, w] int32, labels [B] int32)`.

    Without `shuffle`: one pass in order. With `shuffle`: endless epochs `first_epoch, ...`,
    each in the order of a stateless shuffle seeded by `(seed, epoch)`, batched on its own,
    so a resumed run sees the same batches as an uninterrupted one. Distributed by batch
    (`keras_vqpix.data.pipeline.shard_by_batch`), in the batches of
    `keras_vqpix.data.pipeline.batch_sizes`: none smaller than `min_batch`, the number of
    replicas.
    """
    codes = tf.constant(np.asarray(codes, np.int32))
    labels = tf.constant(np.asarray(labels, np.int32))
    count = int(codes.shape[0])
    if not shuffle:
        maps = tf.data.Dataset.from_tensor_slices((codes, labels))
        return shard_by_batch(batch_by_plan(maps, count, batch_size, min_batch).prefetch(2))

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        indices = batch_by_plan(
            tf.data.Dataset.from_tensor_slices(order), count, batch_size, min_batch
        )
        return indices.map(lambda index: (tf.gather(codes, index), tf.gather(labels, index)))

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max)
    return shard_by_batch(epochs.flat_map(one_epoch).prefetch(2))


def build_prior(config: RunConfig) -> PixelCNN:
    """A compiled, built prior for `config` (weights initialised from `config.seed`).

    It computes in `config.precision`; build it under the strategy scope it trains with.
    """
    keras.utils.set_random_seed(config.seed)
    with dtype_policy(config.precision):
        prior = _new_prior(config)
    prior.compile(
        optimizer=training_optimizer(
            keras.optimizers.Adam(config.prior.learning_rate), config.precision
        )
    )
    # Create the optimizer's slots now, so a checkpoint restores into existing variables.
    prior.optimizer.build(prior.trainable_variables)
    return prior


def _new_prior(config: RunConfig) -> PixelCNN:
    """A built, uncompiled prior for `config` under the current dtype policy."""
    size = config.code_size
    prior = PixelCNN.from_run_config(
        config.prior, config.vqvae.num_embeddings, code_shape=(size, size), seed=config.seed
    )
    prior(tf.zeros((1, size, size), tf.int32), tf.zeros((1,), tf.int32))
    return prior


def bits_per_code(
    prior, codes: np.ndarray, labels: np.ndarray | None, batch_size: int = 64
) -> float:
    """Mean cross-entropy of `codes` under `prior`, in bits per code (labels -1: unconditional)."""
    if labels is None:
        labels = np.full(len(codes), -1, np.int32)

    # One trace for every batch (the last one is smaller), the shape fixed by the signature.
    @tf.function(
        input_signature=[
            tf.TensorSpec((None, *np.shape(codes)[1:]), tf.int32),
            tf.TensorSpec((None,), tf.int32),
        ]
    )
    def batch_nats(batch_codes, batch_labels):
        logits = prior(batch_codes, batch_labels, training=False)
        return tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(batch_codes, logits, from_logits=True)
        )

    total = 0.0
    for batch_codes, batch_labels in code_dataset(codes, labels, batch_size):
        total += float(batch_nats(batch_codes, batch_labels))
    return total / (np.asarray(codes).size * LN2)


def _discard_stale_prior(paths: RunPaths, vqvae_fingerprint: str, log) -> None:
    """Remove the prior's checkpoints and files when they belong to another VQ-VAE."""
    marker = paths.prior_checkpoints / VQVAE_MARKER
    stale_checkpoints = paths.prior_checkpoints.exists() and (
        not marker.is_file() or marker.read_text().strip() != vqvae_fingerprint
    )
    stale_meta = (
        paths.prior_meta.is_file()
        and read_json(paths.prior_meta).get("vqvae_fingerprint") != vqvae_fingerprint
    )
    if stale_checkpoints or stale_meta:
        log("Prior: the VQ-VAE changed since the prior was trained; training the prior afresh")
        shutil.rmtree(paths.prior_checkpoints, ignore_errors=True)
        for path in (paths.prior_meta, paths.prior_model, paths.prior_history):
            path.unlink(missing_ok=True)
    atomic_write_text(marker, vqvae_fingerprint + "\n")


def train_prior(
    paths: RunPaths,
    splits: DataSplits,
    config: RunConfig,
    *,
    verbose: int | str = "auto",
    log=print,
    cluster: Cluster | None = None,
) -> dict:
    """Train (or resume) the prior of a run on its VQ-VAE's codes; return the best epoch's metadata.

    The metadata (`prior.json`) holds `epoch`, `val_bits_per_code`, `test_bits_per_code`
    (and `test_bits_per_code_unconditional` for a conditional prior), `max_bits_per_code`,
    the prior's own `fingerprint` and the `vqvae_fingerprint` it was trained on; the returned
    copy also `last_epoch` and `last_fingerprint` (as `train_vqvae`'s). Under
    `cluster` (default: one device) as `train_vqvae`; the test figures and plots are the
    chief's alone.
    """
    cluster = cluster or single_process()
    vqvae, _, vqvae_meta = load_vqvae(paths.root)
    vqvae_fingerprint = vqvae_meta["fingerprint"]
    codes = {
        name: cached_codes(paths, name, vqvae, vqvae_fingerprint, getattr(splits, name), config)
        for name in ("train", "validation", "test")
    }
    _discard_stale_prior(paths, vqvae_fingerprint, log)

    with cluster.strategy.scope():
        prior = build_prior(config)
    epochs, batch_size = config.prior.epochs, config.prior.batch_size
    # The label-dropout random state is in the checkpoint, so a resumed run draws what an
    # uninterrupted one would.
    progress = resume_stage(
        prior,
        "prior",
        paths.prior_checkpoints,
        paths.prior_history,
        paths.prior_meta,
        epochs,
        cluster,
        log,
    )
    best = progress.best

    def save_best(epoch: int, logs: dict) -> None:
        # Under mixed precision the saved prior is a float32 twin (see `float32_twin`).
        saved = float32_twin(prior, lambda: _new_prior(config), config.precision)
        save_model(saved, paths.prior_model)
        meta = {
            "epoch": epoch,
            "val_bits_per_code": logs.get("val_bits_per_code"),
            "max_bits_per_code": max_bits_per_code(config.vqvae.num_embeddings),
            "fingerprint": weights_fingerprint(prior),
            "vqvae_fingerprint": vqvae_fingerprint,
            "trained_with": cluster.record(),
        }
        write_json(paths.prior_meta, {**meta, "metrics": logs})
        best.clear()
        best.update(meta)

    train_codes, train_labels = codes["train"]
    # No replica may get an empty slice of a batch (`keras_vqpix.data.pipeline.batch_sizes`).
    replicas = cluster.replicas

    def make_data():
        train_data = code_dataset(
            train_codes,
            train_labels,
            batch_size,
            shuffle=True,
            seed=config.seed,
            first_epoch=progress.first_epoch,
            min_batch=replicas,
        )
        return train_data, code_dataset(*codes["validation"], batch_size, min_batch=replicas)

    fit_stage(
        prior,
        progress,
        paths.prior_history,
        epochs=epochs,
        steps=steps_per_epoch(len(train_codes), batch_size, min_batch=replicas),
        monitor="val_bits_per_code",
        on_best=save_best,
        mode="min",
        make_data=make_data,
        logs_dir=paths.prior_logs,
        verbose=verbose,
    )
    last = last_weights(prior, progress.epoch_variable, cluster, "prior")
    if not cluster.is_chief:  # the other workers' files are temporary
        return {**read_json(paths.prior_meta), **last}
    best_prior, meta = load_prior(paths.root, vqvae_meta)
    test_codes, test_labels = codes["test"]
    meta["test_bits_per_code"] = bits_per_code(best_prior, test_codes, test_labels, batch_size)
    if best_prior.conditional:
        meta["test_bits_per_code_unconditional"] = bits_per_code(
            best_prior, test_codes, None, batch_size
        )
    write_json(paths.prior_meta, meta)
    # Redraw the samples only when the prior changed (a finished run, resumed, keeps its plot).
    samples = progress.first_epoch < epochs or not (paths.plots / "prior_samples.png").is_file()
    plot_prior(paths, splits, config, vqvae, best_prior, meta, samples=samples)
    return {**meta, **last}


def plot_prior(
    paths: RunPaths,
    splits: DataSplits,
    config: RunConfig,
    vqvae,
    prior,
    meta: dict,
    *,
    samples: bool = True,
) -> None:
    """Bits-per-code curves, and (`samples`) samples of each class beside real test slices."""
    from keras_vqpix import plots
    from keras_vqpix.sample_quality import plot_samples_vs_real

    plots.plot_curves(
        read_history(paths.prior_history),
        paths.plots / "prior_curves.png",
        CURVE_PANELS,
        f"Prior training (uniform prior: {meta['max_bits_per_code']:.2f} bits per code)",
    )
    if not samples:
        return
    plot_samples_vs_real(
        paths.plots / "prior_samples.png",
        prior,
        vqvae,
        splits.test,
        config,
        samples_per_class=PLOT_SAMPLES_PER_CLASS,
        seed=config.seed,
        title=f"Prior samples (epoch {meta['epoch']}) beside real test slices",
    )
