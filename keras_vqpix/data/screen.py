"""Find the image files the `tf.data` pipeline cannot read, before training starts.

ADNI exports hold odd files: empty or truncated downloads, and files under an image name that
are no image at all. Training must neither crash on them mid-epoch nor silently see fewer
images per epoch than it counts (that would shift the per-epoch shuffles a resumed run relies
on), so every file is decoded once up front and the unreadable ones are left out of the records.

Only decoding can fail: `decode_and_resize` turns any decoded image into a square of the
configured size, whatever its size, depth and channels, so the check runs the pipeline's own
`decode_grayscale` (no cheaper stand-in: TensorFlow decodes some files, e.g. WebP, to uint8
but not to float32). The files are decoded in parallel by `tf.data` with `ignore_errors`, so
the indices that come out are the readable files; only the few failures are decoded again, one
by one, for their error message. On two shared CPU cores, 2,480 256x240 JPEGs take 1.5-2.9 s
(about a millisecond each), so the check runs on every start and is not cached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import tensorflow as tf

from keras_vqpix.data.decode import decode_grayscale


def unreadable_files(paths: Sequence[str]) -> dict[int, str]:
    """`{index: reason}` of the files in `paths` that are no readable image.

    Args:
        paths: image files (JPEG, PNG, BMP and GIF decode; anything else is unreadable).

    Returns:
        The index into `paths` of each unreadable file and a short reason, such as
        "empty file" or "Invalid PNG data, size 268"; an empty dict when all are readable.
    """
    if not paths:
        return {}
    names = [os.fsencode(path) for path in paths]
    dataset = tf.data.Dataset.from_tensor_slices(names).enumerate()
    # The maximum depends on every pixel, so the decode cannot be optimised away.
    dataset = dataset.map(
        lambda index, path: (index, tf.reduce_max(decode_grayscale(tf.io.read_file(path)))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    readable = set()
    for indices, _ in dataset.ignore_errors().batch(4096):
        readable.update(indices.numpy().tolist())
    return {index: _reason(path) for index, path in enumerate(paths) if index not in readable}


def _reason(path: str) -> str:
    """Why `path` does not decode, in a few words."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        decode_grayscale(tf.io.read_file(os.fsencode(path)))
    except OSError as error:
        return error.strerror or type(error).__name__
    except tf.errors.OpError as error:
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", error.message)
        message = re.sub(r"\s*\[Op:[^\]]*\].*", "", message, flags=re.DOTALL)
        return message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return "cannot be decoded"
