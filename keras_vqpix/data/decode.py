"""Decoding one slice file: encoded bytes -> a grayscale square `[S, S, 1]` float32 in [0, 1].

Shared by the `tf.data` pipelines (`keras_vqpix.data.pipeline`) and the check for unreadable
files (`keras_vqpix.data.screen`), which must decode exactly as training does.
"""

from __future__ import annotations

import tensorflow as tf


def decode_grayscale(contents: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes (JPEG, PNG, BMP or GIF) -> `[H, W, 1]` float32 in [0, 1].

    8- and 16-bit images are scaled to [0, 1]; colour becomes luma; an alpha channel is
    composited onto black (the background of brain slices); a GIF gives its first frame. Only
    bytes that are no such image fail (`tf.errors.InvalidArgumentError`).
    """
    image = tf.io.decode_image(contents, dtype=tf.float32, expand_animations=False)
    channels = tf.shape(image)[-1]
    # 1: gray, 2: gray + alpha, 3: RGB, 4: RGBA.
    gray = tf.cond(
        channels >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1]
    )
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: image[..., -1:], lambda: tf.ones_like(gray))
    return gray * alpha


def resize_with_pad(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """`[H, W, 1]` -> `[image_size, image_size, 1]`: antialiased, aspect ratio kept, black padding.

    `tf.image.resize_with_pad` to the pixel, except that a side it would shrink to zero pixels
    (a strip more than `image_size` times longer than wide, where it fails) keeps one.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = tf.reduce_max(shape / image_size)
    resized = shape / ratio
    new_size = tf.maximum(tf.cast(tf.floor(resized), tf.int32), 1)
    offset = tf.maximum(tf.cast(tf.floor((image_size - resized) / 2), tf.int32), 0)
    image = tf.image.resize(image, new_size, antialias=True)
    return tf.image.pad_to_bounding_box(image, offset[0], offset[1], image_size, image_size)


# Plain TensorFlow ops without Python control flow: no need for autograph, which doubled the
# time `Dataset.map` spends tracing this function.
@tf.autograph.experimental.do_not_convert
def decode_and_resize(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG bytes -> `[image_size, image_size, 1]` float32 in [0, 1].

    Colour images are converted to grayscale, 8- and 16-bit images are scaled to [0, 1], and
    the slice is resized keeping its aspect ratio, padded with black (brain slices sit on a
    black background, so the padding is indistinguishable from it). Any size and any channel
    count works (`decode_grayscale`, `resize_with_pad`): only bytes that are no image fail.
    """
    image = resize_with_pad(decode_grayscale(contents), image_size)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size, image_size, 1])
    return image
