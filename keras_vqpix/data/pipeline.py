"""`tf.data` pipelines that turn slice records into batches of `[B, S, S, 1]` float32 in [0, 1].

Decode and resize run in parallel (`num_parallel_calls=AUTOTUNE`), decoded images are cached
(in memory by default, so every epoch after the first reads no file), then shuffled, batched
and prefetched so the accelerator never waits on the host. Shuffling takes an explicit seed, so
the order of examples is the same in every run with the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_vqpix.data.decode import decode_and_resize, decode_grayscale, resize_with_pad
from keras_vqpix.data.discover import SliceRecord

AUTOTUNE = tf.data.AUTOTUNE
_GRAPH_SEED = 20171102

__all__ = [  # decode_* and resize_with_pad live in `keras_vqpix.data.decode`; imported here too
    "AUTOTUNE",
    "batch_by_plan",
    "batch_sizes",
    "decode_and_resize",
    "decode_grayscale",
    "load_image",
    "make_dataset",
    "resize_with_pad",
    "shard_by_batch",
    "steps_per_epoch",
]


def shard_by_batch(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with the `DATA` auto-shard policy, for `Strategy.experimental_distribute_dataset`.

    Under `MultiWorkerMirroredStrategy`, Keras' `fit` splits each global batch into one slice
    per replica, in order, and (`DATA`) each worker keeps its replicas' slices of that batch:
    every step trains on exactly the batch a single device would see, in the order of the
    per-epoch seeded shuffle, and every worker runs the same number of steps, whatever the
    number of files. The price: each worker reads and decodes every file once (then the cache
    serves it). `FILE` sharding would give each worker its own files, so its own shuffle, its
    own batches and, with unequal file counts, its own number of steps per epoch, which stalls
    the workers' collective all-reduces; the records here come from a list of paths, not from
    a reader dataset that `FILE` (and `AUTO`) could shard anyway. Without a strategy, or on one
    machine, the option does nothing.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def load_image(path: str, image_size: int) -> tf.Tensor:
    """Read one file with `decode_and_resize` (eagerly); handy for tools and tests."""
    return decode_and_resize(tf.io.read_file(path), image_size)


def batch_sizes(num_records: int, batch_size: int, min_batch: int = 1) -> list[int]:
    """The sizes of the batches of one pass over `num_records` examples: none below `min_batch`.

    Full batches of `batch_size`, then the rest. Under `tf.distribute` each global batch is split
    into one slice per replica, so a last batch with fewer examples than replicas (`min_batch`)
    would leave a replica an empty slice. An empty batch is what TensorFlow's oneDNN `Conv2D`
    gets wrong (TensorFlow 2.21 on CPUs with AVX-512, where oneDNN is on by default):

        x = tf.zeros([0, 16, 16, 4]); k = tf.random.normal([4, 4, 4, 8])
        tf.nn.conv2d(x, k, 2, "SAME").shape   # oneDNN on: (0, 16, 16, 4), the input's shape
                                              # oneDNN off (TF_ENABLE_ONEDNN_OPTS=0): (0, 8, 8, 8)

    and the next layer then fails. So such a remainder `r` is not left alone: the last full
    batch and `r` are split anew into `batch_size + r - min_batch` and `min_batch` examples (or
    merged into one batch of `batch_size + r` when that is too small to split). No example is
    dropped (validation metrics cover every slice), and the number of batches is
    `ceil(num_records / batch_size)` except in that last case. With `min_batch=1` (one device)
    the plan is plain batching. Remove this once TensorFlow's empty-batch convolution is fixed.

    Raises:
        ValueError: `batch_size` or `num_records` smaller than `min_batch` (some replica would
            get nothing in every step), or no records.
    """
    if num_records < 1 or batch_size < 1:
        raise ValueError(
            f"batch_sizes needs records and a batch size >= 1. Received: num_records={num_records}, "
            f"batch_size={batch_size}"
        )
    if batch_size < min_batch:
        raise ValueError(
            f"the batch size {batch_size} is smaller than the {min_batch} replicas it is split "
            "over: give every replica at least one example per batch (a larger --batch-size)"
        )
    if num_records < min_batch:
        raise ValueError(
            f"{num_records} examples cannot give each of {min_batch} replicas one: train on "
            "fewer replicas or on more data"
        )
    full, rest = divmod(num_records, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if 0 < rest < min_batch:
        tail = sizes[-2] + rest
        sizes[-2:] = [tail - min_batch, min_batch] if tail >= 2 * min_batch else [tail]
    return sizes


def steps_per_epoch(
    num_records: int, batch_size: int, drop_remainder: bool = False, min_batch: int = 1
) -> int:
    """Batches in one pass over `num_records` examples (`batch_sizes` without `drop_remainder`)."""
    if drop_remainder:
        return num_records // batch_size
    return len(batch_sizes(num_records, batch_size, min_batch))


def batch_by_plan(
    dataset: tf.data.Dataset, num_records: int, batch_size: int, min_batch: int = 1
) -> tf.data.Dataset:
    """One pass of `num_records` unbatched examples in the batches of `batch_sizes`."""
    sizes = batch_sizes(num_records, batch_size, min_batch)
    batched = dataset.batch(batch_size, num_parallel_calls=AUTOTUNE, deterministic=True)
    if sizes == batch_sizes(num_records, batch_size):
        return batched
    return batched.rebatch(tf.constant(sizes, tf.int64))


def make_dataset(
    records: Sequence[SliceRecord],
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    first_epoch: int = 0,
    shuffle_buffer: int = 4096,
    cache: str = "memory",
    drop_remainder: bool = False,
    min_batch: int = 1,
) -> tf.data.Dataset:
    """A dataset of `(images [B, S, S, 1] float32 in [0, 1], labels [B] int32)`.

    Without `shuffle`: one pass in record order. With `shuffle`: an endless sequence of epochs
    `first_epoch, first_epoch + 1, ...`, each a fresh shuffle seeded by `(seed, epoch)` and
    batched on its own (no batch straddles two epochs), so epoch k has the same order whether a
    run started at epoch 0 or resumed at k. Pass `steps_per_epoch(...)` to `fit`.

    Args:
        records: the slices, e.g. `DataSplits.train`.
        image_size: side of the square images.
        batch_size: images per batch.
        shuffle: shuffle, and repeat epoch after epoch.
        seed: shuffle seed.
        first_epoch: the epoch the sequence starts at (for resuming).
        shuffle_buffer: shuffle buffer size (clipped to the number of records).
        cache: "memory", "" for no cache, or a file prefix for `Dataset.cache`.
        drop_remainder: drop a last, smaller batch of each epoch (static batch shapes).
        min_batch: no batch smaller than this (`batch_sizes`): the number of replicas the
            batches are split over, so that none gets an empty slice.
    """
    if not records:
        raise ValueError("make_dataset needs at least one record")
    # Bytes, not str: a file name that is not valid UTF-8 still reaches the file system.
    paths = [os.fsencode(r.path) for r in records]
    labels = [r.label for r in records]
    decoded = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
    decoded = decoded.map(
        lambda path, label: (decode_and_resize(tf.io.read_file(path), image_size), label),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    if cache == "memory":
        decoded = decoded.cache()
    elif cache:
        decoded = decoded.cache(cache)

    def batched(dataset):
        if drop_remainder:
            return dataset.batch(
                batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=True
            )
        return batch_by_plan(dataset, len(records), batch_size, min_batch)

    if not shuffle:
        return shard_by_batch(batched(decoded).prefetch(AUTOTUNE))
    buffer = min(shuffle_buffer, len(records))

    def one_epoch(epoch):
        # `shuffle` pairs its seed with the graph-level seed (set by `keras.utils.set_random_seed`,
        # and compared to 0 in Python, which a tensor seed cannot be). Pin the graph seed of this
        # traced function, so the order depends on (seed, epoch) alone.
        tf.compat.v1.get_default_graph().seed = _GRAPH_SEED
        epoch_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
        # The cache above is shared by every epoch: files are decoded once.
        return batched(decoded.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False))

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max)
    return shard_by_batch(epochs.flat_map(one_epoch).prefetch(AUTOTUNE))


def load_images(
    records: Sequence[SliceRecord], image_size: int, batch_size: int = 64
) -> np.ndarray:
    """Images `[N, S, S, 1]` float32 of `records`, in order."""
    if not records:
        return np.zeros((0, image_size, image_size, 1), np.float32)
    return np.concatenate(
        [images.numpy() for images, _ in make_dataset(records, image_size, batch_size, cache="")]
    )
