"""Masked convolution of PixelCNN (van den Oord et al. 2016, https://arxiv.org/abs/1601.06759)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

MASK_TYPES = ("A", "B")


def _kernel_size(kernel_size) -> tuple[int, int]:
    size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(size) != 2 or not all(
        isinstance(k, (int, np.integer)) and k >= 1 and k % 2 == 1 for k in size
    ):
        raise ValueError(
            f"kernel_size must be an odd positive int or a pair of them. Received: kernel_size={kernel_size}"
        )
    return int(size[0]), int(size[1])


def causal_mask(kernel_size, mask_type: str) -> np.ndarray:
    """The PixelCNN mask of a `[kh, kw]` kernel (both odd), as float32 `[kh, kw, 1, 1]`.

    Ones strictly above the centre row and left of the centre in the centre row; the centre
    itself is one for mask "B" and zero for mask "A". A 1 x k kernel therefore gets the mask
    of the Gated PixelCNN's horizontal stack.

    >>> causal_mask(3, "A")[..., 0, 0]
    array([[1., 1., 1.],
           [1., 0., 0.],
           [0., 0., 0.]], dtype=float32)
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be 'A' or 'B'. Received: mask_type={mask_type!r}")
    height, width = _kernel_size(kernel_size)
    mask = np.zeros((height, width, 1, 1), np.float32)
    mask[: height // 2] = 1.0
    mask[height // 2, : width // 2 + (mask_type == "B")] = 1.0
    return mask


@keras.saving.register_keras_serializable(package="keras_vqpix")
class MaskedConv2D(layers.Layer):
    """A stride-1 "same" 2-D convolution whose kernel only sees earlier pixels in raster order.

    The output at `(i, j)` reads inputs strictly above row `i`, and left of column `j` in row
    `i`; mask "A" (the first layer, which reads the data itself) excludes `(i, j)`, mask "B"
    (later layers, which read features already computed from earlier pixels) includes it. See
    `causal_mask`. The mask is a non-trainable weight (saved with the model, not baked into the
    graph as a constant) multiplied with the kernel in every call, so the masked taps get no
    gradient and stay out of the function whatever the optimizer does.

    Stacking k x k masked layers leaves a blind spot above-right of each pixel (section 2 of
    https://arxiv.org/abs/1606.05328); the Gated PixelCNN (`GatedBlock`) uses this layer for
    its 1 x k horizontal stack only.

    Args:
        filters: int, output channels.
        kernel_size: int or (int, int), odd kernel height and width.
        mask_type: "A" (excludes the centre) or "B" (includes it).
        use_bias: bool.
        kernel_initializer, bias_initializer: Keras initializers.

    Input shape: `[B, H, W, C]`. Output shape: `[B, H, W, filters]`.

    Example:
    >>> MaskedConv2D(8, 3, "A")(keras.ops.zeros((2, 6, 6, 4))).shape
    TensorShape([2, 6, 6, 8])
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        mask_type: str = "B",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(filters, (int, np.integer)) or filters < 1:
            raise ValueError(f"filters must be a positive int. Received: filters={filters}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be 'A' or 'B'. Received: mask_type={mask_type!r}")
        self.filters = int(filters)
        self.kernel_size = _kernel_size(kernel_size)
        self.mask_type = mask_type
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"The channel axis of the input must be known. Received: input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, channels, self.filters),
            initializer=self.kernel_initializer,
        )
        mask = causal_mask(self.kernel_size, self.mask_type)
        self.mask = self.add_weight(
            name="mask",
            shape=mask.shape,
            initializer=lambda shape, dtype=None: ops.cast(mask, dtype or "float32"),
            trainable=False,
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)
            if self.use_bias
            else None
        )

    def call(self, inputs):
        outputs = ops.conv(inputs, self.kernel * self.mask, strides=1, padding="same")
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "mask_type": self.mask_type,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
