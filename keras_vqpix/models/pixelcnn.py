"""Gated PixelCNN prior over VQ-VAE code maps (van den Oord et al. 2016, https://arxiv.org/abs/1606.05328)."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from keras_vqpix.config import PriorConfig
from keras_vqpix.layers.causal_attention import CausalSelfAttention
from keras_vqpix.layers.gated_pixelcnn import GatedBlock
from keras_vqpix.layers.layout_context import LayoutContext
from keras_vqpix.layers.slice_context import SliceContext
from keras_vqpix.models.distributed import DistributedFitMixin
from keras_vqpix.replicas import all_reduce_sum, global_mean, global_rows, sync_context

LN2 = math.log(2.0)
# The defaults of `PixelCNN`'s arguments: those of the run config (one source). But for
# `position_embedding`, False here: it needs a `code_shape`, which only a run knows.
_DEFAULTS = PriorConfig()


@keras.saving.register_keras_serializable(package="keras_vqpix")
class PixelCNN(DistributedFitMixin, keras.Model):
    """Autoregressive prior `p(codes | label) = prod_(i,j) p(c_ij | c_<ij, label)` in raster order.

    `codes [B, h, w]` int32 in `[0, K)` -> code embedding `[B, h, w, E]` -> one `GatedBlock`
    with mask "A" and `num_layers` with mask "B" (vertical and horizontal stacks, gates,
    residuals) -> sum of the blocks' skip outputs and the last horizontal stack -> ReLU, 1x1 conv,
    ReLU, dropout, 1x1 conv ->
    `logits [B, h, w, K]` float32 (also under mixed precision). E.g. 32x32 code maps with
    K = 256 give logits `[B, 32, 32, 256]`; the logits at `(i, j)` depend on the codes before
    `(i, j)` in raster order only, with no blind spot, within a receptive field of
    `receptive_rows` rows above (and as many columns to each side) and `(num_layers + 1) *
    (k // 2)` columns to the left in row i.

    Receptive field: block i's vertical stack is dilated by `2 ** (i % dilation_cycle)`
    (`GatedBlock`), so `receptive_rows` is one (the horizontal stack reads the vertical one a
    row down) plus `(k // 2)` times the sum of the dilations: with `dilation_cycle=1` (no
    dilation) 10 blocks of k = 3 see 11 rows above, with `dilation_cycle=4` (dilations 1, 2,
    4, 8, 1, 2, 4, 8, 1, 2) 34 rows, a whole 32x32 map, for the same weights and arithmetic.

    Position: with `position_embedding` (and a `code_shape`), a learnt embedding of each code
    position `(i, j)` is added to the code embedding there. The network is convolutional and
    otherwise knows where it is only near the map's edges (through the zero padding); brain
    slices are centred, so where a code sits says much about it (background near the edges,
    the head's outline in between). It depends on the position alone, never on the codes, so
    it leaks nothing: the logits at `(i, j)` still see only the codes before it, with their
    positions.

    Conditioning: a conditional prior (`conditional=True`) learns `num_classes + 1` label
    embeddings per gate: labels `0 .. num_classes - 1` (NC = 0, AD = 1) and one extra
    "unconditional" label, used for `label = -1` (or `labels=None`). Training replaces each
    map's label by the unconditional one with probability `label_dropout`, so the same model
    also learns `p(codes)` (as in classifier-free guidance). An unconditional prior
    (`conditional=False`) has no label embeddings and ignores labels.

    Slice context (issue 18, synthetic patients): with `previous_slice`, the prior also reads
    the code map of the previous slice of the same stack (`previous [B, h, w]`, -1: none), and
    with `slice_positions` P > 0 the slice's position bin in its stack (`positions [B]`,
    `0 .. P - 1`, -1: unknown); a `SliceContext` turns them into a spatial condition of every
    gate. `p(stack) = p(slice_0 | position_0) prod_z p(slice_z | slice_(z-1), position_z)`:
    a patient is drawn slice after slice. Training pairs each map with its patient's previous
    slice, replaced by "none" with probability `previous_dropout` (so the same prior draws
    first slices and single slices), and the position by "unknown" with probability
    `label_dropout`. The context reads no code of the map being drawn: causality is unchanged.

    Attention (issue 14): with `attention_every` a > 0, a `CausalSelfAttention` over the whole
    map (PixelSNAIL, Chen et al. 2018) adds its update to the horizontal stack after blocks
    a - 1, 2a - 1, ...: the logits at `(i, j)` then read every earlier code directly, by
    content and position, not only through the chain of convolutions. The horizontal stack at
    a position depends on the codes before it only, so the attention may read the position
    itself: causality is unchanged (tested at every position). It needs a `code_shape` (it
    learns an embedding per position) and no `previous_slice`.

    Loss: sparse categorical cross-entropy of the codes under the logits (nats per code);
    metrics `loss` and `bits_per_code` (= loss / ln 2), both per code position.

    Args:
        num_embeddings: int, K, the VQ-VAE codebook size.
        num_layers: int, mask "B" blocks after the first (mask "A") block.
        filters: int, channels of both stacks.
        kernel_size: int, odd k >= 3.
        embedding_dim: int, E, size of the input code embedding.
        conditional: bool, learn label embeddings.
        num_classes: int, labels `0 .. num_classes - 1` of a conditional prior.
        label_dropout: float in [0, 1), training probability of the unconditional label.
        dropout: float in [0, 1), dropout before the output layer.
        dilation_cycle: int >= 1, block i's vertical stack is dilated by
            `2 ** (i % dilation_cycle)`; 1: no dilation.
        code_shape: (h, w) or None, the code map size the prior was trained on (what samplers
            draw; without a position embedding the network is fully convolutional).
        position_embedding: bool, learn an embedding per code position (needs `code_shape`;
            the prior then takes `code_shape` maps only).
        seed: int or None, seed of label dropout and dropout.
        previous_slice: bool, condition on the previous slice's code map.
        slice_positions: int >= 0, position bins of a slice in its stack; 0: none.
        previous_dropout: float in [0, 1), training probability of "no previous slice".
        layout_levels: int, 0: no layout; L >= 2: condition on a coarse layout of the slice
            (`layout [B, h / f, w / f]` in `[0, L)`, `LayoutContext`), given in full before
            any code is drawn (the bottom level of a two-level hierarchy, as in VQ-VAE-2).
        layout_upsample: int >= 1, f, code positions per layout cell along each axis.
        attention_every: int >= 0, attention after every `attention_every`-th block; 0: none.
        attention_dim: int, channels of the attention's queries, keys and values.
        attention_heads: int, attention heads (dividing `attention_dim`).

    Defaults are those of `keras_vqpix.config.PriorConfig` (the one place they are written), but
    `position_embedding`: False here, as it needs a `code_shape`. `PixelCNN.from_run_config`
    builds the prior of a run config.

    Example:
    >>> prior = PixelCNN(num_embeddings=16, num_layers=2, filters=8, embedding_dim=4)
    >>> prior(keras.ops.zeros((2, 8, 8), "int32"), keras.ops.array([0, 1])).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(
        self,
        num_embeddings: int,
        num_layers: int = _DEFAULTS.num_layers,
        filters: int = _DEFAULTS.filters,
        kernel_size: int = _DEFAULTS.kernel_size,
        embedding_dim: int = _DEFAULTS.embedding_dim,
        conditional: bool = _DEFAULTS.conditional,
        num_classes: int = _DEFAULTS.num_classes,
        label_dropout: float = _DEFAULTS.label_dropout,
        dropout: float = _DEFAULTS.dropout,
        code_shape=None,
        seed: int | None = None,
        position_embedding: bool = False,
        # Not the config's default (4): a prior saved before dilation existed has no
        # dilation_cycle in its config and must load undilated.
        dilation_cycle: int = 1,
        previous_slice: bool = _DEFAULTS.previous_slice,
        # Not the config's default (20), for the same reason: a prior saved before slice
        # positions existed must load without them.
        slice_positions: int = 0,
        previous_dropout: float = _DEFAULTS.previous_dropout,
        layout_levels: int = 0,
        layout_upsample: int = 1,
        # Not the config's default, for the same reason: a prior saved before attention
        # existed must load without it.
        attention_every: int = 0,
        attention_dim: int = _DEFAULTS.attention_dim,
        attention_heads: int = _DEFAULTS.attention_heads,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks = (
            (
                num_embeddings >= 2,
                f"num_embeddings must be >= 2. Received: num_embeddings={num_embeddings}",
            ),
            (num_layers >= 0, f"num_layers must be >= 0. Received: num_layers={num_layers}"),
            (
                embedding_dim >= 1,
                f"embedding_dim must be >= 1. Received: embedding_dim={embedding_dim}",
            ),
            (num_classes >= 1, f"num_classes must be >= 1. Received: num_classes={num_classes}"),
            (
                0.0 <= label_dropout < 1.0,
                f"label_dropout must be in [0, 1). Received: label_dropout={label_dropout}",
            ),
            (0.0 <= dropout < 1.0, f"dropout must be in [0, 1). Received: dropout={dropout}"),
            (
                dilation_cycle >= 1,
                f"dilation_cycle must be >= 1. Received: dilation_cycle={dilation_cycle}",
            ),
            (
                slice_positions >= 0,
                f"slice_positions must be >= 0. Received: slice_positions={slice_positions}",
            ),
            (
                0.0 <= previous_dropout < 1.0,
                f"previous_dropout must be in [0, 1). Received: previous_dropout={previous_dropout}",
            ),
            (
                attention_every >= 0,
                f"attention_every must be >= 0. Received: attention_every={attention_every}",
            ),
            (
                not attention_every or (code_shape is not None and not previous_slice),
                "attention_every needs a code_shape (h, w) and previous_slice off. Received: "
                f"code_shape={code_shape}, previous_slice={previous_slice}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if code_shape is not None:
            code_shape = tuple(int(s) for s in code_shape)
            if len(code_shape) != 2 or min(code_shape) < 1:
                raise ValueError(
                    f"code_shape must be (h, w) with h, w >= 1. Received: code_shape={code_shape}"
                )
        if position_embedding and code_shape is None:
            raise ValueError("position_embedding=True needs a code_shape (h, w)")
        if layout_levels:
            if layout_levels < 2 or layout_upsample < 1:
                raise ValueError(
                    "layout_levels must be 0 or >= 2 and layout_upsample >= 1. Received: "
                    f"layout_levels={layout_levels}, layout_upsample={layout_upsample}"
                )
            if code_shape is None or any(s % layout_upsample for s in code_shape):
                raise ValueError(
                    f"A layout prior needs a code_shape divisible by layout_upsample "
                    f"({layout_upsample}). Received: code_shape={code_shape}"
                )
            if previous_slice or slice_positions:
                raise ValueError("A prior reads a layout or a slice context, not both")
        self.num_embeddings = int(num_embeddings)
        self.position_embedding = bool(position_embedding)
        self.num_layers = int(num_layers)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.embedding_dim = int(embedding_dim)
        self.conditional = bool(conditional)
        self.num_classes = int(num_classes)
        self.label_dropout = float(label_dropout)
        self.dropout = float(dropout)
        self.dilation_cycle = int(dilation_cycle)
        self.code_shape = code_shape
        self.seed = seed
        self.previous_slice = bool(previous_slice)
        self.slice_positions = int(slice_positions)
        self.previous_dropout = float(previous_dropout)
        self.layout_levels = int(layout_levels)
        self.layout_upsample = int(layout_upsample)
        self.attention_every = int(attention_every)
        self.attention_dim = int(attention_dim)
        self.attention_heads = int(attention_heads)
        policy = self.dtype_policy
        self.layout_context = (
            LayoutContext(
                self.layout_levels,
                filters,
                self.layout_upsample,
                name="layout_context",
                dtype=policy,
            )
            if self.layout_levels
            else None
        )
        self.slice_context = (
            SliceContext(
                num_embeddings,
                filters,
                previous_slice=self.previous_slice,
                num_positions=self.slice_positions,
                name="slice_context",
                dtype=policy,
            )
            if self.has_slice_context
            else None
        )
        num_labels = self.num_classes + 1 if self.conditional else 0
        self.code_embedding = layers.Embedding(
            num_embeddings, embedding_dim, name="code_embedding", dtype=policy
        )
        self.blocks = [
            GatedBlock(
                filters,
                kernel_size,
                "A" if i == 0 else "B",
                num_labels,
                dilation=2 ** (i % self.dilation_cycle),
                spatial_condition=self.has_slice_context or bool(self.layout_levels),
                name=f"gated_{i}",
                dtype=policy,
            )
            for i in range(num_layers + 1)
        ]
        # Block i is followed by attention when (i + 1) is a multiple of attention_every.
        self.attentions = [
            CausalSelfAttention(
                self.attention_dim, self.attention_heads, name=f"attention_{i}", dtype=policy
            )
            if self.attention_every and (i + 1) % self.attention_every == 0
            else None
            for i in range(num_layers + 1)
        ]
        self.head_hidden = layers.Conv2D(filters, 1, name="head_hidden", dtype=policy)
        self.head_dropout = layers.Dropout(dropout, seed=seed, name="head_dropout", dtype=policy)
        # Logits stay float32 under mixed precision: the loss and the sampler read them.
        self.head_logits = layers.Conv2D(num_embeddings, 1, name="head_logits", dtype="float32")
        self.label_seed = keras.random.SeedGenerator(seed, name="label_dropout_seed")
        if self.has_slice_context:
            self.context_seed = keras.random.SeedGenerator(
                None if seed is None else seed + 1, name="context_dropout_seed"
            )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.bits_tracker = keras.metrics.Mean(name="bits_per_code")

    @classmethod
    def from_run_config(
        cls, config: PriorConfig, num_embeddings: int, code_shape=None, seed: int | None = None
    ) -> PixelCNN:
        """Build from a `keras_vqpix.config.PriorConfig` (every field but the training recipe)
        for a codebook of `num_embeddings`."""
        return cls(
            num_embeddings=num_embeddings,
            code_shape=code_shape,
            seed=seed,
            **config.model_arguments(),
        )

    @property
    def has_slice_context(self) -> bool:
        """Whether the prior reads a slice context (the previous slice or a position)."""
        return self.previous_slice or self.slice_positions > 0

    @property
    def receptive_rows(self) -> int:
        """Rows above a position whose codes its logits can read (as many columns each side)."""
        return 1 + sum(block.vertical_reach for block in self.blocks)

    def build(self, codes_shape, labels_shape=None):
        batch = codes_shape[0]
        self.code_embedding.build(codes_shape)
        if self.position_embedding:
            self.positions = self.add_weight(
                shape=(*self.code_shape, self.embedding_dim),
                initializer=keras.initializers.RandomNormal(stddev=0.05, seed=self.seed),
                name="position_embedding",
            )
        features = (*codes_shape[:3], self.embedding_dim)
        condition = None
        if self.has_slice_context:
            self.slice_context.build(tuple(codes_shape[:3]), (batch,))
            condition = (*codes_shape[:3], self.filters)
        if self.layout_levels:
            self.layout_context.build(self.layout_shape(batch))
            condition = (*codes_shape[:3], self.filters)
        for block, attention in zip(self.blocks, self.attentions, strict=True):
            block.build(features, features, (batch,) if self.conditional else None, condition)
            features = (*codes_shape[:3], self.filters)
            if attention is not None:
                attention.build(features)
        self.head_hidden.build(features)
        self.head_logits.build(features)
        self.built = True

    def layout_shape(self, batch=None):
        """`(batch, lh, lw)`: the layout a layout prior reads (`code_shape` / `layout_upsample`)."""
        height, width = self.code_shape
        return (batch, height // self.layout_upsample, width // self.layout_upsample)

    def label_indices(self, labels, batch_size):
        """Rows of the label embeddings: `labels` with -1 (and None) mapped to the unconditional row."""
        if labels is None:
            return ops.full((batch_size,), self.num_classes, dtype="int32")
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        return ops.where(labels < 0, self.num_classes, labels)

    def call(self, codes, labels=None, previous=None, positions=None, layout=None, training=False):
        """`codes [B, h, w]` int, `labels [B]` int (-1: unconditional) -> `logits [B, h, w, K]`.

        With a slice context: `previous [B, h, w]` the previous slice's codes (-1 or None:
        none) and `positions [B]` the slice's position bins (-1 or None: unknown). A layout
        prior: `layout [B, lh, lw]`, the slice's layout (`LayoutContext`).
        """
        condition = self.context(codes, previous, positions, layout)
        return self.logits_from_embeddings(self.embed(codes), labels, training, condition)

    def context_inputs(self, codes, previous=None, positions=None):
        """`(previous [B, h, w], positions [B])` int32, with -1 for what is not given."""
        shape = ops.shape(codes)
        previous = (
            ops.full(shape[:3], -1, dtype="int32")
            if previous is None
            else ops.cast(previous, "int32")
        )
        positions = (
            ops.full(shape[:1], -1, dtype="int32")
            if positions is None
            else ops.reshape(ops.cast(positions, "int32"), (-1,))
        )
        return previous, positions

    def context(self, codes, previous=None, positions=None, layout=None):
        """The spatial condition `[B, h, w, filters]` of the slice context or the layout (a
        layout prior: `layout [B, lh, lw]`), or None without either."""
        if self.layout_levels:
            if layout is None:
                raise ValueError(f"A layout prior needs a layout {self.layout_shape()[1:]}")
            return self.layout_context(layout)
        if not self.has_slice_context:
            return None
        return self.slice_context(*self.context_inputs(codes, previous, positions))

    def embed(self, codes, row=None, col=None):
        """The first block's input: the code embedding, plus the position embedding if any.

        `codes [B, h, w]` (a whole map); or `codes [B, w]` with `row` (one row of the map), or
        `codes [B]` with `row` and `col` (one position): what `PixelCNNSteps` embeds. `row` is
        one row for every map, or one per map `[B]` (a stack drawn as a wavefront, each slice
        at its own row).
        """
        embedded = self.code_embedding(ops.cast(codes, "int32"))
        if not self.position_embedding:
            return embedded
        positions = self.positions
        if row is not None:
            positions = ops.take(positions, row, axis=0)  # [w, E], or [B, w, E]
            if col is not None:
                positions = ops.take(positions, col, axis=-2)  # [E], or [B, E]
        return embedded + ops.cast(positions, embedded.dtype)

    def logits_from_embeddings(self, embedded, labels=None, training=False, condition=None):
        """The network after the code embedding: `[B, h, w, E]` -> `logits [B, h, w, K]`.

        `condition`: the slice context's map (`context`), or None.

        Public so that tests can differentiate the logits with respect to the embedded codes.
        """
        label_rows = (
            self.label_indices(labels, ops.shape(embedded)[0]) if self.conditional else None
        )
        vertical = horizontal = embedded
        skips = None
        for block, attention in zip(self.blocks, self.attentions, strict=True):
            vertical, horizontal, skip = block(vertical, horizontal, label_rows, condition)
            skips = skip if skips is None else skips + skip
            if attention is not None:  # the vertical stack never reads it: causal
                horizontal = horizontal + attention(horizontal)
        # The head reads the skip sum and the last horizontal stack (so every weight is used).
        hidden = ops.relu(self.head_hidden(ops.relu(skips + horizontal)))
        return self.head_logits(self.head_dropout(hidden, training=training))

    # -- Training ---------------------------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, self.bits_tracker]

    def code_loss(self, codes, logits):
        """Mean cross-entropy in nats per code position.

        Under `tf.distribute`, this replica's share of the global batch's mean (see
        `keras_vqpix.replicas`): the replicas' gradients add up to the global batch's.
        """
        return global_mean(
            keras.losses.sparse_categorical_crossentropy(
                ops.cast(codes, "int32"), logits, from_logits=True
            )
        )

    def _unpack(self, data):
        """`(codes, labels, previous, positions, layout)` of a batch `codes`, `(codes,
        labels)`, `(codes, labels, previous, positions)` or `(codes, labels, layout)` (a layout
        prior); None for what the batch lacks."""
        data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        if self.layout_levels:
            codes, labels, layout = data
            return codes, labels, None, None, layout
        return data + (None,) * (5 - len(data))

    def _update_metrics(self, loss):
        # The global batch's loss on every replica (the shares' sum), counted once per replica.
        loss = all_reduce_sum(loss)
        self.loss_tracker.update_state(loss)
        self.bits_tracker.update_state(loss / LN2)
        return self.step_logs(
            {"loss": self.loss_tracker.result(), "bits_per_code": self.bits_tracker.result()}
        )

    def train_step(self, data):
        codes, labels, previous, positions, layout = self._unpack(data)
        if self.conditional and labels is not None and self.label_dropout > 0:
            labels = ops.cast(labels, "int32")
            labels = ops.where(
                self._label_draws(ops.shape(labels)[0]) < self.label_dropout, -1, labels
            )
        if self.has_slice_context:
            previous, positions = self._drop_context(codes, previous, positions)
        with tf.GradientTape() as tape:
            # This replica's share of the global batch's loss: the replicas' gradients, which
            # the optimizer sums, add up to the global batch's. A loss-scale optimizer (float16)
            # scales it further.
            logits = self(codes, labels, previous, positions, layout, training=True)
            loss = self.code_loss(codes, logits)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
        return self._update_metrics(loss)

    def _drop_context(self, codes, previous, positions):
        """The training context: "no previous slice" with probability `previous_dropout` and
        "unknown position" with probability `label_dropout`, per map."""
        previous, positions = self.context_inputs(codes, previous, positions)
        draws = self._label_draws(ops.shape(codes)[0], self.context_seed, columns=2)
        previous = ops.where(draws[:, 0, None, None] < self.previous_dropout, -1, previous)
        positions = ops.where(draws[:, 1] < self.label_dropout, -1, positions)
        return previous, positions

    def _label_draws(self, num_rows, seed=None, columns=None):
        """Uniform draws deciding label (or context) dropout, one per map of this replica's slice
        (`[num_rows]`, or `[num_rows, columns]`).

        Drawn for the whole global batch and sliced, so that under `tf.distribute` every map
        gets the draw it would get on a single device.
        """
        offset, total = global_rows(num_rows)
        shape = (total,) if columns is None else (total, columns)
        draws = keras.random.uniform(shape, seed=self.label_seed if seed is None else seed)
        if sync_context() is None:
            return draws
        begin = [offset] if columns is None else [offset, 0]
        return tf.slice(draws, begin, [num_rows] if columns is None else [num_rows, columns])

    def test_step(self, data):
        codes, labels, previous, positions, layout = self._unpack(data)
        logits = self(codes, labels, previous, positions, layout, training=False)
        return self._update_metrics(self.code_loss(codes, logits))

    def get_config(self):
        return {
            **super().get_config(),
            "num_embeddings": self.num_embeddings,
            "num_layers": self.num_layers,
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "embedding_dim": self.embedding_dim,
            "conditional": self.conditional,
            "num_classes": self.num_classes,
            "label_dropout": self.label_dropout,
            "dropout": self.dropout,
            "code_shape": None if self.code_shape is None else list(self.code_shape),
            "seed": self.seed,
            "position_embedding": self.position_embedding,
            "dilation_cycle": self.dilation_cycle,
            "previous_slice": self.previous_slice,
            "slice_positions": self.slice_positions,
            "previous_dropout": self.previous_dropout,
            "layout_levels": self.layout_levels,
            "layout_upsample": self.layout_upsample,
            "attention_every": self.attention_every,
            "attention_dim": self.attention_dim,
            "attention_heads": self.attention_heads,
        }


def max_bits_per_code(num_embeddings: int) -> float:
    """`log2(K)`: the bits per code of a uniform prior (what a prior must beat)."""
    return float(np.log2(num_embeddings))


def bits_per_code(
    prior,
    codes: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int = 64,
    *,
    previous: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> float:
    """Mean cross-entropy of `codes [N, h, w]` under `prior`, in bits per code.

    Args:
        prior: a `PixelCNN` (or any `(codes, labels) -> logits [n, h, w, K]` callable).
        codes: int code maps.
        labels: `[N]` int, one per map; None: every map unconditional (label -1).
        batch_size: maps per forward pass (the batches are taken in order, so the figure is
            the same however it is called).
        previous, positions: a slice-context prior's context (`PixelCNN.call`): the previous
            slice's codes `[N, h, w]` (-1: none) and position bins `[N]` (-1: unknown); None:
            none and unknown. Ignored by a prior without a slice context.
    """
    codes = np.asarray(codes, np.int32)
    labels = np.full(len(codes), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    previous = (
        np.full(codes.shape, -1, np.int32) if previous is None else np.asarray(previous, np.int32)
    )
    positions = (
        np.full(len(codes), -1, np.int32) if positions is None else np.asarray(positions, np.int32)
    )
    with_context = getattr(prior, "has_slice_context", False)

    # One trace for every batch (the last one is smaller), the shape fixed by the signature.
    @tf.function(
        input_signature=[
            tf.TensorSpec((None, *codes.shape[1:]), tf.int32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None, *codes.shape[1:]), tf.int32),
            tf.TensorSpec((None,), tf.int32),
        ]
    )
    def batch_nats(batch_codes, batch_labels, batch_previous, batch_positions):
        if with_context:
            logits = prior(batch_codes, batch_labels, batch_previous, batch_positions)
        else:
            logits = prior(batch_codes, batch_labels, training=False)
        return tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(batch_codes, logits, from_logits=True)
        )

    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch = slice(start, start + batch_size)
        total += float(
            batch_nats(
                tf.constant(codes[batch]),
                tf.constant(labels[batch]),
                tf.constant(previous[batch]),
                tf.constant(positions[batch]),
            )
        )
    return total / (codes.size * LN2)


def split_bits_per_code(
    prior, codes: np.ndarray, labels: np.ndarray, records, batch_size: int = 64
) -> dict[str, float]:
    """`{"bits_per_code": ...}` of a split's code maps (`records`' order) as the prior models them.

    A prior without slice context: `bits_per_code` of the maps. A slice-context prior
    (`has_slice_context`): the likelihood of the split's patients as the stacks they are, each
    slice given its patient's previous slice and its position bin
    (`keras_vqpix.data.stacks.stack_context`), and `bits_per_code_single_slice`, each slice on
    its own with its position known (comparable with a prior without slice context).
    """
    from keras_vqpix.data.stacks import stack_context

    if not getattr(prior, "has_slice_context", False):
        return {"bits_per_code": bits_per_code(prior, codes, labels, batch_size)}
    previous_index, positions = stack_context(records, prior.slice_positions)
    previous = np.where(
        (previous_index >= 0)[:, None, None], codes[np.maximum(previous_index, 0)], -1
    )
    if not prior.previous_slice:
        previous = None
    return {
        "bits_per_code": bits_per_code(
            prior, codes, labels, batch_size, previous=previous, positions=positions
        ),
        "bits_per_code_single_slice": bits_per_code(
            prior, codes, labels, batch_size, positions=positions
        ),
    }
