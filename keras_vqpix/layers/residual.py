"""Residual blocks of the VQ-VAE encoder and decoder (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937)."""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="keras_vqpix")
class ResidualBlock(layers.Layer):
    """`x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`, the block of the VQ-VAE paper (section 4.1).

    The 3x3 convolution narrows to `residual_channels`, the 1x1 one widens back, so the block
    is cheap and keeps the input's shape.

    Args:
        residual_channels: int, channels of the bottleneck.

    Input shape: `[B, H, W, C]`. Output shape: `[B, H, W, C]`.

    Example:
    >>> ResidualBlock(8)(keras.ops.zeros((2, 16, 16, 32))).shape
    TensorShape([2, 16, 16, 32])
    """

    def __init__(self, residual_channels: int, **kwargs):
        super().__init__(**kwargs)
        if residual_channels < 1:
            raise ValueError(
                f"residual_channels must be >= 1. Received: residual_channels={residual_channels}"
            )
        self.residual_channels = int(residual_channels)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.conv3 = layers.Conv2D(
            self.residual_channels, 3, padding="same", name="conv3x3", dtype=self.dtype_policy
        )
        self.conv1 = layers.Conv2D(channels, 1, name="conv1x1", dtype=self.dtype_policy)
        self.conv3.build(input_shape)
        self.conv1.build((*input_shape[:-1], self.residual_channels))

    def call(self, inputs):
        # With two or more blocks TensorFlow 2.21's Grappler logs "remapper failed: ... fanout
        # '.../Relu' exist for missing node '.../residual_0_1/add'": on oneDNN CPUs its remapper
        # fuses a block's 1x1 convolution, bias, skip add and the next block's ReLU into one op,
        # though the add also feeds the next block's skip connection, and then rejects its own
        # graph. The remapper's rewrite of that function is dropped as a whole (graph dumps:
        # no _FusedConv2D left); oneDNN still fuses every convolution with its bias. Results are
        # unchanged; the cost measured on the default VQ-VAE (one thread, CPU time, in
        # alternation, two runs) is 3-4% of an encode and 2-3% of a forward pass. Writing this
        # ReLU as `maximum(x, 0)` avoids the bug but makes a training step 2-4% slower
        # (Maximum's gradient), so the graph stays as it is and the CLI hides the message.
        hidden = self.conv3(ops.relu(inputs))
        return inputs + self.conv1(ops.relu(hidden))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "residual_channels": self.residual_channels}
