"""`tf.data` pipelines that turn slice records into batches of `[B, S, S, 1]` float32 in [0, 1].

Decode and resize run in parallel (`num_parallel_calls=AUTOTUNE`), decoded images are cached
(in memory by default, so every epoch after the first reads no file), then shuffled, batched
and prefetched so the accelerator never waits on the host. Shuffling takes an explicit seed, so
the order of examples is the same in every run with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from keras_vqpix.data.discover import SliceRecord

AUTOTUNE = tf.data.AUTOTUNE


def decode_and_resize(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG bytes -> `[image_size, image_size, 1]` float32 in [0, 1].

    Colour images are converted to grayscale, 8- and 16-bit images are scaled to [0, 1], and
    the slice is resized keeping its aspect ratio, padded with black (brain slices sit on a
    black background, so the padding is indistinguishable from it).
    """
    image = tf.io.decode_image(contents, channels=1, dtype=tf.float32, expand_animations=False)
    image = tf.image.resize_with_pad(image, image_size, image_size, antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size, image_size, 1])
    return image


def load_image(path: str, image_size: int) -> tf.Tensor:
    """Read one file with `decode_and_resize` (eagerly); handy for tools and tests."""
    return decode_and_resize(tf.io.read_file(path), image_size)


def make_dataset(
    records: Sequence[SliceRecord],
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    cache: str = "memory",
    drop_remainder: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """A dataset of `(images [B, S, S, 1] float32 in [0, 1], labels [B] int32)`.

    Args:
        records: the slices, e.g. `DataSplits.train`.
        image_size: side of the square images.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (with `seed`, so the order is reproducible).
        seed: shuffle seed.
        shuffle_buffer: shuffle buffer size (clipped to the number of records).
        cache: "memory", "" for no cache, or a file prefix for `Dataset.cache`.
        drop_remainder: drop a last, smaller batch (static batch shapes for distribution).
        repeat: repeat forever.
    """
    if not records:
        raise ValueError("make_dataset needs at least one record")
    paths = [r.path for r in records]
    labels = [r.label for r in records]
    dataset = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
    dataset = dataset.map(
        lambda path, label: (decode_and_resize(tf.io.read_file(path), image_size), label),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    if cache == "memory":
        dataset = dataset.cache()
    elif cache:
        dataset = dataset.cache(cache)
    if shuffle:
        dataset = dataset.shuffle(
            min(shuffle_buffer, len(records)), seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(
        batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(AUTOTUNE)
