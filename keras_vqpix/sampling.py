"""Ancestral sampling of code maps from the PixelCNN prior, and decoding them into images.

Codes are drawn in raster order, `c_ij ~ Categorical(logits_ij(c_<ij, label) / temperature)`
(van den Oord et al. 2016, https://arxiv.org/abs/1606.05328), in graph mode (`tf.function`
and `tf.while_loop`) with stateless random ops only.

Per-row seeding, the contract every sampler keeps so that they all draw **exactly** the same
codes for the same seed (a faster sampler only changes how the logits are computed):

1. The user seed `s` (an int32) becomes the stateless seed pair `(s, SEED_SALT)`, int32.
2. Row `r` of every map has the seed `row_seed = stateless_fold_in((s, SEED_SALT), r,
   alg="philox")` (`tf.random.experimental.stateless_fold_in`).
3. Map `i` of the request (0-based) has, for row r, its own seed `stateless_fold_in(row_seed,
   i, alg="philox")` and from it Gumbel noise `G = -log(-log(U)) [w, K]`, `U =
   stateless_uniform([w, K], that seed, minval=float32 tiny, maxval=1, alg="philox")`
   (`row_noise`): what `tfp.distributions.Gumbel(0., 1.).sample([w, K], seed=that seed)`
   draws (tested).
4. Its code at column `c` is `argmax_k(logits_k / temperature + G[c, k])` (`draw_codes`) with
   the float32 logits at `(r, c)`: the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014,
   https://arxiv.org/abs/1411.0030) draws exactly from `Categorical(logits / temperature)`.

Noise per map and row matters: a code depends only on the seed, its position, its map index
and its logits, not on the machine, the batch size or how rows are grouped into calls (the
progress bar runs one row per call); and since the noise is fixed by the seed, logits that
differ by float rounding only change a code when two perturbed logits are within rounding of
each other. One noise draw per map and row (not per position, nor one `stateless_categorical`
per map and position, whose batched kernel splits its Philox stream by thread shard) keeps
the draws of a whole batch one `argmax`: a column of 16 maps is a few ops, not 16 kernel
calls (`benchmarks/RESULTS.md`).

Two samplers keep the contract, and draw the same codes bit for bit:

- the **reference** (`sample_codes_reference`, `sample_rows_reference`) computes the logits of
  every position afresh from the codes drawn so far: `H * W` forward passes per map;
- the **fast** sampler (`sample_codes_fast`, `sample_rows_fast`, `fast_codes_graph`; the
  default of `sample_codes`) caches the activations of the rows and columns already drawn
  (Ramachandran et al. 2017, https://arxiv.org/abs/1704.06001) and computes per position
  only the new column of each stack: about one forward pass of arithmetic per map, plus one
  `argmax` per position.

Bit for bit, not just to float rounding: CPU convolutions and matmuls round differently for
different operand shapes (a 1 x 1 window and a whole map give logits a few ulps apart), so
for a `PixelCNN` both samplers compute their logits with the same row and column steps
(`keras_vqpix.models.pixelcnn_steps.PixelCNNSteps`): the reference recomputes every step for
every position, the fast sampler reuses them; each step is the same operations on the same
shapes and values in both. Those logits equal `PixelCNN.call`'s to float rounding (tested at
every position). A prior that is no `PixelCNN` (e.g. a test double) is sampled by its `call`
over the whole map, one position at a time, by either sampler.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vqpix import plots
from keras_vqpix.config import SEED_RANGE
from keras_vqpix.data.discover import CLASS_NAMES, LABELS, UNCONDITIONAL, label_name
from keras_vqpix.data.stacks import position_bins
from keras_vqpix.io import atomic_directory, check_output_folder
from keras_vqpix.models.pixelcnn import PixelCNN
from keras_vqpix.models.pixelcnn_steps import PixelCNNSteps
from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae

SEED_SALT = 1606  # arXiv 1606.05328
# Temperatures the samplers take: float32's normal numbers (subnormals are flushed to zero).
TEMPERATURE_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))
_TINY = float(np.finfo(np.float32).tiny)  # the least uniform of the Gumbel noise: -log(-log) finite
_ROW_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAST_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RESAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- The seeding contract ---------------------------------------------------------------------------
def check_seed(seed) -> int:
    """`seed` as a Python int in `keras_vqpix.config.SEED_RANGE` (int32), or a one-line ValueError."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]
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
    if not TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        raise ValueError(
            f"temperature must be a normal float32, {TEMPERATURE_RANGE[0]:.3g} .. "
            f"{TEMPERATURE_RANGE[1]:.3g} (TensorFlow's CPU kernels read smaller ones as 0). "
            f"Received: temperature={temperature!r}"
        )
    return value


def check_guidance(guidance) -> float | None:
    """`guidance` as None (none: also for 1, which draws from the conditional prior itself) or a
    float w >= 0 (`PixelCNNSteps`' classifier-free guidance), or a one-line ValueError."""
    if guidance is None:
        return None
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(guidance, bool) or not np.isfinite(value) or value < 0:
        raise ValueError(f"guidance must be a finite number >= 0. Received: guidance={guidance!r}")
    return None if value == 1.0 else value


def _guidance_tensor(guidance):
    return tf.constant(1.0 if guidance is None else guidance, tf.float32)


def row_seed(seed, row):
    """Stateless seed `int32[2]` of row `row` of every map drawn with `seed` (step 2 of the contract)."""
    pair = tf.stack([tf.cast(seed, tf.int32), tf.constant(SEED_SALT, tf.int32)])
    return tf.random.experimental.stateless_fold_in(pair, tf.cast(row, tf.int32), alg="philox")


def map_seeds(at_row, num_maps, first_map=0):
    """Seeds `int32 [num_maps, 2]` of maps `first_map .. first_map + num_maps - 1` under the seed
    `at_row`: the seed of map i is `stateless_fold_in(at_row, i, alg="philox")`.

    Computed at once: `stateless_fold_in(s, i)` is `[x, i]`, where `x` is drawn from `s` alone
    (tested against `stateless_fold_in` itself). `first_map` lets a large request be drawn in
    batches that draw the codes of one call (`sample_codes(..., batch_size=...)`).
    """
    first = tf.random.experimental.stateless_fold_in(at_row, 0, alg="philox")[0]
    first_map = tf.cast(first_map, tf.int32)
    indices = tf.range(first_map, first_map + tf.cast(num_maps, tf.int32), dtype=tf.int32)
    return tf.stack([tf.fill([num_maps], first), indices], axis=1)


def gumbel_noise(seeds, width: int, num_codes):
    """Standard Gumbel noise `float32 [n, width, num_codes]`, map i's from its seed `seeds[i]`
    (`int32 [n, 2]`): `-log(-log(U))`, U uniform in `[float32 tiny, 1)` (finite: 16.7 at most)."""

    def uniform(seed):
        return tf.random.stateless_uniform(
            tf.stack([width, num_codes]), seed, minval=_TINY, maxval=1.0, alg="philox"
        )

    uniforms = tf.map_fn(uniform, seeds, fn_output_signature=tf.float32)
    return -tf.math.log(-tf.math.log(uniforms))


def row_noise(seed, row, num_maps, width: int, num_codes, first_map=0):
    """The Gumbel noise `float32 [num_maps, width, K]` of row `row` of maps `first_map ..` drawn
    with `seed` (step 3 of the contract)."""
    return gumbel_noise(map_seeds(row_seed(seed, row), num_maps, first_map), width, num_codes)


def scaled_logits(logits, temperature):
    """`logits / temperature` (float32), kept finite for any temperature > 0.

    A tiny temperature (1e-30) overflows the largest logits to +inf, where the noise no longer
    tells them apart (the argmax would take the first). Such rows are scaled after subtracting
    their maximum ((logits - max) / temperature: the maximum stays 0, the same distribution);
    other rows are divided as they are, so their draws do not change.
    """
    logits = tf.cast(logits, tf.float32)
    temperature = tf.cast(temperature, tf.float32)
    scaled = logits / temperature
    finite = tf.reduce_all(tf.math.is_finite(scaled), axis=-1, keepdims=True)
    shifted = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature
    return tf.where(finite, scaled, shifted)


def draw_codes(logits, noise, temperature):
    """Codes `[n]` int32 from the logits `[n, K]` of n maps at one position and their Gumbel noise
    there `[n, K]` (`row_noise(...)[:, col]`): `argmax(logits / temperature + noise)`, a draw
    from `Categorical(logits / temperature)` (step 4 of the contract)."""
    return tf.argmax(scaled_logits(logits, temperature) + noise, axis=-1, output_type=tf.int32)


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


def resolve_context(
    prior,
    num_samples: int,
    previous=None,
    positions=None,
    code_shape=None,
    *,
    seed: int = 0,
    first_map: int = 0,
):
    """`(previous [n, h, w], positions [n])` int32: a slice-context prior's context per sample.

    `previous`: None (no previous slice), or the previous slice's codes, one map `[h, w]` for
    every sample or one per sample `[n, h, w]`, in `[0, K)` (-1: none). `positions`: None
    (each sample's bin drawn by `draw_positions` with `seed`, `first_map`: single slices from
    anywhere in the stack), or one bin for every sample or one per sample, in `-1 ..
    slice_positions - 1` (-1: unknown). A prior without that context (`PixelCNN.previous_slice`,
    `slice_positions`) accepts only None (or -1).
    """
    height, width = _code_shape(prior, code_shape)
    if positions is None:
        positions = draw_positions(prior, num_samples, seed, first_map)
    previous = np.full((height, width), -1, np.int32) if previous is None else previous
    previous = np.asarray(previous)
    if previous.shape not in ((height, width), (num_samples, height, width)):
        raise ValueError(
            f"previous must be one code map {(height, width)} or one per sample "
            f"{(num_samples, height, width)}. Received: shape {previous.shape}"
        )
    previous = np.broadcast_to(previous.astype(np.int32), (num_samples, height, width))
    positions = np.asarray(positions)
    if positions.ndim > 1 or positions.size not in (1, num_samples):
        raise ValueError(
            f"positions must be one position bin or one per sample ({num_samples}). "
            f"Received: shape {positions.shape}"
        )
    positions = np.broadcast_to(positions.astype(np.int32).reshape(-1), (num_samples,))
    reads_previous = getattr(prior, "previous_slice", False)
    bins = getattr(prior, "slice_positions", 0)
    if np.any(previous != -1) and not reads_previous:
        raise ValueError(
            "previous: this prior does not read a previous slice (previous_slice=False)"
        )
    if reads_previous and np.any((previous < -1) | (previous >= prior.num_embeddings)):
        raise ValueError(f"previous codes must be in -1 .. {prior.num_embeddings - 1}")
    if np.any(positions != -1) and not bins:
        raise ValueError("positions: this prior has no slice positions (slice_positions=0)")
    if np.any((positions < -1) | (positions >= max(bins, 1))):
        raise ValueError(
            f"positions must be in -1 .. {bins - 1}. Received: {sorted(set(positions.tolist()))}"
        )
    return np.ascontiguousarray(previous), np.ascontiguousarray(positions)


# -- Reference sampler --------------------------------------------------------------------------------
def _code_shape(prior, code_shape) -> tuple[int, int]:
    shape = code_shape if code_shape is not None else getattr(prior, "code_shape", None)
    if shape is None:
        raise ValueError(
            "code_shape is unknown: pass code_shape=(h, w) for a prior built without one"
        )
    height, width = (int(s) for s in shape)
    trained = getattr(prior, "code_shape", None)
    if getattr(prior, "position_embedding", False) and (height, width) != tuple(trained):
        raise ValueError(
            f"code_shape must be the prior's own {tuple(trained)}: it learnt an embedding per "
            f"position. Received: code_shape={(height, width)}"
        )
    return height, width


def sample_rows_reference(
    prior,
    codes,
    labels,
    seed,
    temperature,
    row_start,
    row_end,
    first_map=0,
    redraw=None,
    previous=None,
    positions=None,
    guidance=None,
):
    """Draw rows `row_start .. row_end - 1` of `codes [n, h, w]` (a TF function body).

    One forward pass per position: the logits of `(r, c)` are computed afresh from the current
    map, whose codes at and after `(r, c)` the prior cannot see. For a `PixelCNN` that pass is
    its row and column steps over the rows above and the columns before `(r, c)`
    (`PixelCNNSteps.position_logits`, the arithmetic the fast sampler shares); for another
    prior, its `call` over the whole map. Returns the codes with those rows filled in; the
    other rows are returned unchanged. `first_map`: the index of map 0 of `codes` in the whole
    request (see `map_seeds`). With `redraw` (bool `[n, h, w]`), only the positions it marks
    are drawn, the others keep their code in `codes` (see `resample_codes`). `previous`,
    `positions`: a slice-context prior's context (`resolve_context`; None: none, unknown).
    `guidance`: None, or a float32 w (`PixelCNNSteps`: classifier-free guidance).
    """
    height, width = codes.shape[1], codes.shape[2]
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    steps = (
        PixelCNNSteps(prior, labels, width, previous, positions, guidance)
        if isinstance(prior, PixelCNN)
        else None
    )

    def body(index, codes):
        row, col = index // width, index % width
        if steps is None:
            logits = prior(codes, labels, training=False)[:, row, col, :]
        else:
            logits = steps.position_logits(codes, row, col)
        noise = row_noise(seed, row, tf.shape(codes)[0], width, tf.shape(logits)[-1], first_map)
        draws = draw_codes(logits, noise[:, col], temperature)
        if redraw is not None:
            draws = tf.where(redraw[:, row, col], draws, codes[:, row, col])
        here = tf.logical_and(tf.equal(rows, row), tf.equal(cols, col))
        return index + 1, tf.where(here[None], draws[:, None, None], codes)

    _, codes = tf.while_loop(
        lambda index, _: index < row_end * width, body, (row_start * width, codes)
    )
    return codes


def _row_sampler(prior, height: int, width: int, guided: bool = False):
    """A traced-once `tf.function(codes, labels, previous, positions, seed, temperature, row,
    first_map, guidance)` drawing one row (`guided`: with guidance)."""
    cached = _ROW_SAMPLERS.get(prior, {}).get((height, width, guided))
    if cached is not None:
        return cached
    # The cache is keyed weakly by the prior; a strong reference from the function would keep
    # every prior ever sampled alive.
    prior_ref = weakref.ref(prior)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, height, width], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, height, width], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
        ],
        autograph=False,
    )
    def sample_row(codes, labels, previous, positions, seed, temperature, row, first_map, guidance):
        return sample_rows_reference(
            prior_ref(),
            codes,
            labels,
            seed,
            temperature,
            row,
            row + 1,
            first_map,
            previous=previous,
            positions=positions,
            guidance=guidance if guided else None,
        )

    _ROW_SAMPLERS.setdefault(prior, {})[(height, width, guided)] = sample_row
    return sample_row


def _checked_arguments(
    prior,
    num_samples,
    seed,
    labels,
    temperature,
    code_shape,
    first_map=0,
    previous=None,
    positions=None,
):
    """`((labels, previous, positions, seed, temperature) as tensors, h, w, first_map)`."""
    if isinstance(first_map, bool) or not isinstance(first_map, (int, np.integer)):
        raise ValueError(f"first_map must be an int >= 0. Received: first_map={first_map!r}")
    if not 0 <= first_map <= np.iinfo(np.int32).max - num_samples:
        raise ValueError(
            f"first_map must be in 0 .. 2**31 - 1 - num_samples. Received: first_map={first_map}"
        )
    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    labels = resolve_labels(prior, num_samples, labels)
    height, width = _code_shape(prior, code_shape)
    previous, positions = resolve_context(
        prior, num_samples, previous, positions, code_shape, seed=seed, first_map=first_map
    )
    arguments = (
        tf.constant(labels),
        tf.constant(previous),
        tf.constant(positions),
        tf.constant(seed, tf.int32),
        tf.constant(temperature, tf.float32),
    )
    return arguments, height, width, tf.constant(int(first_map), tf.int32)


def sample_codes_reference(
    prior,
    num_samples: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    code_shape=None,
    on_row: Callable[[int, int], None] | None = None,
    first_map: int = 0,
    previous=None,
    positions=None,
    guidance: float | None = None,
) -> np.ndarray:
    """Code maps `[num_samples, h, w]` int32 drawn by the straightforward reference sampler.

    Keeps the seeding contract of the module docstring with one forward pass of the prior per
    position (`h * w` passes per map, `sample_rows_reference`), one graph-mode row per call.

    Args:
        prior: a `PixelCNN` (or any callable prior `(codes, labels) -> logits [n, h, w, K]`
            with `conditional`, `num_classes` and, unless `code_shape` is given, `code_shape`).
        num_samples: int >= 1.
        seed: int32; the same seed (and labels, temperature) gives the same codes.
        labels: see `resolve_labels`.
        temperature: float > 0; logits are divided by it.
        code_shape: (h, w); default: the prior's `code_shape`.
        on_row: called with `(rows done, h)` after each row (progress).
        first_map: int >= 0, the index of the first of these maps in a larger request drawn in
            batches: maps `first_map ..` of that request (see `map_seeds`).
        previous, positions: a slice-context prior's context, the previous slice's codes and
            the slice's position bin (`resolve_context`); None: none, and a bin drawn per map.
        guidance: None, or w >= 0: classifier-free guidance (`PixelCNNSteps`; `check_guidance`).
    """
    arguments, height, width, first_map = _checked_arguments(
        prior, num_samples, seed, labels, temperature, code_shape, first_map, previous, positions
    )
    guidance = check_guidance(guidance)
    sample_row = _row_sampler(prior, height, width, guidance is not None)
    codes = tf.zeros((num_samples, height, width), tf.int32)
    for row in range(height):
        codes = sample_row(
            codes, *arguments, tf.constant(row, tf.int32), first_map, _guidance_tensor(guidance)
        )
        if on_row is not None:
            on_row(row + 1, height)
    return codes.numpy()


# -- Fast sampler ---------------------------------------------------------------------------------------
def sample_rows_fast(
    steps, codes, state, seed, temperature, row_start, row_end, first_map=0, redraw=None
):
    """Draw rows `row_start .. row_end - 1` of `codes [n, h, w]` from cached activations (a TF
    function body).

    Args:
        steps: the prior's `PixelCNNSteps` for these maps' labels and width.
        codes: `[n, h, w]` int32, rows before `row_start` drawn.
        state: the steps' state after row `row_start - 1` (`steps.start()` for row 0).
        seed, temperature, row_start, row_end: scalars (tensors or Python numbers).
        first_map: the index of map 0 of `codes` in the whole request (see `map_seeds`).
        redraw: None (draw every position), or bool `[n, h, w]`: draw only the positions it
            marks and keep the codes of `codes` elsewhere (`resample_codes`). A row where no
            map redraws anything costs only its `finish_row` (the vertical stack never reads
            the horizontal one), but under attention, which reads every earlier position's
            horizontal stack.

    Each position costs one `steps.column` (the new column of both stacks, and the head) and
    one `draw_codes`; each row one `row_noise` and one `steps.finish_row` (its vertical stack). Returns
    `(codes, state)`: the codes with those rows filled in (the others unchanged), and the state
    to go on from at `row_end`: rows drawn in one call or over several give the same codes.
    """
    width = codes.shape[2]
    num_maps = tf.shape(codes)[0]
    rows = tf.range(codes.shape[1])[None, :, None]

    def draw_row(row, codes, state):
        def drawn_row():
            noise = row_noise(seed, row, num_maps, width, steps.prior.num_embeddings, first_map)

            def draw_column(col, row_state, drawn):
                logits, row_state = steps.column(state, row_state, col)
                draws = draw_codes(logits, noise[:, col], temperature)
                if redraw is not None:
                    draws = tf.where(redraw[:, row, col], draws, codes[:, row, col])
                return col + 1, steps.push_code(row_state, draws, row, col), drawn.write(col, draws)

            _, row_state, drawn = tf.while_loop(
                lambda col, *_: col < width,
                draw_column,
                (tf.constant(0), steps.start_row(state), tf.TensorArray(tf.int32, width)),
            )
            return tf.transpose(drawn.stack()), steps.end_row(state, row_state)  # [n, w]

        if redraw is None or steps.attentions:
            row_codes, state = drawn_row()
        else:
            row_codes, state = tf.cond(
                tf.reduce_any(redraw[:, row]),
                drawn_row,
                lambda: (tf.gather(codes, row, axis=1), state),
            )
        codes = tf.where(tf.equal(rows, row), row_codes[:, None, :], codes)
        return row + 1, codes, steps.finish_row(state, row_codes, row)

    _, codes, state = tf.while_loop(
        lambda row, *_: row < row_end,
        draw_row,
        (tf.convert_to_tensor(row_start, tf.int32), codes, state),
    )
    return codes, state


def _blank_maps(num_samples, labels, height: int, width: int):
    """Zero code maps `[num_samples, height, width]` (static h, w) and one int32 label per map."""
    num_samples = tf.convert_to_tensor(num_samples, tf.int32)
    labels = tf.broadcast_to(tf.cast(labels, tf.int32), tf.reshape(num_samples, [1]))
    codes = tf.zeros(tf.stack([num_samples, height, width]), tf.int32)
    return tf.ensure_shape(codes, [None, height, width]), labels


def _graph_positions(prior, num_samples, seed, positions):
    """`positions`, or when None the bins `draw_positions_graph` draws (as `resolve_context`)."""
    if positions is not None or not getattr(prior, "slice_positions", 0):
        return positions
    return draw_positions_graph(seed, num_samples, prior.slice_positions)


def fast_codes_graph(
    prior,
    num_samples,
    seed,
    labels,
    temperature,
    height: int,
    width: int,
    previous=None,
    positions=None,
    guidance=None,
):
    """Code maps `int32 [num_samples, height, width]` drawn by the fast sampler, in graph mode.

    For `tf.function`s and SavedModel signatures: `num_samples` (int32 scalar), `seed` (int32
    scalar), `labels` (int32, one per sample or one for all; -1 unconditional) and
    `temperature` (float32 scalar) may be symbolic tensors, the number of samples dynamic;
    `height` and `width` are Python ints. The codes of `sample_codes_fast` (hence of the
    reference sampler) for the same arguments. Arguments are not checked: see `check_seed`,
    `check_temperature`, `resolve_labels` and `resolve_context` for what is valid. `previous`
    `[n, h, w]` and `positions` `[n]` (int32 tensors, or None): a slice-context prior's context;
    positions None are drawn as `resolve_context` draws them.
    """
    codes, labels = _blank_maps(num_samples, labels, height, width)
    if not isinstance(prior, PixelCNN):
        return sample_rows_reference(prior, codes, labels, seed, temperature, 0, height)
    positions = _graph_positions(prior, num_samples, seed, positions)
    steps = PixelCNNSteps(prior, labels, width, previous, positions, guidance)
    codes, _ = sample_rows_fast(steps, codes, steps.start(), seed, temperature, 0, height)
    return codes


def reference_codes_graph(
    prior,
    num_samples,
    seed,
    labels,
    temperature,
    height: int,
    width: int,
    previous=None,
    positions=None,
    guidance=None,
):
    """`fast_codes_graph`'s counterpart drawn by the reference sampler (the same codes, slowly)."""
    codes, labels = _blank_maps(num_samples, labels, height, width)
    positions = _graph_positions(prior, num_samples, seed, positions)
    return sample_rows_reference(
        prior,
        codes,
        labels,
        seed,
        temperature,
        0,
        height,
        previous=previous,
        positions=positions,
        guidance=guidance,
    )


def _fast_row_sampler(prior, height: int, width: int, guided: bool = False):
    """Traced-once `tf.function`s `start(labels, previous, positions, guidance) -> state` and
    `sample_row(codes, state, labels, seed, temperature, row, first_map, guidance) -> (codes,
    state)` (`guided`: with guidance)."""
    cached = _FAST_SAMPLERS.get(prior, {}).get((height, width, guided))
    if cached is not None:
        return cached
    prior_ref = weakref.ref(prior)  # as in `_row_sampler`
    labels_spec = tf.TensorSpec([None], tf.int32)
    previous_spec = tf.TensorSpec([None, height, width], tf.int32)

    guidance_spec = tf.TensorSpec([], tf.float32)

    @tf.function(
        input_signature=[labels_spec, previous_spec, labels_spec, guidance_spec], autograph=False
    )
    def start(labels, previous, positions, guidance):
        guidance = guidance if guided else None
        return PixelCNNSteps(prior_ref(), labels, width, previous, positions, guidance).start()

    state_spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype),
        start.get_concrete_function().structured_outputs,
    )

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, height, width], tf.int32),
            state_spec,
            labels_spec,
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.int32),
            guidance_spec,
        ],
        autograph=False,
    )
    def sample_row(codes, state, labels, seed, temperature, row, first_map, guidance):
        guidance = guidance if guided else None
        steps = PixelCNNSteps(prior_ref(), labels, width, guidance=guidance)
        return sample_rows_fast(steps, codes, state, seed, temperature, row, row + 1, first_map)

    _FAST_SAMPLERS.setdefault(prior, {})[(height, width, guided)] = (start, sample_row)
    return start, sample_row


def sample_codes_fast(
    prior,
    num_samples: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    code_shape=None,
    on_row: Callable[[int, int], None] | None = None,
    first_map: int = 0,
    previous=None,
    positions=None,
    guidance: float | None = None,
) -> np.ndarray:
    """Code maps `[num_samples, h, w]` int32 drawn by the fast sampler: the reference's codes.

    Arguments as `sample_codes_reference`. A `PixelCNN` is sampled from cached activations
    (`sample_rows_fast`), one graph-mode row per call with the cache carried between calls;
    any other prior by the reference sampler.
    """
    if not isinstance(prior, PixelCNN):
        return sample_codes_reference(
            prior,
            num_samples,
            seed,
            labels,
            temperature,
            code_shape=code_shape,
            on_row=on_row,
            first_map=first_map,
            previous=previous,
            positions=positions,
            guidance=guidance,
        )
    arguments, height, width, first_map = _checked_arguments(
        prior, num_samples, seed, labels, temperature, code_shape, first_map, previous, positions
    )
    guidance = check_guidance(guidance)
    start, sample_row = _fast_row_sampler(prior, height, width, guidance is not None)
    codes = tf.zeros((num_samples, height, width), tf.int32)
    labels, previous, positions, seed, temperature = arguments
    weight = _guidance_tensor(guidance)
    state = start(labels, previous, positions, weight)
    for row in range(height):
        codes, state = sample_row(
            codes, state, labels, seed, temperature, tf.constant(row, tf.int32), first_map, weight
        )
        if on_row is not None:
            on_row(row + 1, height)
    return codes.numpy()


@dataclass(frozen=True)
class Sampler:
    """One sampling method, in its two forms (both draw the same codes as every other method).

    Attributes:
        codes: `(prior, num_samples, seed, labels, temperature, *, code_shape, on_row,
            first_map)` -> codes `[n, h, w]` int32 (NumPy), one graph-mode row per call
            (progress).
        graph: `(prior, num_samples, seed, labels, temperature, height, width)` -> codes, the
            whole loop in the graph (a `tf.function` or SavedModel signature body).
    """

    codes: Callable
    graph: Callable


# The sampling methods, by name: the one registry both `sample_codes` and `codes_graph` read.
SAMPLERS = {
    "fast": Sampler(sample_codes_fast, fast_codes_graph),
    "reference": Sampler(sample_codes_reference, reference_codes_graph),
}
DEFAULT_METHOD = "fast"
# Maps drawn per graph call by `sample_codes`: bounds the sampler's working memory (the fast
# sampler's cache of activations grows with the maps drawn at once) whatever `num_samples` is.
SAMPLE_BATCH_SIZE = 64


def sampler(method: str) -> Sampler:
    """The `Sampler` named `method` (a key of `SAMPLERS`), or a one-line ValueError."""
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {sorted(SAMPLERS)}. Received: method={method!r}")
    return SAMPLERS[method]


def sample_codes(
    prior,
    num_samples: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    code_shape=None,
    on_row: Callable[[int, int], None] | None = None,
    method: str = DEFAULT_METHOD,
    batch_size: int = SAMPLE_BATCH_SIZE,
    previous=None,
    positions=None,
    guidance: float | None = None,
) -> np.ndarray:
    """Code maps `[num_samples, h, w]` int32 from `prior`: the public entry point.

    Arguments as `sample_codes_reference`; `method`: a key of `SAMPLERS`, "fast"
    (`sample_codes_fast`, the default) or "reference" (`sample_codes_reference`). Both draw the
    same codes. `previous`, `positions`: a slice-context prior's context (`resolve_context`).
    `guidance`: None, or w >= 0, classifier-free guidance (`PixelCNNSteps`): w > 1 strengthens
    the class in the samples, for twice the arithmetic per map.

    Any number of maps: they are drawn `batch_size` at a time, so the sampler's memory is
    bounded by the batch (only the int32 codes, `4 * h * w` bytes a map, grow with
    `num_samples`). Batching does not change the codes: map i draws with its index in the whole
    request (`map_seeds`), whatever batch it falls in. `on_row` is called with
    `(rows done, h * number of batches)`.
    """
    draw = sampler(method).codes
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size}")
    labels = resolve_labels(prior, num_samples, labels)
    previous, positions = resolve_context(
        prior, num_samples, previous, positions, code_shape, seed=check_seed(seed)
    )
    starts = range(0, num_samples, batch_size)
    codes = None
    for batch, start in enumerate(starts):
        progress = None
        if on_row is not None:

            def progress(done, rows, batch=batch):
                on_row(batch * rows + done, rows * len(starts))

        chosen = labels[start : start + batch_size]
        drawn = draw(
            prior,
            len(chosen),
            seed,
            chosen,
            temperature,
            code_shape=code_shape,
            on_row=progress,
            first_map=start,
            previous=previous[start : start + batch_size],
            positions=positions[start : start + batch_size],
            guidance=guidance,
        )
        if codes is None:  # filled in place: no second copy of a large request
            codes = np.empty((num_samples, *drawn.shape[1:]), np.int32)
        codes[start : start + len(chosen)] = drawn
    return codes


def _resampler(prior, height: int, width: int):
    """A traced-once `tf.function(codes, redraw, labels, positions, seed, temperature) -> codes`."""
    cached = _RESAMPLERS.get(prior, {}).get((height, width))
    if cached is not None:
        return cached
    prior_ref = weakref.ref(prior)  # as in `_row_sampler`

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, height, width], tf.int32),
            tf.TensorSpec([None, height, width], tf.bool),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
        ],
        autograph=False,
    )
    def resample(codes, redraw, labels, positions, seed, temperature):
        prior = prior_ref()
        if not isinstance(prior, PixelCNN):
            return sample_rows_reference(
                prior,
                codes,
                labels,
                seed,
                temperature,
                0,
                height,
                redraw=redraw,
                positions=positions,
            )
        steps = PixelCNNSteps(prior, labels, width, positions=positions)
        codes, _ = sample_rows_fast(
            steps, codes, steps.start(), seed, temperature, 0, height, redraw=redraw
        )
        return codes

    _RESAMPLERS.setdefault(prior, {})[(height, width)] = resample
    return resample


def resample_codes(
    prior, codes, redraw, seed: int = 0, labels=None, temperature: float = 1.0, positions=None
) -> np.ndarray:
    """`codes [n, h, w]` with the positions marked in `redraw` drawn afresh from `prior`.

    Ancestral resampling in raster order conditioned on the kept codes: position `(r, c)`
    marked in `redraw` draws from `p(c_rc | c_<rc, label)`, where `c_<rc` holds the kept
    codes and the codes already redrawn; every unmarked position keeps its code exactly. This
    "heals" a code map (Pinaya et al. 2022, https://arxiv.org/abs/2102.11650): the codes a
    prior finds surprising are replaced by likely ones. Only the codes before a position
    condition it (a PixelCNN cannot look ahead), so a redrawn code need not agree with the
    kept codes below it.

    Keeps the seeding contract of the module docstring (map i of `codes` is map i of the
    batch): a redrawn code is the one `sample_codes` draws there for the same seed, label,
    temperature, codes before it (and slice positions, for a prior that reads them), so
    `redraw` all True gives `sample_codes`' maps. All maps go through one graph call of the
    fast sampler's steps; a row where no map redraws anything costs only its vertical stack.

    Args:
        prior: a `PixelCNN` (or a callable prior, as in `sample_codes_reference`).
        codes: int `[n, h, w]`, the code maps.
        redraw: bool `[n, h, w]`, where to draw.
        seed, labels, temperature: as in `sample_codes`; labels one for all or one per map.
        positions: a prior with slice positions: each map's position bin (one for all or one
            per map; `resolve_context`), as it was scored; None: unknown (never drawn: a
            healed map keeps its own slice's place in the stack).
    """
    codes = np.asarray(codes, np.int32)
    redraw = np.asarray(redraw, bool)
    if codes.ndim != 3 or redraw.shape != codes.shape:
        raise ValueError(
            f"codes must be [n, h, w] and redraw of the same shape. Received: codes {codes.shape}, "
            f"redraw {redraw.shape}"
        )
    num_maps, height, width = codes.shape
    arguments, _, _, _ = _checked_arguments(
        prior,
        num_maps,
        seed,
        labels,
        temperature,
        (height, width),
        positions=-1 if positions is None else positions,
    )
    if not redraw.any():  # nothing to draw (and never run a model on nothing)
        return codes
    resample = _resampler(prior, height, width)
    labels, _, positions, seed, temperature = arguments
    return resample(codes, redraw, labels, positions, seed, temperature).numpy()


def codes_graph(
    prior,
    num_samples,
    seed,
    labels,
    temperature,
    height: int,
    width: int,
    method: str = DEFAULT_METHOD,
    previous=None,
    positions=None,
    guidance=None,
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
        labels: int32 tensor, one label per map or one for all (-1: unconditional); already
            valid for `prior` (see `resolve_labels`): nothing is checked here.
        temperature: float32 scalar tensor > 0.
        height, width: Python ints, the code map size (static).
        method: a key of `SAMPLERS`: "fast" (`fast_codes_graph`: cached activations, a few
            forward passes' cost per map) or "reference" (`reference_codes_graph`: one forward
            pass per code). Every method draws the same codes; they differ in speed only.
        previous, positions: int32 tensors `[n, h, w]` and `[n]`, or None: a slice-context
            prior's context (`resolve_context`: positions None are drawn), not checked here.
        guidance: None, or a float32 w >= 0 (classifier-free guidance, `PixelCNNSteps`).

    Returns:
        int32 tensor `[n, height, width]` with a static `[None, height, width]` shape.
    """
    draw = sampler(method).graph
    seed = tf.cast(seed, tf.int32)
    temperature = tf.cast(temperature, tf.float32)
    return draw(
        prior, num_samples, seed, labels, temperature, height, width, previous, positions, guidance
    )


# -- Stacks: whole synthetic patients --------------------------------------------------------------
STACK_SALT = 18  # the issue that asked for synthetic patients
POSITION_SALT = 20


def slice_seed(seed, slice_index):
    """The int32 sampling seed of slice `slice_index` of the stacks drawn with `seed`.

    Slice 0 draws with `seed` itself (so a stack's first slice is what `sample_codes` draws for
    the seed and its position); slice z > 0 with an int32 drawn from the stateless seed
    `stateless_fold_in((seed, STACK_SALT), z)`. Graph-mode ops, the same on every machine.
    """
    seed = tf.cast(seed, tf.int32)
    slice_index = tf.cast(slice_index, tf.int32)
    pair = tf.stack([seed, tf.constant(STACK_SALT, tf.int32)])
    folded = tf.random.experimental.stateless_fold_in(pair, slice_index, alg="philox")
    drawn = tf.random.stateless_uniform(
        [], folded, minval=None, maxval=None, dtype=tf.int32, alg="philox"
    )
    return tf.where(tf.equal(slice_index, 0), seed, drawn)


def position_bins_graph(num_slices, num_positions: int):
    """`keras_vqpix.data.stacks.position_bins` in graph ops (`num_slices` an int32 tensor >= 1)."""
    num_slices = tf.cast(num_slices, tf.int32)
    z = tf.range(num_slices, dtype=tf.int32)
    if num_positions < 1:
        return tf.fill([num_slices], -1)
    spread = (2 * z * (num_positions - 1) + num_slices - 1) // tf.maximum(2 * (num_slices - 1), 1)
    return tf.where(tf.equal(num_slices, 1), -1, spread)


def draw_positions_graph(seed, num_maps, num_positions: int, first_map=0):
    """Position bins `int32 [num_maps]` for single slices, uniform over `0 .. num_positions - 1`.

    Map i's bin is drawn from its own stateless seed (`map_seeds` of `(seed, POSITION_SALT)`),
    so a map's bin depends on the seed and its index in the request only, not on the batch.
    A prior without positions (`num_positions` 0): all -1.
    """
    num_maps = tf.cast(num_maps, tf.int32)
    if num_positions < 1:
        return tf.fill([num_maps], -1)
    pair = tf.stack([tf.cast(seed, tf.int32), tf.constant(POSITION_SALT, tf.int32)])
    seeds = map_seeds(pair, num_maps, first_map)
    return tf.map_fn(
        lambda one: tf.random.stateless_uniform(
            [], one, minval=0, maxval=num_positions, dtype=tf.int32, alg="philox"
        ),
        seeds,
        fn_output_signature=tf.int32,
    )


def draw_positions(prior, num_samples: int, seed: int = 0, first_map: int = 0) -> np.ndarray:
    """`draw_positions_graph` for `prior`'s bins, as NumPy: where single slices sit in a stack.

    What a slice-context prior draws single slices with (`vqpix sample`, `vqpix generate`, the
    exported `sample`): each at a position bin of its own, uniform like the slices of the
    ADNI and demo stacks, so a data set of single slices covers the whole stack.
    """
    return draw_positions_graph(
        check_seed(seed), num_samples, getattr(prior, "slice_positions", 0), first_map
    ).numpy()


def check_num_slices(num_slices) -> int:
    """`num_slices` as an int >= 1, or a one-line ValueError."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, (int, np.integer)):
        raise ValueError(f"num_slices must be an int >= 1. Received: num_slices={num_slices!r}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be an int >= 1. Received: num_slices={num_slices}")
    return int(num_slices)


STACK_BATCH_SIZE = 16  # stacks per graph call of the wavefront sampler (bounds its memory)
_STACK_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sample_stacks(
    prior,
    num_stacks: int,
    num_slices: int,
    seed: int = 0,
    labels=None,
    temperature: float = 1.0,
    *,
    method: str = DEFAULT_METHOD,
    batch_size: int = STACK_BATCH_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
    guidance: float | None = None,
    first_prior=None,
) -> np.ndarray:
    """Code maps `[num_stacks, num_slices, h, w]` int32: whole synthetic patients.

    A prior with `previous_slice` draws slice z of stack i conditioned on slice z - 1 of the
    same stack (slice 0 on none) and on z's position bin in a stack of `num_slices`
    (`keras_vqpix.data.stacks.position_bins`): the chain `p(slice_0) prod_z p(slice_z |
    slice_(z-1))`. Slice z is what `sample_codes` draws with the seed `slice_seed(seed, z)`,
    the previous slice as `previous` and that bin as `positions`; stack i is map i of each
    slice's request (`map_seeds`), so its codes depend neither on `num_stacks` nor on the
    batching. Slice z never reads slice z itself or a later slice.

    Methods (the same codes, tested): "reference" draws slice after slice with
    `sample_codes(..., method="reference")`; "fast" (the default) draws every slice at once as
    a wavefront (`wavefront_stacks_graph`: slice z one row behind slice z - 1), 51 row steps
    instead of 640 for 20 slices of 32 rows.

    Args:
        prior: a `PixelCNN` with `previous_slice` (a prior without it would draw unrelated
            slices: refused).
        num_stacks, num_slices: ints >= 1.
        seed, labels, temperature: as in `sample_codes`; a label per stack.
        method: "fast" or "reference".
        batch_size: stacks per graph call of the fast method (bounds its memory).
        on_progress: called with `(stacks done, num_stacks)` after each batch (fast) or
            `(slices done, num_slices)` after each slice (reference).
        guidance: None, or w >= 0: classifier-free guidance of every slice (`sample_codes`).
        first_prior: None, or a per-slice prior (no previous slice) over the same codes that
            draws each stack's slice 0: `sample_codes(first_prior, ...)` with the seed
            `slice_seed(seed, 0)`, by the same method, at slice 0's position bin if it reads
            positions (0; -1 for a 1-slice stack); `prior` then draws slices 1.. given it.
            A prior trained on every slice draws a first slice better than the stack prior,
            which saw "no previous slice" on part of its maps only (docs/models.md).
    """
    if not getattr(prior, "previous_slice", False):
        raise ValueError(
            "this prior does not read the previous slice (previous_slice=False): it draws "
            "unrelated slices, not stacks; train a run with --config patients"
        )
    sampler(method)
    num_slices = check_num_slices(num_slices)
    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    guidance = check_guidance(guidance)
    labels = resolve_labels(prior, num_stacks, labels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size}")
    first_slices = None
    if first_prior is not None:
        check_first_prior(first_prior, prior)
        # Slice 0's bin under the first prior's positions: 0 (-1: a 1-slice stack, or a prior
        # without positions, for which -1 is what `resolve_context` gives anyway).
        first_bin = position_bins(num_slices, getattr(first_prior, "slice_positions", 0))[0]
        first_slices = sample_codes(
            first_prior,
            num_stacks,
            int(slice_seed(seed, 0)),
            labels,
            temperature,
            method=method,
            guidance=guidance,
            positions=int(first_bin),
        )
    if method == "reference":
        bins = position_bins(num_slices, prior.slice_positions)
        stacks, previous = [], None
        if first_slices is not None:
            stacks, previous = [first_slices], first_slices
        for z in range(len(stacks), num_slices):
            previous = sample_codes(
                prior,
                num_stacks,
                int(slice_seed(seed, z)),
                labels,
                temperature,
                method="reference",
                previous=previous,
                positions=int(bins[z]),
                guidance=guidance,
            )
            stacks.append(previous)
            if on_progress is not None:
                on_progress(z + 1, num_slices)
        return np.stack(stacks, axis=1)
    draw = _stack_sampler(prior, guidance is not None)
    height, width = prior.code_shape
    stacks = []
    for start in range(0, num_stacks, batch_size):
        chosen = labels[start : start + batch_size]
        given = (
            np.full((0, height, width), -1, np.int32)  # none: the stack prior draws slice 0
            if first_slices is None
            else first_slices[start : start + batch_size]
        )
        drawn = draw(
            tf.constant(len(chosen), tf.int32),
            tf.constant(num_slices, tf.int32),
            tf.constant(seed, tf.int32),
            tf.constant(chosen),
            tf.constant(temperature, tf.float32),
            tf.constant(start, tf.int32),
            _guidance_tensor(guidance),
            tf.constant(given),
        )
        stacks.append(drawn.numpy())
        if on_progress is not None:
            on_progress(start + len(chosen), num_stacks)
    return np.concatenate(stacks)


def check_first_prior(first_prior, prior, name: str = "first_prior") -> None:
    """Refuse a `first_prior` that cannot draw `prior`'s first slices (`sample_stacks`), in one
    line that starts with `name`."""
    if getattr(first_prior, "previous_slice", False):
        raise ValueError(
            f"{name} reads a previous slice: give a per-slice prior (the default config's)"
        )
    if tuple(first_prior.code_shape) != tuple(prior.code_shape) or (
        first_prior.num_embeddings != prior.num_embeddings
    ):
        raise ValueError(
            f"{name} draws {first_prior.num_embeddings} codes on "
            f"{tuple(first_prior.code_shape)} maps, the stack prior {prior.num_embeddings} on "
            f"{tuple(prior.code_shape)}: both must be priors of the same VQ-VAE"
        )
    if first_prior.conditional != prior.conditional:
        raise ValueError(f"{name} and the stack prior must both be conditional, or neither")


def load_first_prior(first_run, run_dir, vqvae_meta: dict, prior) -> tuple[PixelCNN, dict]:
    """The per-slice prior of the run `first_run` that draws the first slices of `run_dir`'s
    patients (`--first-slices`; `sample_stacks`' `first_prior`) and its metadata.

    Refused, in one line naming the option, unless it draws the codes of `run_dir`'s VQ-VAE
    (`vqvae_meta`) and can draw the first slices of `run_dir`'s `prior` (`check_first_prior`).
    """
    first_prior, first_meta = load_prior(Path(first_run))
    if first_meta.get("vqvae_fingerprint") != vqvae_meta["fingerprint"]:
        raise ValueError(
            f"--first-slices: the prior of {first_run} draws the codes of VQ-VAE "
            f"{first_meta.get('vqvae_fingerprint')}, {run_dir}'s VQ-VAE is "
            f"{vqvae_meta['fingerprint']}: both runs must share their VQ-VAE"
        )
    check_first_prior(first_prior, prior, f"--first-slices: the prior of {first_run}")
    return first_prior, first_meta


def _stack_sampler(prior, guided: bool = False):
    """`wavefront_stacks_graph` of `prior` traced once (any number of stacks and slices;
    `guided`: with guidance)."""
    cached = _STACK_SAMPLERS.get(prior, {}).get(guided)
    if cached is None:
        prior_ref = weakref.ref(prior)  # as in `_row_sampler`
        height, width = prior.code_shape
        scalar = tf.TensorSpec([], tf.int32)

        @tf.function(
            input_signature=[
                scalar,
                scalar,
                scalar,
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([], tf.float32),
                scalar,
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([None, height, width], tf.int32),
            ],
            autograph=False,
        )
        def draw(num_stacks, num_slices, seed, labels, temperature, first_stack, guidance, first):
            return wavefront_stacks_graph(
                prior_ref(),
                num_stacks,
                num_slices,
                seed,
                labels,
                temperature,
                height,
                width,
                first_stack=first_stack,
                guidance=guidance if guided else None,
                first_slices=first,
            )

        cached = _STACK_SAMPLERS.setdefault(prior, {})[guided] = draw
    return cached


def wavefront_stacks_graph(
    prior,
    num_stacks,
    num_slices,
    seed,
    labels,
    temperature,
    height: int,
    width: int,
    *,
    wavefront: bool = True,
    first_stack=0,
    guidance=None,
    first_slices=None,
):
    """`sample_stacks`' codes `int32 [num_stacks, num_slices, height, width]` drawn as a wavefront.

    Slice z's row r reads slice z - 1's rows <= r only (`SliceContext`), so every slice of a
    stack is drawn at once, slice z one row behind slice z - 1: `height + num_slices - 1` row
    steps instead of `num_slices * height` (a 20-slice stack of 32-row maps: 51 instead of
    640), each over all the stacks' slices as one batch of `N = num_stacks * num_slices` maps
    (map `z * num_stacks + i` is slice z of stack i). With `wavefront=False` the same engine
    draws slice after slice (slice z starts once slice z - 1 is done): the schedule of the
    reference, on the same shapes. `first_stack`: the index of stack 0 of these in a larger
    request drawn in batches (its seeds are those of that index, as `first_map`). `guidance`:
    None or a float32 w (`PixelCNNSteps`). `first_slices`: None or no maps (`[0, height,
    width]`, so that one traced function serves both): the prior draws slice 0 itself; else
    int32 `[num_stacks, height, width]`, the stacks' slice 0 drawn elsewhere (`sample_stacks`'
    `first_prior`), and slice 1 starts at step 0.

    The column steps run over all N maps (one op per step whatever the batch); the row steps
    over the maps that need them only, gathered and scattered back (at the start and end of a
    wavefront most maps idle): `finish_row` over the maps that drew a row, the slice context
    over the maps whose previous slice has drawn the row it needs.

    Each map runs the fast sampler's steps (`PixelCNNSteps`, with one row per map), its slice
    context is computed row by row as its previous slice's rows are drawn
    (`SliceContext.row`), and its codes are drawn with the seeds `sample_stacks` gives them: a
    map's arithmetic depends on its own inputs only, so both schedules, and `sample_stacks`
    slice after slice, draw the same codes.
    """
    num_stacks = tf.cast(num_stacks, tf.int32)
    num_slices = tf.cast(num_slices, tf.int32)
    total = num_stacks * num_slices
    slice_of = tf.range(total) // num_stacks
    stack_of = tf.range(total) % num_stacks + tf.cast(first_stack, tf.int32)
    labels = tf.broadcast_to(tf.cast(labels, tf.int32), tf.reshape(num_stacks, [1]))
    labels = tf.tile(labels, tf.reshape(num_slices, [1]))
    positions = tf.gather(position_bins_graph(num_slices, prior.slice_positions), slice_of)
    slice_seeds = tf.map_fn(
        lambda z: slice_seed(seed, z), tf.range(num_slices), fn_output_signature=tf.int32
    )
    seeds_of = tf.gather(slice_seeds, slice_of)
    start = slice_of * (1 if wavefront else height)  # the step each map draws its row 0
    codes = tf.zeros(tf.stack([total, height, width]), tf.int32)
    if first_slices is not None:
        given = tf.shape(first_slices)[0] > 0
        # Slice 0 is done before step 0 (it starts `height` steps early, drawing nothing), and
        # every later slice starts one slot earlier.
        start = tf.where(given, start - (1 if wavefront else height), start)
        start = tf.where(given & (slice_of == 0), -height, start)
        first = tf.pad(first_slices, [[0, total - tf.shape(first_slices)[0]], [0, 0], [0, 0]])
        codes = tf.where(given & (slice_of == 0)[:, None, None], first, codes)
    steps_total = tf.maximum(tf.reduce_max(start) + height, 0)
    steps = PixelCNNSteps(prior, labels, width, None, positions, guidance)
    context_layer = prior.slice_context
    dtype = context_layer.compute_dtype
    filters = context_layer.filters
    # Zero rows above; row 0's terms are set when a map starts (its context row 0 known).
    state = (steps.zero_rows(), steps.start_terms())
    context = tf.zeros(tf.stack([total, height + 1, width, filters]), dtype)
    cache = context_layer.start_rows(total, width, dtype)
    context_done = tf.zeros([total], tf.int32)  # context rows computed, per map
    has_previous = slice_of > 0
    previous_map = tf.maximum(tf.range(total) - num_stacks, 0)

    def drawn_rows(step):
        """Rows of each map drawn before `step`."""
        return tf.clip_by_value(step - start, 0, height)

    def update_context(step, codes, cache, context, context_done):
        """One more context row for each map whose previous slice has drawn that row."""
        row = tf.minimum(context_done, height - 1)
        previous_done = tf.gather(drawn_rows(step), previous_map)
        ready = (context_done < height) & (~has_previous | (previous_done > context_done))
        maps = tf.cast(tf.where(ready)[:, 0], tf.int32)  # the ready maps only, as in step_body

        def computed():
            row_of = tf.gather(row, maps)
            previous_codes = tf.gather(
                tf.gather(codes, tf.gather(previous_map, maps)), row_of, batch_dims=1
            )
            previous_row = tf.where(tf.gather(has_previous, maps)[:, None], previous_codes, -1)
            values, new_cache = context_layer.row(
                tuple(tf.gather(rows, maps) for rows in cache),
                previous_row,
                tf.gather(positions, maps),
            )
            new_cache = tuple(
                tf.tensor_scatter_nd_update(old, maps[:, None], new)
                for new, old in zip(new_cache, cache, strict=True)
            )
            rows = tf.stack([maps, row_of], axis=1)
            return new_cache, tf.tensor_scatter_nd_update(context, rows, values)

        # No map may be ready (the last steps); a convolution of no maps is not computed
        # (oneDNN's kernels mishandle an empty batch).
        cache, context = tf.cond(tf.size(maps) > 0, computed, lambda: (cache, context))
        return cache, context, context_done + tf.cast(ready, tf.int32)

    def step_body(step, codes, state, cache, context, context_done):
        rows = step - start
        active = (rows >= 0) & (rows < height)
        row = tf.clip_by_value(rows, 0, height - 1)
        vertical, terms = state
        starting = tf.equal(rows, 0)
        terms = tf.cond(  # row 0's terms of the maps that start now (once per slice)
            tf.reduce_any(starting),
            lambda: tf.where(
                steps.twice(starting)[:, None, None, None],
                steps.start_terms(steps.context_row(context, tf.zeros_like(row))),
                terms,
            ),
            lambda: terms,
        )
        state = (vertical, terms, context)

        drawing = tf.cast(tf.where(active)[:, 0], tf.int32)  # the maps that draw this row
        # Map m draws as `sample_codes` draws stack i of its slice in this row: the noise of
        # `row_noise(seeds_of[m], row[m], ...)` for map index `stack_of[m]`.
        drawing_seeds = tf.map_fn(
            lambda m: tf.random.experimental.stateless_fold_in(
                row_seed(seeds_of[m], row[m]), stack_of[m], alg="philox"
            ),
            drawing,
        )
        noise = gumbel_noise(drawing_seeds, width, prior.num_embeddings)  # [drawing, w, K]

        def draw_column(col, row_state, drawn):
            logits, row_state = steps.column(state, row_state, col)
            drawn_here = draw_codes(tf.gather(logits, drawing), noise[:, col], temperature)
            draws = tf.scatter_nd(drawing[:, None], drawn_here, [total])
            return col + 1, steps.push_code(row_state, draws, row, col), drawn.write(col, draws)

        _, _, drawn = tf.while_loop(
            lambda col, *_: col < width,
            draw_column,
            (tf.constant(0), steps.start_row(), tf.TensorArray(tf.int32, width)),
        )
        row_codes = tf.transpose(drawn.stack())  # [N, w]
        codes = tf.tensor_scatter_nd_update(
            codes,
            tf.stack([drawing, tf.gather(row, drawing)], axis=1),
            tf.gather(row_codes, drawing),
        )
        # The row slice z - 1 just drew is the context row slice z needs next: row r + 1 for
        # its finish_row now, row 0 for its start at the next step.
        cache, context, context_done = update_context(step + 1, codes, cache, context, context_done)
        # The vertical stacks of the maps that drew a row (a third of the maps idle at the
        # start and the end of a wavefront): gathered, moved on, scattered back. Every step
        # has a drawing map (slices start one step apart), so no empty batch here.
        computed = steps.computed_rows(drawing)  # twice under guidance
        drawn_state = (
            tuple(tf.gather(rows, computed) for rows in vertical),
            tf.gather(terms, computed),
            tf.gather(context, drawing),
        )
        new_vertical, new_terms, _ = steps.finish_row(
            drawn_state, tf.gather(row_codes, drawing), tf.gather(row, drawing), maps=drawing
        )
        vertical = tuple(
            tf.tensor_scatter_nd_update(old, computed[:, None], new)
            for new, old in zip(new_vertical, vertical, strict=True)
        )
        terms = tf.tensor_scatter_nd_update(terms, computed[:, None], new_terms)
        return step + 1, codes, (vertical, terms), cache, context, context_done

    # Context row 0 of the first slices (no previous slice); every later row comes after a
    # row is drawn, one per step.
    cache, context, context_done = update_context(0, codes, cache, context, context_done)
    _, codes, _, _, _, _ = tf.while_loop(
        lambda step, *_: step < steps_total,
        step_body,
        (tf.constant(0), codes, state, cache, context, context_done),
    )
    stacked = tf.reshape(codes, tf.stack([num_slices, num_stacks, height, width]))
    return tf.ensure_shape(tf.transpose(stacked, (1, 0, 2, 3)), [None, None, height, width])


def stacks_graph(
    prior,
    num_stacks,
    num_slices,
    seed,
    labels,
    temperature,
    height: int,
    width: int,
    method: str = DEFAULT_METHOD,
    guidance=None,
):
    """`sample_stacks` in the graph (a TF function body, e.g. a SavedModel signature): the
    wavefront (`method` "fast"), or slice after slice with `codes_graph` ("reference").

    `num_stacks`, `num_slices`, `seed` int32 scalars, `labels` one per stack or one for all,
    `temperature` float32: unchecked (see `sample_stacks`). Returns int32 `[num_stacks,
    num_slices, height, width]`, the codes of `sample_stacks` for the same arguments.
    """
    if method == "fast":
        return wavefront_stacks_graph(
            prior,
            num_stacks,
            num_slices,
            seed,
            labels,
            temperature,
            height,
            width,
            guidance=guidance,
        )
    num_stacks = tf.cast(num_stacks, tf.int32)
    num_slices = tf.cast(num_slices, tf.int32)
    bins = position_bins_graph(num_slices, prior.slice_positions)
    labels = tf.broadcast_to(tf.cast(labels, tf.int32), tf.reshape(num_stacks, [1]))
    blank = tf.fill(tf.stack([num_stacks, height, width]), -1)

    def one_slice(z, previous, drawn):
        codes = codes_graph(
            prior,
            num_stacks,
            slice_seed(seed, z),
            labels,
            temperature,
            height,
            width,
            method=method,
            previous=previous,
            positions=tf.fill(tf.reshape(num_stacks, [1]), bins[z]),
            guidance=guidance,
        )
        return z + 1, codes, drawn.write(z, codes)

    _, _, drawn = tf.while_loop(
        lambda z, *_: z < num_slices,
        one_slice,
        (tf.constant(0), blank, tf.TensorArray(tf.int32, num_slices)),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, height, width]),
            tf.TensorShape(None),
        ),
    )
    return tf.ensure_shape(tf.transpose(drawn.stack(), (1, 0, 2, 3)), [None, None, height, width])


def _decoder(vqvae, height: int, width: int):
    """`vqvae.decode` traced once for maps `[n, height, width]`, any n (one per model and shape:
    a generator decoding batch after batch, the last one smaller, traces it once)."""
    functions = _DECODERS.setdefault(vqvae, {})
    if (height, width) not in functions:
        model_ref = weakref.ref(vqvae)  # the function must not keep its model alive
        functions[(height, width)] = tf.function(
            lambda codes: model_ref().decode(codes),
            input_signature=[tf.TensorSpec([None, height, width], tf.int32)],
        )
    return functions[(height, width)]


def decode_codes(vqvae, codes, batch_size: int = 32) -> np.ndarray:
    """Images `[n, H, W, 1]` float32 in [0, 1] of code maps `[n, h, w]` (`vqvae.decode`).

    Zero code maps give zero images without running the decoder (on an empty batch oneDNN's
    `Conv2D` answers with a wrong shape: `keras_vqpix.data.pipeline.batch_sizes`).
    """
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [n, h, w]. Received: shape {codes.shape}")
    if len(codes) == 0:
        factor = vqvae.downsample_factor
        return np.zeros((0, codes.shape[1] * factor, codes.shape[2] * factor, 1), np.float32)
    decode = _decoder(vqvae, *codes.shape[1:])
    return np.concatenate(
        [
            decode(tf.constant(codes[i : i + batch_size])).numpy()
            for i in range(0, len(codes), batch_size)
        ]
    )


# -- vqpix sample ---------------------------------------------------------------------------------------
GRID_PER_LABEL = 64  # samples of each label shown in `grid.png` (8 rows of 8)


def sample_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_samples: int = 16,
    seed: int = 0,
    label: str | int | None = None,
    temperature: float = 1.0,
    *,
    on_row: Callable[[int, int], None] | None = None,
    slices_per_patient: int | None = None,
    guidance: float | None = None,
    first_slices_from: str | os.PathLike | None = None,
) -> int:
    """Sample `num_samples` slices from the run's prior into the new folder `out_dir`; the count written.

    With `slices_per_patient` S (`vqpix sample --patient`): `num_samples` whole patients of S
    consecutive slices (`sample_stacks`) instead, written as `patient_<i>_<label>.png` (the
    slices side by side, a strip), `patient_<i>_<label>.npy` (codes `[S, h, w]`) and a
    `grid.png` with one patient per row; `on_row` is then called with `(patients done,
    patients)`.

    Writes `sample_<i>_<label>.png` (8-bit grayscale), `sample_<i>_<label>.npy` (the code map,
    int32), `grid.png` (the first `GRID_PER_LABEL` of each label) and `samples.json` (seed, temperature, labels, which models), all into a
    temporary folder renamed to `out_dir` at the end. A non-empty `out_dir` is refused.

    Args:
        label: None (conditional prior: half NC, half AD; unconditional prior: unconditional),
            "NC"/"AD" (any case), 0/1, or -1 (unconditional, conditional priors too).
        on_row: progress callback, as in `sample_codes_reference`.
        guidance: None, or w >= 0: classifier-free guidance (`sample_codes`).
        first_slices_from: with `slices_per_patient`, None or a run of the same VQ-VAE whose
            per-slice prior draws each patient's first slice (`load_first_prior`).
    """
    from PIL import Image

    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    guidance = check_guidance(guidance)
    out_dir = check_output_folder(out_dir)
    paths = RunPaths(Path(run_dir))
    vqvae, _, vqvae_meta = load_vqvae(paths.root)
    prior, prior_meta = load_prior(paths.root, vqvae_meta)
    if label is not None and label != UNCONDITIONAL and not prior.conditional:
        raise ValueError(
            f"--label: the prior of {paths.root} is unconditional (trained without labels); omit --label"
        )
    labels = resolve_labels(prior, num_samples, label)
    if first_slices_from is not None and slices_per_patient is None:
        raise ValueError("--first-slices applies to --patient only")
    if slices_per_patient is not None:
        if not getattr(prior, "previous_slice", False):
            raise ValueError(
                f"--patient: the prior of {paths.root} does not read the previous slice (a run "
                "of the default config draws single slices only); train a run with --config "
                "patients"
            )
        return _sample_patients(
            paths,
            out_dir,
            prior,
            vqvae,
            (prior_meta, vqvae_meta),
            labels,
            (seed, temperature, guidance),
            slices_per_patient,
            on_row,
            None
            if first_slices_from is None
            else load_first_prior(first_slices_from, paths.root, vqvae_meta, prior),
        )
    codes = sample_codes(
        prior, num_samples, seed, labels, temperature, on_row=on_row, guidance=guidance
    )
    digits = max(3, len(str(num_samples - 1)))
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        names = []
        shown = {value: [] for value in sorted(set(labels.tolist()))}  # the grid's images
        # Decoded and written a batch at a time: memory does not grow with num_samples.
        for start in range(0, num_samples, SAMPLE_BATCH_SIZE):
            batch = slice(start, start + SAMPLE_BATCH_SIZE)
            images = decode_codes(vqvae, codes[batch])
            for i, code_map, image, value in zip(
                range(start, start + len(images)), codes[batch], images, labels[batch], strict=True
            ):
                stem = f"sample_{i:0{digits}d}_{label_name(int(value))}"
                pixels = np.round(np.clip(image[..., 0], 0.0, 1.0) * 255.0).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp / f"{stem}.png")
                np.save(tmp / f"{stem}.npy", code_map.astype(np.int32))
                names.append(stem)
                if len(shown[int(value)]) < GRID_PER_LABEL:
                    shown[int(value)].append(image)
        rows = []
        for value, chosen in shown.items():
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
            "guidance": guidance,
            "labels": [label_name(int(v)) for v in labels],
            "files": names,
            "prior_epoch": prior_meta.get("epoch"),
            "prior_fingerprint": prior_meta.get("fingerprint"),
            "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
        }
        (tmp / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    return num_samples


PATIENT_GRID_ROWS = 8  # patients shown in a `vqpix sample --patient` grid


def _sample_patients(
    paths, out_dir, prior, vqvae, metas, labels, drawing, num_slices, on_progress, first=None
) -> int:
    """`sample_run` of whole patients (`slices_per_patient`); `drawing`: (seed, temperature,
    guidance); `first`: None, or `(first_prior, its metadata)` (`load_first_prior`)."""
    from PIL import Image

    seed, temperature, guidance = drawing
    num_slices = check_num_slices(num_slices)
    stacks = sample_stacks(
        prior,
        len(labels),
        num_slices,
        seed,
        labels,
        temperature,
        on_progress=on_progress,
        guidance=guidance,
        first_prior=None if first is None else first[0],
    )
    digits = max(3, len(str(len(labels) - 1)))
    prior_meta, vqvae_meta = metas
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        names, rows = [], []
        for i, (stack, value) in enumerate(zip(stacks, labels, strict=True)):
            stem = f"patient_{i:0{digits}d}_{label_name(int(value))}"
            images = decode_codes(vqvae, stack)
            strip = np.concatenate(list(images[..., 0]), axis=1)  # the slices side by side
            pixels = np.round(np.clip(strip, 0.0, 1.0) * 255.0).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp / f"{stem}.png")
            np.save(tmp / f"{stem}.npy", stack.astype(np.int32))
            names.append(stem)
            if len(rows) < PATIENT_GRID_ROWS:
                rows.append((f"{i}: {label_name(int(value))}", images))
        plots.plot_image_rows(
            rows,
            tmp / "grid.png",
            f"{len(labels)} synthetic patients of {num_slices} slices, seed {seed}, "
            f"temperature {temperature:g}",
            column_titles=[f"slice {z}" for z in range(num_slices)],
        )
        record = {
            "run": str(paths.root.resolve()),
            "num_patients": len(labels),
            "slices_per_patient": num_slices,
            "seed": seed,
            "temperature": temperature,
            "guidance": guidance,
            "labels": [label_name(int(v)) for v in labels],
            "files": names,
            "prior_epoch": prior_meta.get("epoch"),
            "prior_fingerprint": prior_meta.get("fingerprint"),
            "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
            "first_slices_prior_fingerprint": None if first is None else first[1]["fingerprint"],
        }
        (tmp / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    return len(labels)
