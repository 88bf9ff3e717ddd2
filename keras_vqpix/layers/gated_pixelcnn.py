"""Gated PixelCNN layer (van den Oord et al. 2016, https://arxiv.org/abs/1606.05328)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from keras_vqpix.layers.masked_conv import MASK_TYPES, MaskedConv2D


def down_shift(inputs):
    """Move `[B, H, W, C]` down by one row (row 0 becomes zeros): row i then holds row i - 1."""
    return ops.pad(inputs, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]


def gate(inputs):
    """Gated activation unit `tanh(a) * sigmoid(b)` of `[..., 2p]` split into halves a, b."""
    a, b = ops.split(inputs, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


@keras.saving.register_keras_serializable(package="keras_vqpix")
class GatedBlock(layers.Layer):
    """One layer of the Gated PixelCNN: a vertical and a horizontal stack with gated units.

    Section 2.2 and figure 2 of the paper. With p = `filters` and k = `kernel_size`:

    - **Vertical stack**: a `(k//2 + 1) x k` convolution padded above and on the sides, so its
      output at row i reads rows `i - k//2 .. i` of its input (all columns of the window).
      Stacked, it sees every row above and the current one, never a blind spot. It never reads
      the horizontal stack. With `dilation` d it is dilated by d in both axes (as WaveNet's
      causal convolutions, https://arxiv.org/abs/1609.03499): it reads rows `i - d (k//2)
      .. i` in steps of d and columns `j - d (k//2) .. j + d (k//2)`. Blocks dilated 1, 2, 4,
      ... in turn still see every row above and every column within reach (no gap), and the
      receptive field grows with the *sum* of the dilations instead of the number of blocks:
      a prior that sees the whole map at the cost of one that sees its neighbourhood.
    - **Vertical to horizontal**: its pre-activations are shifted *down* one row
      (`down_shift`) and added to the horizontal stack through a 1x1 convolution, so the
      horizontal stack at row i only receives rows strictly above i: no leak of the current
      row's later pixels.
    - **Horizontal stack**: a `1 x k` `MaskedConv2D` reading columns left of the current pixel
      (mask "A", the first layer, which reads the codes themselves) or left of and at it (mask
      "B"); then a 1x1 convolution, added to the block's input as a residual (mask "B" only: a
      residual of the raw input in the first layer would leak the current code).
    - **Gates**: `tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h)` on both stacks, where `h`
      is a learnt embedding of the class label (`num_labels` rows), added inside every gate.
    - **Skip**: a 1x1 convolution of the horizontal gate output, summed over blocks by the model.
    - **Spatial condition** (`spatial_condition=True`): a map `s [B, H, W, F]` that does not
      depend on this map's codes (the conditional PixelCNN's `V * s` of section 2.3 with a
      spatial `s`; here the context of the previous slice of a stack, `PixelCNN`) enters both
      gates through 1x1 convolutions: `s` at `(i, j)` is added at `(i, j)`. It carries no code of
      the map being drawn, so the masks keep the model causal.

    Shapes: `vertical [B, H, W, C]`, `horizontal [B, H, W, C]`, `labels [B]` int in
    `[0, num_labels)` -> `(vertical [B, H, W, p], horizontal [B, H, W, p], skip [B, H, W, p])`;
    e.g. `[16, 32, 32, 64]` stacks stay `[16, 32, 32, 64]`, the gates compute `[16, 32, 32, 128]`.

    Args:
        filters: int, channels p of both stacks.
        kernel_size: int, odd k >= 3.
        mask_type: "A" for the first layer, "B" after.
        num_labels: int, rows of the label embeddings; 0 for an unconditional block (labels
            are then ignored).
        dilation: int >= 1, dilation of the vertical stack (rows and columns).
        spatial_condition: bool, take a spatial condition map `condition [B, H, W, F]`.

    Example:
    >>> block = GatedBlock(16, 3, "A", num_labels=3)
    >>> x = keras.ops.zeros((2, 8, 8, 4))
    >>> [t.shape for t in block(x, x, keras.ops.array([0, 2]))]
    [TensorShape([2, 8, 8, 16]), TensorShape([2, 8, 8, 16]), TensorShape([2, 8, 8, 16])]
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        mask_type: str = "B",
        num_labels: int = 0,
        dilation: int = 1,
        spatial_condition: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(filters, (int, np.integer)) or filters < 1:
            raise ValueError(f"filters must be a positive int. Received: filters={filters}")
        if (
            not isinstance(kernel_size, (int, np.integer))
            or kernel_size < 3
            or kernel_size % 2 == 0
        ):
            raise ValueError(
                f"kernel_size must be an odd int >= 3. Received: kernel_size={kernel_size}"
            )
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be 'A' or 'B'. Received: mask_type={mask_type!r}")
        if not isinstance(num_labels, (int, np.integer)) or num_labels < 0:
            raise ValueError(f"num_labels must be an int >= 0. Received: num_labels={num_labels}")
        if not isinstance(dilation, (int, np.integer)) or dilation < 1:
            raise ValueError(f"dilation must be an int >= 1. Received: dilation={dilation}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.mask_type = mask_type
        self.num_labels = int(num_labels)
        self.dilation = int(dilation)
        self.spatial_condition = bool(spatial_condition)
        policy = self.dtype_policy
        k, p = self.kernel_size, self.filters
        self.vertical_conv = layers.Conv2D(
            2 * p, (k // 2 + 1, k), dilation_rate=self.dilation, name="vertical", dtype=policy
        )
        self.horizontal_conv = MaskedConv2D(
            2 * p, (1, k), mask_type, name="horizontal", dtype=policy
        )
        self.vertical_to_horizontal = layers.Conv2D(
            2 * p, 1, name="vertical_to_horizontal", dtype=policy
        )
        self.horizontal_output = layers.Conv2D(p, 1, name="horizontal_output", dtype=policy)
        self.skip = layers.Conv2D(p, 1, name="skip", dtype=policy)
        if self.num_labels:
            self.vertical_label = layers.Embedding(
                self.num_labels, 2 * p, name="vertical_label", dtype=policy
            )
            self.horizontal_label = layers.Embedding(
                self.num_labels, 2 * p, name="horizontal_label", dtype=policy
            )

        if self.spatial_condition:
            self.vertical_condition = layers.Conv2D(
                2 * p, 1, name="vertical_condition", dtype=policy
            )
            self.horizontal_condition = layers.Conv2D(
                2 * p, 1, name="horizontal_condition", dtype=policy
            )

    def build(self, vertical_shape, horizontal_shape, labels_shape=None, condition_shape=None):
        if self.mask_type == "B" and horizontal_shape[-1] != self.filters:
            raise ValueError(
                f"A mask 'B' block adds a residual: the horizontal input needs {self.filters} channels. "
                f"Received: horizontal_shape={horizontal_shape}"
            )
        reach = self.vertical_reach
        batch, height, width = vertical_shape[:3]
        padded = (
            batch,
            None if height is None else height + reach,
            None if width is None else width + 2 * reach,
        )
        self.vertical_conv.build((*padded, vertical_shape[-1]))
        self.horizontal_conv.build(horizontal_shape)
        gates = (*vertical_shape[:3], 2 * self.filters)
        self.vertical_to_horizontal.build(gates)
        self.horizontal_output.build((*vertical_shape[:3], self.filters))
        self.skip.build((*vertical_shape[:3], self.filters))
        if self.num_labels:
            self.vertical_label.build((batch,))
            self.horizontal_label.build((batch,))
        if self.spatial_condition:
            if condition_shape is None:
                raise ValueError("A block with spatial_condition=True needs a condition_shape")
            self.vertical_condition.build(condition_shape)
            self.horizontal_condition.build(condition_shape)

    @property
    def vertical_reach(self) -> int:
        """How far the vertical stack reads: `dilation * (k // 2)` rows above, columns each side."""
        return self.dilation * (self.kernel_size // 2)

    def call(self, vertical, horizontal, labels=None, condition=None):
        reach = self.vertical_reach
        padded = ops.pad(vertical, [[0, 0], [reach, 0], [reach, reach], [0, 0]])
        vertical_pre = self.vertical_conv(padded)
        conditioned = self.num_labels and labels is not None
        if conditioned:
            vertical_pre = vertical_pre + self.vertical_label(labels)[:, None, None, :]
        spatial = self.spatial_condition and condition is not None
        if spatial:
            vertical_pre = vertical_pre + self.vertical_condition(condition)
        horizontal_pre = self.horizontal_conv(horizontal) + self.vertical_to_horizontal(
            down_shift(vertical_pre)
        )
        if conditioned:
            horizontal_pre = horizontal_pre + self.horizontal_label(labels)[:, None, None, :]
        if spatial:
            horizontal_pre = horizontal_pre + self.horizontal_condition(condition)
        vertical_out = gate(vertical_pre)
        horizontal_gated = gate(horizontal_pre)
        horizontal_out = self.horizontal_output(horizontal_gated)
        if self.mask_type == "B":
            horizontal_out = horizontal + horizontal_out
        return vertical_out, horizontal_out, self.skip(horizontal_gated)

    def compute_output_shape(
        self, vertical_shape, horizontal_shape, labels_shape=None, condition_shape=None
    ):
        shape = (*vertical_shape[:3], self.filters)
        return shape, shape, shape

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "mask_type": self.mask_type,
            "num_labels": self.num_labels,
            "dilation": self.dilation,
            "spatial_condition": self.spatial_condition,
        }
