"""A coarse layout of the whole slice as a spatial condition of the prior (a two-level hierarchy).

VQ-VAE-2 (Razavi et al. 2019, https://arxiv.org/abs/1906.00446) draws a coarse top-level map
first, whose prior sees the whole image and sets its layout, then the fine map conditioned on
all of it. Here the top level is a coarse *layout* of the slice: its mean brightness on a grid
(e.g. 16 x 16 cells), quantized to a few levels (`benchmarks/prior_ablation.py`), drawn by a
small prior of its own; the code-map prior reads the whole layout through this layer. The
layout is given in full before any code is drawn, so this condition may read every cell (no
mask): the code prior stays causal in its own codes.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="keras_vqpix")
class LayoutContext(layers.Layer):
    """`layout [B, lh, lw]` int in `[0, L)` -> condition `[B, lh * f, lw * f, F]` (f = `upsample`).

    A learnt embedding of the L levels, two 3x3 convolutions with ReLUs and a residual sum at
    the layout's resolution (each cell reads its neighbours), then each cell repeated over the
    `f x f` code positions it covers and a 3x3 convolution at the code map's resolution.

    Args:
        num_levels: int, L, the layout's levels.
        filters: int, F, channels of the condition.
        upsample: int >= 1, code positions per layout cell along each axis.
    """

    def __init__(self, num_levels: int, filters: int, upsample: int, **kwargs):
        super().__init__(**kwargs)
        if num_levels < 2 or filters < 1 or upsample < 1:
            raise ValueError(
                "LayoutContext needs num_levels >= 2, filters >= 1 and upsample >= 1. Received: "
                f"num_levels={num_levels}, filters={filters}, upsample={upsample}"
            )
        self.num_levels = int(num_levels)
        self.filters = int(filters)
        self.upsample = int(upsample)
        policy = self.dtype_policy
        self.level_embedding = layers.Embedding(
            self.num_levels, self.filters, name="level_embedding", dtype=policy
        )
        self.first_conv = layers.Conv2D(self.filters, 3, padding="same", name="first", dtype=policy)
        self.second_conv = layers.Conv2D(
            self.filters, 3, padding="same", name="second", dtype=policy
        )
        self.fine_conv = layers.Conv2D(self.filters, 3, padding="same", name="fine", dtype=policy)

    def build(self, layout_shape):
        self.level_embedding.build(layout_shape)
        features = (*layout_shape[:3], self.filters)
        self.first_conv.build(features)
        self.second_conv.build(features)
        self.fine_conv.build(features)
        self.built = True

    def call(self, layout):
        embedded = self.level_embedding(ops.cast(layout, "int32"))
        first = ops.relu(self.first_conv(embedded))
        coarse = first + ops.relu(self.second_conv(first))
        fine = ops.repeat(ops.repeat(coarse, self.upsample, axis=1), self.upsample, axis=2)
        return fine + ops.relu(self.fine_conv(fine))

    def get_config(self):
        return {
            **super().get_config(),
            "num_levels": self.num_levels,
            "filters": self.filters,
            "upsample": self.upsample,
        }
