"""Context of a slice in its stack: the previous slice's code map and the slice's position.

A brain volume is a stack of slices, and slice z looks much like slice z - 1. A prior that
draws slice z's code map conditioned on slice z - 1's (and on where z sits in the stack) draws
a whole patient slice after slice (the 2-D counterpart of the 3-D priors of Tudosiu et al. 2022,
https://arxiv.org/abs/2209.03177). This layer turns that context into a spatial condition map
for `GatedBlock` (the conditional PixelCNN's spatial `s`, van den Oord et al. 2016,
https://arxiv.org/abs/1606.05328, section 2.3).
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="keras_vqpix")
class SliceContext(layers.Layer):
    """`(previous [B, h, w], positions [B]) -> context [B, h, w, F]`, row r reading previous rows <= r.

    - `previous`: the previous slice's codes in `[0, K)`, or -1 everywhere for "no previous
      slice" (the first slice of a stack, or a slice drawn on its own): a learnt embedding of
      the K codes and of "none" (row K).
    - `positions`: the slice's position bin in its stack, `[0, num_positions)`, or -1 for
      unknown (row `num_positions` of a learnt embedding), added everywhere.
    - Two `2 x 3` convolutions padded above and on the sides, with ReLUs and a residual sum:
      the context at `(r, c)` reads the previous map's rows `r - 2 .. r`, columns `c - 2 ..
      c + 2`. Never a row below r: so a stack can be drawn as a wavefront, row r of slice z
      right after row r of slice z - 1, and `row` computes the context one row at a time
      from a cache (what the samplers use), the same function as `call`.

    Args:
        num_embeddings: int, K, the codebook size.
        filters: int, F, channels of the context.
        previous_slice: bool, read the previous slice's codes (else only the position).
        num_positions: int >= 0, position bins; 0: no position.
    """

    def __init__(
        self,
        num_embeddings: int,
        filters: int,
        previous_slice: bool = True,
        num_positions: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not previous_slice and num_positions < 1:
            raise ValueError("SliceContext needs previous_slice=True or num_positions >= 1")
        self.num_embeddings = int(num_embeddings)
        self.filters = int(filters)
        self.previous_slice = bool(previous_slice)
        self.num_positions = int(num_positions)
        policy = self.dtype_policy
        if self.previous_slice:
            self.previous_embedding = layers.Embedding(
                self.num_embeddings + 1, self.filters, name="previous_embedding", dtype=policy
            )
        if self.num_positions:
            self.position_embedding = layers.Embedding(
                self.num_positions + 1, self.filters, name="slice_position_embedding", dtype=policy
            )
        self.first_conv = layers.Conv2D(self.filters, (2, 3), name="first", dtype=policy)
        self.second_conv = layers.Conv2D(self.filters, (2, 3), name="second", dtype=policy)

    def build(self, previous_shape, positions_shape=None):
        batch = previous_shape[0]
        if self.previous_slice:
            self.previous_embedding.build(previous_shape)
        if self.num_positions:
            self.position_embedding.build((batch,))
        width = previous_shape[2]
        padded = (batch, None, None if width is None else width + 2, self.filters)
        self.first_conv.build(padded)
        self.second_conv.build(padded)
        self.built = True

    def _embed(self, previous, positions):
        """`previous [B, ..., w]` -> embeddings `[B, ..., w, F]` of the codes and the position."""
        previous = ops.cast(previous, "int32")
        terms = []
        if self.previous_slice:
            terms.append(
                self.previous_embedding(ops.where(previous < 0, self.num_embeddings, previous))
            )
        if self.num_positions:
            positions = ops.cast(ops.reshape(positions, (-1,)), "int32")
            rows = ops.where(positions < 0, self.num_positions, positions)
            embedded = self.position_embedding(rows)
            shape = (-1, *([1] * (len(previous.shape) - 1)), self.filters)
            embedded = ops.reshape(embedded, shape)
            terms.append(embedded * ops.ones((*ops.shape(previous), 1), embedded.dtype))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @staticmethod
    def _pad(x, top):
        return ops.pad(x, [[0, 0], [top, 0], [1, 1], [0, 0]])

    def call(self, previous, positions):
        embedded = self._embed(previous, positions)
        first = ops.relu(self.first_conv(self._pad(embedded, 1)))
        return first + ops.relu(self.second_conv(self._pad(first, 1)))

    # -- One row at a time ------------------------------------------------------------------------
    def start_rows(self, num_maps, width: int, dtype):
        """The cache before row 0: the zero rows above the map (`call`'s padding)."""
        zeros = ops.zeros((num_maps, 1, width, self.filters), dtype)
        return zeros, zeros

    def row(self, cache, previous_row, positions):
        """`(context of the row [n, w, F], cache)` from the previous map's row `[n, w]`.

        `cache` holds the row above's embedding and first convolution, as `start_rows` makes.
        """
        embedded_above, first_above = cache
        embedded = ops.cast(self._embed(previous_row[:, None], positions), embedded_above.dtype)
        window = ops.concatenate([embedded_above, embedded], axis=1)
        first = ops.relu(self.first_conv(self._pad(window, 0)))
        window = ops.concatenate([first_above, first], axis=1)
        second = ops.relu(self.second_conv(self._pad(window, 0)))
        return (first + second)[:, 0], (embedded, first)

    def get_config(self):
        return {
            **super().get_config(),
            "num_embeddings": self.num_embeddings,
            "filters": self.filters,
            "previous_slice": self.previous_slice,
            "num_positions": self.num_positions,
        }
