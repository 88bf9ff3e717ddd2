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

from keras_vqpix.codes import cached_codes, with_mirror_images, with_pose_copies
from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits
from keras_vqpix.data.pipeline import batch_by_plan, shard_by_batch, steps_per_epoch
from keras_vqpix.data.stacks import stack_context
from keras_vqpix.io import atomic_write_text
from keras_vqpix.models.pixelcnn import (
    PixelCNN,
    bits_per_code,
    max_bits_per_code,
    split_bits_per_code,
)
from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae, read_json, write_json
from keras_vqpix.training.callbacks import Stage, read_history, seeded_construction, train_stage
from keras_vqpix.training.distribute import (
    Cluster,
    dtype_policy,
    float32_twin,
    single_process,
    training_optimizer,
)
from keras_vqpix.training.schedule import learning_rate_schedule

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
    context: tuple[np.ndarray, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """Batches of `(codes [B, h, w] int32, labels [B] int32)`, with a `context` also
    `previous [B, h, w]` and `positions [B]` (a slice-context prior's inputs).

    `context`: `(previous, positions)` of `keras_vqpix.data.stacks.stack_context`, the index of
    each map's previous slice (-1: none) and its position bin; the batches then carry the
    previous slice's code map itself (-1 everywhere for none).

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
    if context is None:

        def gather(index):
            return tf.gather(codes, index), tf.gather(labels, index)

    else:
        previous_index = tf.constant(np.asarray(context[0], np.int32))
        positions = tf.constant(np.asarray(context[1], np.int32))

        def gather(index):
            before = tf.gather(previous_index, index)
            previous = tf.where(
                (before >= 0)[:, None, None], tf.gather(codes, tf.maximum(before, 0)), -1
            )
            return (
                tf.gather(codes, index),
                tf.gather(labels, index),
                previous,
                tf.gather(positions, index),
            )

    if not shuffle:
        indices = tf.data.Dataset.range(count).map(lambda i: tf.cast(i, tf.int32))
        maps = batch_by_plan(indices, count, batch_size, min_batch).map(gather)
        return shard_by_batch(maps.prefetch(2))

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        indices = batch_by_plan(
            tf.data.Dataset.from_tensor_slices(order), count, batch_size, min_batch
        )
        return indices.map(gather)

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max)
    return shard_by_batch(epochs.flat_map(one_epoch).prefetch(2))


def build_prior(config: RunConfig, steps_per_epoch: int = 1) -> PixelCNN:
    """A compiled, built prior for `config` (weights initialised from `config.seed`).

    `steps_per_epoch` sets the length of the learning-rate schedule. It computes in
    `config.precision`; build it under the strategy scope it trains with.
    """
    with seeded_construction(config.seed):
        with dtype_policy(config.precision):
            prior = _new_prior(config)
        schedule = learning_rate_schedule(
            config.prior.learning_rate,
            config.prior.final_learning_rate_ratio,
            config.prior.epochs * steps_per_epoch,
        )
        prior.compile(
            optimizer=training_optimizer(keras.optimizers.Adam(schedule), config.precision)
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
    # A slice-context prior learns each map with its patient's previous slice and position.
    contexts = {
        name: stack_context(getattr(splits, name), config.prior.slice_positions)
        if config.prior.slice_context
        else None
        for name in ("train", "validation")
    }
    _discard_stale_prior(paths, vqvae_fingerprint, log)

    batch_size = config.prior.batch_size
    train_codes, train_labels = codes["train"]
    if config.prior.mirror:  # the training maps and their mirror images (deterministic)
        train_codes, train_labels, contexts["train"] = with_mirror_images(
            vqvae, train_codes, train_labels, contexts["train"], config.data.batch_size
        )
    if config.prior.pose_copies:  # and copies of all of them in new head poses (seeded)
        patients = np.array([record.patient for record in splits.train])
        train_codes, train_labels, contexts["train"] = with_pose_copies(
            vqvae,
            train_codes,
            train_labels,
            np.tile(patients, 2) if config.prior.mirror else patients,
            contexts["train"],
            config.prior,
            config.seed,
            mirrored=config.prior.mirror,
            batch_size=config.data.batch_size,
        )
    # No replica may get an empty slice of a batch (`keras_vqpix.data.pipeline.batch_sizes`).
    replicas = cluster.replicas
    steps = steps_per_epoch(len(train_codes), batch_size, min_batch=replicas)
    with cluster.strategy.scope():
        prior = build_prior(config, steps)
    stage = Stage(
        "prior",
        paths.prior_checkpoints,
        paths.prior_history,
        paths.prior_logs,
        paths.prior_model,
        paths.prior_meta,
        "val_bits_per_code",
        "min",
        config.prior.epochs,
    )

    def make_data(first_epoch: int):
        train_data = code_dataset(
            train_codes,
            train_labels,
            batch_size,
            shuffle=True,
            seed=config.seed,
            first_epoch=first_epoch,
            min_batch=replicas,
            context=contexts["train"],
        )
        validation_data = code_dataset(
            *codes["validation"], batch_size, min_batch=replicas, context=contexts["validation"]
        )
        return train_data, validation_data

    # The label-dropout random state is in the checkpoint, so a resumed run draws what an
    # uninterrupted one would. Under mixed precision the saved prior is a float32 twin.
    progress, last = train_stage(
        prior,
        stage,
        steps=steps,
        make_data=make_data,
        saved_model=lambda: float32_twin(prior, lambda: _new_prior(config), config.precision),
        best_fields=lambda logs: {
            "val_bits_per_code": logs.get("val_bits_per_code"),
            "max_bits_per_code": max_bits_per_code(config.vqvae.num_embeddings),
            "vqvae_fingerprint": vqvae_fingerprint,
        },
        cluster=cluster,
        verbose=verbose,
        log=log,
    )
    if not cluster.is_chief:  # the other workers' files are temporary
        return {**read_json(paths.prior_meta), **last}
    best_prior, meta = load_prior(paths.root, vqvae_meta)
    test_codes, test_labels = codes["test"]
    figures = split_bits_per_code(best_prior, test_codes, test_labels, splits.test, batch_size)
    meta.update({f"test_{name}": value for name, value in figures.items()})
    if best_prior.conditional:
        meta["test_bits_per_code_unconditional"] = bits_per_code(
            best_prior, test_codes, None, batch_size
        )
    write_json(paths.prior_meta, meta)
    # Redraw the samples only when the prior changed (a finished run, resumed, keeps its plot).
    samples = (
        progress.first_epoch < stage.epochs or not (paths.plots / "prior_samples.png").is_file()
    )
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
    from keras_vqpix.sample_quality import samples_beside_real

    plots.plot_curves(
        read_history(paths.prior_history),
        paths.plots / "prior_curves.png",
        CURVE_PANELS,
        f"Prior training (uniform prior: {meta['max_bits_per_code']:.2f} bits per code)",
    )
    if not samples:
        return
    drawn, real = samples_beside_real(
        prior,
        vqvae,
        splits.test,
        config.data.image_size,
        samples_per_class=PLOT_SAMPLES_PER_CLASS,
        seed=config.seed,
    )
    plots.plot_samples_vs_real(
        drawn,
        real,
        paths.plots / "prior_samples.png",
        f"Prior samples (epoch {meta['epoch']}) beside real test slices",
    )
