"""Code maps of a data split under a trained VQ-VAE, computed once and cached in the run folder.

One helper feeds both the prior's training data and the pictures (codebook usage), as in the
keras-io VQ-VAE example's `get_code_indices`. The cache records the VQ-VAE's fingerprint and the
split's files, so a retrained VQ-VAE or a changed data folder never reuses stale codes.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Sequence

import numpy as np

from keras_vqpix.config import PriorConfig, RunConfig
from keras_vqpix.data.discover import SliceRecord
from keras_vqpix.io import atomic_path
from keras_vqpix.run_folder import RunPaths


def records_digest(records: Sequence[SliceRecord]) -> str:
    """Hash of the split's file paths and labels (which images the codes belong to)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(os.fsencode(record.path) + f"\t{record.label}\n".encode())
    return digest.hexdigest()[:16]


def encode_records(
    model, records: Sequence[SliceRecord], config: RunConfig
) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [N, h, w] int32, labels [N] int32)` of the records, in record order."""

    from keras_vqpix.data.pipeline import make_dataset

    dataset = make_dataset(records, config.data.image_size, config.data.batch_size, cache="")
    encode = encode_function(model, config.data.image_size)
    codes, labels = [], []
    for images, batch_labels in dataset:
        codes.append(encode(images).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(codes).astype(np.int32), np.concatenate(labels).astype(np.int32)


# One graph function per (model, image size): a new `tf.function` per call traced the encoder
# again for every split and every batch size (TensorFlow's "triggered tf.function retracing"
# warning). Weak keys: a model that is gone takes its function with it.
_ENCODE_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_function(model, image_size: int):
    """`model.encode` as a `tf.function` traced once for images `[n, image_size, image_size, 1]`, any n.

    The same function is returned on every call for the same model, so encoding several splits
    (whose last batches differ in size) traces the encoder once.
    """
    import tensorflow as tf

    functions = _ENCODE_FUNCTIONS.setdefault(model, {})
    if image_size not in functions:
        model_ref = weakref.ref(model)  # the function must not keep its model alive
        functions[image_size] = tf.function(
            lambda images: model_ref().encode(images),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.float32)],
        )
    return functions[image_size]


def cached_codes(
    paths: RunPaths,
    split: str,
    model,
    fingerprint: str,
    records: Sequence[SliceRecord],
    config: RunConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and labels of `split`, from `RUN/codes/<split>.npz` when it matches, else computed and saved."""
    path = paths.codes / f"{split}.npz"
    digest = records_digest(records)
    if path.is_file():
        with np.load(path) as cache:
            if str(cache["fingerprint"]) == fingerprint and str(cache["records"]) == digest:
                return cache["codes"].astype(np.int32), cache["labels"].astype(np.int32)
    codes, labels = encode_records(model, records, config)
    storage = np.uint8 if config.vqvae.num_embeddings <= 256 else np.uint16
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            codes=codes.astype(storage),
            labels=labels,
            fingerprint=fingerprint,
            records=digest,
        )
    return codes, labels


def _reencoded(model, codes: np.ndarray, move, batch_size: int) -> np.ndarray:
    """`codes`' reconstructions, each batch moved by `move(images, first)` (`first`: the batch's
    first map), encoded again by the same VQ-VAE: `[N, h, w]` int32."""
    import tensorflow as tf

    codes = np.asarray(codes, np.int32)
    encode = encode_function(model, codes.shape[1] * model.downsample_factor)
    decode = tf.function(
        model.decode, input_signature=[tf.TensorSpec([None, *codes.shape[1:]], tf.int32)]
    )
    out = [
        encode(move(decode(tf.constant(codes[first : first + batch_size])), first)).numpy()
        for first in range(0, len(codes), batch_size)
    ]
    return np.concatenate(out).astype(np.int32) if out else codes.copy()


def _moved_previous(previous: np.ndarray, offset: int) -> np.ndarray:
    """A copy's `previous` indices: each slice's previous slice `offset` maps later (-1 kept)."""
    return np.where(previous >= 0, previous + offset, -1).astype(np.int32)


def mirrored_codes(model, codes: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The code maps `[N, h, w]` int32 of the left-right mirror images of `codes`' reconstructions.

    Decoded, mirrored and encoded again by the same VQ-VAE: the codes of a brain as plausible as
    the original (left and right swapped), which a prior can learn from too. Not the mirrored
    code maps: a code describes a patch, and its mirror image is another code.
    """
    import tensorflow as tf

    return _reencoded(model, codes, lambda images, _: tf.reverse(images, axis=[2]), batch_size)


def with_mirror_images(
    model,
    codes: np.ndarray,
    labels: np.ndarray,
    context: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """`(codes, labels, context)` of a training set followed by its mirror images (`mirrored_codes`).

    `context`: `(previous, positions)` of `keras_vqpix.data.stacks.stack_context`; a mirrored
    map's previous slice is the mirrored previous slice (its index moved by N), so a mirrored
    patient is a whole stack mirrored, never a mirrored slice after an unmirrored one.
    """
    count = len(codes)
    codes = np.concatenate([np.asarray(codes, np.int32), mirrored_codes(model, codes, batch_size)])
    labels = np.concatenate([labels, labels])
    if context is not None:
        previous, positions = (np.asarray(array, np.int32) for array in context)
        moved = _moved_previous(previous, count)
        context = (np.concatenate([previous, moved]), np.concatenate([positions, positions]))
    return codes, labels, context


def pose_transforms(
    groups: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    rotation: float,
    shift: float,
    scale: float,
    mirrored: bool = False,
) -> np.ndarray:
    """One small random pose per group (patient), as `[N, 8]` projective transforms of its maps.

    A pose is an in-plane rotation (standard deviation `rotation` degrees), a shift (`shift`
    of the image side in x and y) and a scale (`1 + scale` standard deviation) about the image
    centre, drawn once per group so every slice of a patient moves as one head. Each row maps an
    output pixel `(x, y)` to the input point `(a0 x + a1 y + a2, b0 x + b1 y + b2)`, as
    `tf.raw_ops.ImageProjectiveTransformV3` reads it; `mirrored` also flips the input left-right
    (the pose of a mirror image, from the unmirrored image).
    """
    groups = np.asarray(groups)
    names, index = np.unique(groups, return_inverse=True)
    drawn = rng.normal(size=(len(names), 4)) * [rotation, shift, shift, scale]
    angle = np.deg2rad(drawn[index, 0])
    zoom = 1.0 + drawn[index, 3]
    centre = (image_size - 1) / 2
    shift_x, shift_y = (drawn[index, 1:3] * image_size).T
    # The inverse of "scale, rotate, shift about the centre", output to input.
    a0, a1 = np.cos(angle) / zoom, np.sin(angle) / zoom
    b0, b1 = -a1, a0
    x0, y0 = centre + shift_x, centre + shift_y
    a2 = centre - a0 * x0 - a1 * y0
    b2 = centre - b0 * x0 - b1 * y0
    if mirrored:  # then x -> (size - 1) - x in the input
        a0, a1, a2 = -a0, -a1, (image_size - 1) - a2
    zeros = np.zeros_like(a0)
    return np.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1).astype(np.float32)


def transformed_codes(
    model, codes: np.ndarray, transforms: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """The code maps `[N, h, w]` int32 of `codes`' reconstructions moved by `transforms`.

    Decoded, resampled bilinearly through each map's `[8]` projective transform
    (`pose_transforms`; the border pixel fills what moves in: the background), and encoded
    again by the same VQ-VAE, as `mirrored_codes`.
    """
    import tensorflow as tf

    image_size = np.shape(codes)[1] * model.downsample_factor

    def move(images, first: int):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=tf.constant(transforms[first : first + batch_size], tf.float32),
            output_shape=tf.constant([image_size, image_size], tf.int32),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )

    return _reencoded(model, codes, move, batch_size)


def with_pose_copies(
    model,
    codes: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    context: tuple[np.ndarray, np.ndarray] | None,
    config: PriorConfig,
    seed: int,
    mirrored: bool = False,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """A training set followed by `config.pose_copies` copies of it, each patient in a new pose.

    Copy k of every map is `transformed_codes` of the map under its group's (patient's) k-th
    pose (`pose_transforms` with `config.pose_rotation`, `pose_shift`, `pose_scale`, drawn from
    `seed` and k): the codes of the same brain as a slightly different head position would give,
    as the real scans vary. `mirrored`: `codes` is `with_mirror_images`' output (its second half
    the mirror images), whose copies are posed from the unmirrored maps, one resampling each.
    `context` as `with_mirror_images`: a copy's previous slice is the same copy's.
    """
    codes = np.asarray(codes, np.int32)
    count = len(codes)
    half = count // 2 if mirrored else count
    originals = np.concatenate([codes[:half], codes[:half]]) if mirrored else codes
    flips = np.arange(count) >= half if mirrored else np.zeros(count, bool)
    image_size = codes.shape[1] * model.downsample_factor
    groups = np.asarray(groups)
    out_codes, out_labels = [codes], [labels]
    out_context = [context] if context is not None else []
    for copy in range(config.pose_copies):
        rng = np.random.default_rng([seed, copy])
        transforms = np.zeros((count, 8), np.float32)
        for flip in (False, True):
            rows = flips == flip
            if rows.any():  # a mirror image's pose is independent of its original's
                transforms[rows] = pose_transforms(
                    groups[rows],
                    image_size,
                    rng,
                    config.pose_rotation,
                    config.pose_shift,
                    config.pose_scale,
                    mirrored=flip,
                )
        out_codes.append(transformed_codes(model, originals, transforms, batch_size))
        out_labels.append(labels)
        if context is not None:
            previous, positions = (np.asarray(array, np.int32) for array in context)
            out_context.append((_moved_previous(previous, count * (copy + 1)), positions))
    joined = None
    if context is not None:
        joined = tuple(np.concatenate([part[i] for part in out_context]) for i in range(2))
    return np.concatenate(out_codes), np.concatenate(out_labels), joined
