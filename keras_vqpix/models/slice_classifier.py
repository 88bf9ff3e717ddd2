"""A small in-domain CNN that scores brain slices, the judge of `vqpix compare`.

No pretrained ImageNet or medical weights can be used here, and ImageNet features judge MRI
poorly (Kynkaanniemi et al. 2023, https://arxiv.org/abs/2203.06026, on the limits of
Inception features), so `vqpix compare` trains this network from scratch for each question:
real vs synthetic (a classifier two-sample test, Lopez-Paz & Oquab 2017,
https://arxiv.org/abs/1610.06545), AD vs NC on real slices (TRTR), on synthetic ones (TSTR,
the classification accuracy score of Ravuri & Vinyals 2019, https://arxiv.org/abs/1905.10887),
and on both. Its pooled features are the space of the Frechet and kernel distances.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="keras_vqpix")
class SliceClassifier(keras.Model):
    """Strided 3x3 convolutions, global average pooling and one logit per slice.

    Each block is a 3x3 convolution with stride 2 and a ReLU, so a `[B, 128, 128, 1]` batch
    shrinks to `[B, 64, 64, w0]`, `[B, 32, 32, w1]`, ... `[B, 8, 8, w3]` for four blocks,
    then pools to `features` `[B, w3]` and a dense layer gives one logit `[B]` (the score of
    class 1). About 60 k weights with the default widths: cheap enough to train a few dozen
    times on 2 CPU cores (`keras_vqpix.compare`), small enough not to memorise 1,600 slices in
    a few epochs. `vqpix compare` trains it with `CompareConfig`'s budget
    (`keras_vqpix.compare.train_slice_classifier`); it is a plain Keras model otherwise.

    Args:
        widths: tuple of int, output channels of the strided blocks.
        dropout: float, dropout rate on the pooled features while training.

    Input shape:
        `[B, H, W, 1]` float32 in [0, 1], any H and W of at least `2 ** len(widths)`.

    Output shape:
        `[B]` float32 logits.

    Example:

    >>> model = SliceClassifier(widths=(8, 16))
    >>> tuple(model(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2,)
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive ints. Received: widths={widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        self.widths = widths
        self.dropout_rate = float(dropout)
        self.blocks = [
            layers.Conv2D(w, 3, strides=2, padding="same", activation="relu", name=f"block{i}")
            for i, w in enumerate(widths)
        ]
        self.pool = layers.GlobalAveragePooling2D(name="pool")
        self.dropout = layers.Dropout(self.dropout_rate, name="dropout")
        self.head = layers.Dense(1, name="logit")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)
        self.head.build((shape[0], self.widths[-1]))
        super().build(input_shape)

    def features(self, images):
        """`[B, H, W, 1]` -> pooled features `[B, widths[-1]]` (the FD / KID space)."""
        x = images
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    def call(self, images, training=False):
        x = self.dropout(self.features(images), training=training)
        return ops.squeeze(self.head(x), axis=-1)

    def get_config(self):
        return {**super().get_config(), "widths": self.widths, "dropout": self.dropout_rate}
