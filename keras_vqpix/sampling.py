"""Ancestral sampling of code maps from the PixelCNN prior, and decoding them into images.

Codes are drawn in raster order, `c_ij ~ Categorical(logits_ij(c_<ij, label) / temperature)`
(van den Oord et al. 2016, https://arxiv.org/abs/1606.05328), in graph mode (`tf.function`
and `tf.while_loop`) with stateless random ops only.

Per-position seeding, the contract every sampler keeps so that they all draw **exactly** the
same codes for the same seed (a faster sampler only changes how the logits are computed):

1. The user seed `s` (an int32) becomes the stateless seed pair `(s, SEED_SALT)`, int32.
2. The code at row `r`, column `c` of an `h x w` map has the raster index `p = r * w + c` and
   the seed `position_seed = stateless_fold_in((s, SEED_SALT), p, alg="philox")`
   (`tf.random.experimental.stateless_fold_in`).
3. Map `i` of the batch (0-based) draws its code at `p` with its own seed
   `stateless_fold_in(position_seed, i, alg="philox")` from its float32 logits `[K]`:
   `tfp.distributions.Categorical(logits=logits / temperature).sample(seed=that seed)`
   (`draw_codes`, one map at a time through `tf.map_fn`).

One map per draw matters: TF's CPU kernel behind `Categorical.sample` (`stateless_categorical`)
inverts each row's CDF with a uniform taken from one Philox stream that it splits by *thread
shard*, so a batched `[n, K]` draw changes with the number of CPU threads and with n. Drawn
one map at a time, a code depends only on the seed, its position, its map index and its
logits: not on the machine, the batch size or how rows are grouped into calls (the progress
bar runs one row per call). And since the uniform is fixed by the seed, logits that differ by
float rounding only change a code when the uniform falls within rounding of a CDF boundary.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_vqpix.data.discover import CLASS_NAMES, LABELS

SEED_SALT = 1606  # arXiv 1606.05328
UNCONDITIONAL = -1
_INT32 = (-(2**31), 2**31 - 1)
_ROW_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- The seeding contract ---------------------------------------------------------------------------
def check_seed(seed) -> int:
    """`seed` as a Python int in the int32 range, or a one-line ValueError."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not _INT32[0] <= seed <= _INT32[1]
    ):
        raise ValueError(f"seed must be an int32 (-2**31 <= seed < 2**31). Received: seed={seed!r}")
    return int(seed)


def check_temperature(temperature) -> float:
    """`temperature` as a float > 0 (finite), or a one-line ValueError."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0. Received: temperature={temperature!r}"
        )
    return value


def position_seed(seed, index):
    """Stateless seed `int32[2]` of the code at raster index `index` (= row * w + col) for `seed`."""
    pair = tf.stack([tf.cast(seed, tf.int32), tf.constant(SEED_SALT, tf.int32)])
    return tf.random.experimental.stateless_fold_in(pair, tf.cast(index, tf.int32), alg="philox")


def draw_codes(logits, seed, index, temperature):
    """Codes `[n]` int32 of the n maps at raster index `index`, from their `logits [n, K]`.

    Map i draws from `Categorical(logits[i] / temperature)` with the seed
    `stateless_fold_in(position_seed(seed, index), i)`: see the module docstring.
    """
    logits = tf.cast(logits, tf.float32) / tf.cast(temperature, tf.float32)
    at_position = position_seed(seed, index)

    def draw_one(arguments):
        map_logits, map_index = arguments
        map_seed = tf.random.experimental.stateless_fold_in(at_position, map_index, alg="philox")
        distribution = tfp.distributions.Categorical(logits=map_logits, dtype=tf.int32)
        return distribution.sample(seed=map_seed)

    maps = tf.range(tf.shape(logits)[0], dtype=tf.int32)
    return tf.map_fn(draw_one, (logits, maps), fn_output_signature=tf.int32)


# -- Labels -------------------------------------------------------------------------------------------
def resolve_labels(prior, num_samples: int, labels=None) -> np.ndarray:
    """Labels `[num_samples]` int32 for `prior`.

    `labels`: None (a conditional prior: the first half NC, the rest AD; an unconditional
    prior: all -1), one label for every sample, or one per sample; a label is 0 / "NC",
    1 / "AD" or -1 (unconditional). An unconditional prior accepts only -1.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1. Received: num_samples={num_samples}")
    if labels is None:
        if not prior.conditional:
            return np.full(num_samples, UNCONDITIONAL, np.int32)
        return np.repeat(
            np.arange(2, dtype=np.int32), [num_samples - num_samples // 2, num_samples // 2]
        )
    values = [labels] if isinstance(labels, (str, int, np.integer)) else list(labels)
    out = []
    for value in values:
        if isinstance(value, str):
            if value.upper() not in LABELS:
                raise ValueError(
                    f"label must be one of {', '.join(CLASS_NAMES)}. Received: label={value!r}"
                )
            value = LABELS[value.upper()]
        out.append(int(value))
    if len(out) == 1:
        out = out * num_samples
    if len(out) != num_samples:
        raise ValueError(
            f"labels must be one label or one per sample ({num_samples}). Received: {len(out)} labels"
        )
    out = np.asarray(out, np.int32)
    if not prior.conditional and np.any(out != UNCONDITIONAL):
        raise ValueError(
            "label: this prior is unconditional (trained without labels); sample it without a label"
        )
    if np.any((out < UNCONDITIONAL) | (out >= prior.num_classes)):
        raise ValueError(
            f"labels must be in -1 .. {prior.num_classes - 1}. Received: labels={sorted(set(out.tolist()))}"
        )
    return out


# -- Reference sampler --------------------------------------------------------------------------------
def _code_shape(prior, code_shape) -> tuple[int, int]:
    shape = code_shape if code_shape is not None else getattr(prior, "code_shape", None)
    if shape is None:
        raise ValueError(
            "code_shape is unknown: pass code_shape=(h, w) for a prior built without one"
        )
    height, width = (int(s) for s in shape)
    return height, width


def sample_rows_reference(prior, codes, labels, seed, temperature, row_start, row_end):
    """Draw rows `row_start .. row_end - 1` of `codes [n, h, w]` (a TF function body).

    One forward pass of the whole map per position: the logits of `(r, c)` are those of the
    current map, whose codes at and after `(r, c)` the prior cannot see. Returns the codes
    with those rows filled in; the other rows are returned unchanged.
    """
    height, width = codes.shape[1], codes.shape[2]
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]

    def body(index, codes):
        row, col = index // width, index % width
        logits = prior(codes, labels, training=False)[:, row, col, :]
        draws = draw_codes(logits, seed, index, temperature)
        here = tf.logical_and(tf.equal(rows, row), tf.equal(cols, col))
        return index + 1, tf.where(here[None], draws[:, None, None], codes)

    _, codes = tf.while_loop(
        lambda index, _: index < row_end * width, body, (row_start * width, codes)
    )
    return codes


def _row_sampler(prior, height: int, width: int):
    """A traced-once `tf.function(codes, labels, seed, temperature, row)` drawing one row."""
    cached = _ROW_SAMPLERS.get(prior, {}).get((height, width))
    if cached is not None:
        return cached
    # The cache is keyed weakly by the prior; a strong reference from the function would keep
    # every prior ever sampled alive.
    prior_ref = weakref.ref(prior)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, height, width], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
        ]
    )
    def sample_row(codes, labels, seed, temperature, row):
        return sample_rows_reference(prior_ref(), codes, labels, seed, temperature, row, row + 1)

    _ROW_SAMPLERS.setdefault(prior, {})[(height, width)] = sample_row
    return sample_row


def sample_codes_reference(
    prior,
    num_samples: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    code_shape=None,
    on_row: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Code maps `[num_samples, h, w]` int32 drawn by the straightforward reference sampler.

    Keeps the seeding contract of the module docstring with one full forward pass of the prior
    per position (`h * w` passes per map), one graph-mode row per call.

    Args:
        prior: a `PixelCNN`.
        num_samples: int >= 1.
        seed: int32; the same seed (and labels, temperature) gives the same codes.
        labels: see `resolve_labels`.
        temperature: float > 0; logits are divided by it.
        code_shape: (h, w); default: the prior's `code_shape`.
        on_row: called with `(rows done, h)` after each row (progress).
    """
    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    labels = resolve_labels(prior, num_samples, labels)
    height, width = _code_shape(prior, code_shape)
    sample_row = _row_sampler(prior, height, width)
    codes = tf.zeros((num_samples, height, width), tf.int32)
    arguments = (
        tf.constant(labels),
        tf.constant(seed, tf.int32),
        tf.constant(temperature, tf.float32),
    )
    for row in range(height):
        codes = sample_row(codes, *arguments, tf.constant(row, tf.int32))
        if on_row is not None:
            on_row(row + 1, height)
    return codes.numpy()


def sample_codes(
    prior,
    num_samples: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    code_shape=None,
    on_row: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Code maps `[num_samples, h, w]` int32 from `prior`: the public entry point.

    Arguments as `sample_codes_reference`, which it runs today; a faster sampler keeping the
    same seeding contract (hence drawing the same codes) can replace it here.
    """
    return sample_codes_reference(
        prior, num_samples, seed, labels, temperature, code_shape=code_shape, on_row=on_row
    )


GRAPH_METHODS = ("reference",)


def codes_graph(
    prior, num_samples, seed, labels, temperature, height: int, width: int, method="reference"
):
    """Code maps `[num_samples, height, width]` int32 drawn entirely in the graph (a TF function body).

    The whole sampling loop is one `tf.while_loop`, so it runs inside a `tf.function` traced
    without autograph (a SavedModel signature: `keras_vqpix.export`) and needs no Python at
    run time. It keeps the seeding contract of the module docstring, so it draws the same codes
    as `sample_codes` for the same seed, labels and temperature.

    Args:
        prior: a `PixelCNN`.
        num_samples: int32 scalar tensor (dynamic), n >= 1.
        seed: int32 scalar tensor.
        labels: int32 tensor `[n]`, one label per map (-1: unconditional); already valid for
            `prior` (see `resolve_labels`): nothing is checked here.
        temperature: float32 scalar tensor > 0.
        height, width: Python ints, the code map size (static).
        method: "reference" (`sample_rows_reference`: one forward pass of the prior per code).
            Every method draws the same codes; they differ in speed only.

    Returns:
        int32 tensor `[n, height, width]` with a static `[None, height, width]` shape.
    """
    if method not in GRAPH_METHODS:
        raise ValueError(f"method must be one of {GRAPH_METHODS}. Received: method={method!r}")
    num_samples = tf.cast(num_samples, tf.int32)
    codes = tf.zeros(tf.stack([num_samples, height, width]), tf.int32)
    codes = tf.ensure_shape(codes, [None, height, width])
    labels = tf.cast(labels, tf.int32)
    seed = tf.cast(seed, tf.int32)
    temperature = tf.cast(temperature, tf.float32)
    return sample_rows_reference(prior, codes, labels, seed, temperature, 0, height)


def decode_codes(vqvae, codes, batch_size: int = 32) -> np.ndarray:
    """Images `[n, H, W, 1]` float32 in [0, 1] of code maps `[n, h, w]` (`vqvae.decode`)."""
    decode = tf.function(vqvae.decode)
    codes = np.asarray(codes, np.int32)
    return np.concatenate(
        [
            decode(tf.constant(codes[i : i + batch_size])).numpy()
            for i in range(0, len(codes), batch_size)
        ]
    )


def label_name(label: int) -> str:
    """ "NC", "AD" or "unconditional"."""
    return "unconditional" if label < 0 else CLASS_NAMES[label]


# -- vqpix sample ---------------------------------------------------------------------------------------
def sample_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_samples: int = 16,
    seed: int = 0,
    label: str | int | None = None,
    temperature: float = 1.0,
    *,
    on_row: Callable[[int, int], None] | None = None,
) -> int:
    """Sample `num_samples` slices from the run's prior into the new folder `out_dir`; the count written.

    Writes `sample_<i>_<label>.png` (8-bit grayscale), `sample_<i>_<label>.npy` (the code map,
    int32), `grid.png` and `samples.json` (seed, temperature, labels, which models), all into a
    temporary folder renamed to `out_dir` at the end. A non-empty `out_dir` is refused.

    Args:
        label: None (conditional prior: half NC, half AD; unconditional prior: unconditional),
            "NC"/"AD" (any case), 0/1, or -1 (unconditional, conditional priors too).
        on_row: progress callback, as in `sample_codes_reference`.
    """
    from PIL import Image

    from keras_vqpix import plots
    from keras_vqpix.io import atomic_directory
    from keras_vqpix.training.artifacts import RunPaths, load_prior, load_vqvae

    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir} exists and is not empty; choose a new folder")
    paths = RunPaths(Path(run_dir))
    vqvae, _, vqvae_meta = load_vqvae(paths.root)
    prior, prior_meta = load_prior(paths.root, vqvae_meta)
    if label is not None and not prior.conditional:
        raise ValueError(
            f"--label: the prior of {paths.root} is unconditional (trained without labels); omit --label"
        )
    labels = resolve_labels(prior, num_samples, label)
    codes = sample_codes(prior, num_samples, seed, labels, temperature, on_row=on_row)
    images = decode_codes(vqvae, codes)
    digits = max(3, len(str(num_samples - 1)))
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        names = []
        for i, (code_map, image, value) in enumerate(zip(codes, images, labels, strict=True)):
            stem = f"sample_{i:0{digits}d}_{label_name(int(value))}"
            pixels = np.round(np.clip(image[..., 0], 0.0, 1.0) * 255.0).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp / f"{stem}.png")
            np.save(tmp / f"{stem}.npy", code_map.astype(np.int32))
            names.append(stem)
        rows = []
        for value in sorted(set(labels.tolist())):
            chosen = images[labels == value]
            rows += [(label_name(value), chosen[i : i + 8]) for i in range(0, len(chosen), 8)]
        plots.plot_image_rows(
            rows,
            tmp / "grid.png",
            f"{num_samples} samples, seed {seed}, temperature {temperature:g}",
        )
        record = {
            "run": str(paths.root.resolve()),
            "num_samples": num_samples,
            "seed": seed,
            "temperature": temperature,
            "labels": [label_name(int(v)) for v in labels],
            "files": names,
            "prior_epoch": prior_meta.get("epoch"),
            "prior_fingerprint": prior_meta.get("fingerprint"),
            "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
        }
        (tmp / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    return num_samples
