"""Causal self-attention over a code map in raster order (PixelSNAIL, Chen et al. 2018, https://arxiv.org/abs/1712.09763).

A Gated PixelCNN reaches a far position only through a chain of convolutions; attention reads
every earlier position in one step, by content and position (e.g. the mirror image of a code
across the brain's midline, drawn earlier in the same row). The prior adds it to its
horizontal stack (`PixelCNN(attention_every=...)`), which at a position depends on the codes
before it only: a position may then attend to itself and every earlier position, and the
logits stay causal.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers, ops


@keras.saving.register_keras_serializable(package="keras_vqpix")
class CausalSelfAttention(layers.Layer):
    """`features [B, h, w, C]` -> the attention's update `[B, h, w, C]` (the caller adds it).

    Position `t = i * w + j` attends to positions `s <= t`: queries and keys are linear maps of
    the features plus a learnt embedding of each position, values a linear map of the features;
    `num_heads` heads of `key_dim / num_heads` channels, softmax of the scaled dot products, and
    a linear map back to C channels.

    `step(features [n, C], cache)`: the same update at the next position of a map drawn in
    raster order, from a cache of the keys and values of the positions before
    (`start_cache`): what a sampler computes per position (`PixelCNNSteps`). The cache always
    holds every position (those not reached yet are zeros, masked out), so every step has the
    same operation shapes.

    Args:
        key_dim: int, channels of the queries, keys and values (all heads).
        num_heads: int, heads; must divide `key_dim`.
    """

    def __init__(self, key_dim: int, num_heads: int = 1, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1 or key_dim < 1 or key_dim % num_heads:
            raise ValueError(
                "CausalSelfAttention needs num_heads >= 1 dividing key_dim >= 1. Received: "
                f"key_dim={key_dim}, num_heads={num_heads}"
            )
        self.key_dim = int(key_dim)
        self.num_heads = int(num_heads)

    def build(self, features_shape):
        height, width, channels = features_shape[1:]
        self.num_positions = int(height) * int(width)
        self.position = self.add_weight(
            shape=(self.num_positions, channels),
            initializer=keras.initializers.RandomNormal(stddev=0.05),
            name="position",
        )
        self.query_key = self.add_weight(
            shape=(channels, 2 * self.key_dim), initializer="glorot_uniform", name="query_key"
        )
        self.query_key_bias = self.add_weight(
            shape=(2 * self.key_dim,), initializer="zeros", name="query_key_bias"
        )
        self.value = self.add_weight(
            shape=(channels, self.key_dim), initializer="glorot_uniform", name="value"
        )
        self.value_bias = self.add_weight(
            shape=(self.key_dim,), initializer="zeros", name="value_bias"
        )
        self.output_kernel = self.add_weight(
            shape=(self.key_dim, channels), initializer="glorot_uniform", name="output"
        )
        self.output_bias = self.add_weight(
            shape=(channels,), initializer="zeros", name="output_bias"
        )
        self.built = True

    def _heads(self, x):
        """`[..., key_dim]` -> `[..., heads, key_dim / heads]`."""
        shape = ops.shape(x)
        return ops.reshape(x, (*shape[:-1], self.num_heads, self.key_dim // self.num_heads))

    def _project(self, features, position):
        """Queries, keys and values of `features [..., C]` at `position [..., C]`."""
        dtype = features.dtype
        query_key = ops.matmul(
            features + ops.cast(position, dtype), ops.cast(self.query_key, dtype)
        ) + ops.cast(self.query_key_bias, dtype)
        query, key = ops.split(query_key, 2, axis=-1)
        value = ops.matmul(features, ops.cast(self.value, dtype)) + ops.cast(self.value_bias, dtype)
        return query, key, value

    def _attend(self, query, keys, values, visible):
        """Heads of `query [..., T?, heads, d]` over `keys`, `values [B, T, heads, d]`, with
        `visible` (bool, broadcast to the scores `[B, heads, T?, T]`) -> `[..., key_dim]`."""
        scale = 1.0 / math.sqrt(self.key_dim // self.num_heads)
        scores = ops.einsum("bthd,bshd->bhts", query, keys) * ops.cast(scale, query.dtype)
        scores = ops.where(visible, scores, ops.cast(float("-inf"), scores.dtype))
        weights = ops.softmax(scores, axis=-1)
        attended = ops.einsum("bhts,bshd->bthd", weights, values)
        shape = ops.shape(attended)
        attended = ops.reshape(attended, (*shape[:-2], self.key_dim))
        dtype = attended.dtype
        return ops.matmul(attended, ops.cast(self.output_kernel, dtype)) + ops.cast(
            self.output_bias, dtype
        )

    def call(self, features):
        shape = ops.shape(features)
        flat = ops.reshape(features, (shape[0], self.num_positions, shape[-1]))
        query, key, value = self._project(flat, self.position[None])
        positions = ops.arange(self.num_positions)
        visible = positions[None, :] <= positions[:, None]  # [t, s]: s at or before t
        update = self._attend(self._heads(query), self._heads(key), self._heads(value), visible)
        return ops.reshape(update, shape)

    # -- Sampling, one position at a time -----------------------------------------------------------
    def start_cache(self, num_maps, dtype):
        """`(t, keys, values)`: no position drawn yet (`t = 0`), zero keys and values `[n, T,
        key_dim]`."""
        zeros = tf.zeros((num_maps, self.num_positions, self.key_dim), dtype)
        return tf.constant(0), zeros, zeros

    def step(self, features, cache):
        """`(update [n, C], cache)` at position `t` of the cache, `features [n, C]` there; the
        cache moves on to `t + 1`."""
        t, keys, values = cache
        query, key, value = self._project(features, tf.gather(self.position, t))
        num_maps = tf.shape(features)[0]
        at = tf.stack([tf.range(num_maps), tf.fill([num_maps], t)], axis=1)
        keys = tf.tensor_scatter_nd_update(keys, at, key)
        values = tf.tensor_scatter_nd_update(values, at, value)
        visible = (tf.range(self.num_positions) <= t)[None, None, None, :]
        update = self._attend(
            self._heads(query[:, None]), self._heads(keys), self._heads(values), visible
        )
        return update[:, 0], (t + 1, keys, values)

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim, "num_heads": self.num_heads}
