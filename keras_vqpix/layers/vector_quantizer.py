"""Vector quantization layers of the VQ-VAE (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937)."""

from __future__ import annotations

import keras
from keras import ops

from keras_vqpix.replicas import all_reduce_sum, global_mean, global_rows, sync_context


class _BaseVectorQuantizer(keras.layers.Layer):
    """Shared logic: nearest-code assignment, one-hot look-up, losses, usage and restarts."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        dead_code_steps: int = 0,
        seed: int | None = None,
        **kwargs,
    ):
        # Distances and the codebook stay float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_embeddings < 2:
            raise ValueError(
                f"num_embeddings must be >= 2. Received: num_embeddings={num_embeddings}"
            )
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1. Received: embedding_dim={embedding_dim}")
        if commitment_cost < 0:
            raise ValueError(
                f"commitment_cost must be >= 0. Received: commitment_cost={commitment_cost}"
            )
        if dead_code_steps < 0:
            raise ValueError(
                f"dead_code_steps must be >= 0. Received: dead_code_steps={dead_code_steps}"
            )
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.dead_code_steps = int(dead_code_steps)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(
                f"The last axis of the input must equal embedding_dim={self.embedding_dim}. "
                f"Received: input_shape={input_shape}"
            )
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_embeddings, self.embedding_dim),
            initializer=keras.initializers.VarianceScaling(distribution="uniform"),
            trainable=self._codebook_trainable,
            # Written in a replica context only by the EMA update and dead-code restarts, where
            # every replica computes the same value from all-reduced statistics: the first
            # replica's write is every replica's, with no reduction (on several machines, each
            # one's first local replica: the same value). The optimizer applies the all-reduced
            # gradient to every copy of a trainable codebook, whatever this setting.
            aggregation="only_first_replica",
        )
        # Training steps since each code was last assigned, for dead-code restarts. Codes start
        # out dead, so the first training batch initialises every code it does not use from
        # encoder outputs (a data-dependent initialisation: no code starts far from the data).
        self.steps_since_used = self.add_weight(
            name="steps_since_used",
            shape=(self.num_embeddings,),
            initializer=keras.initializers.Constant(max(self.dead_code_steps - 1, 0)),
            trainable=False,
            aggregation="only_first_replica",
        )

    # -- The one distance / look-up helper every variant shares. -------------------------------
    def _encode_flat(self, flat_inputs):
        """Nearest code of each row of `flat_inputs` [N, D]: (indices [N], one_hot [N, K])."""
        distances = (
            ops.sum(ops.square(flat_inputs), axis=1, keepdims=True)
            - 2.0 * ops.matmul(flat_inputs, ops.transpose(self.embeddings))
            + ops.sum(ops.square(self.embeddings), axis=1)[None, :]
        )
        indices = ops.argmin(distances, axis=1)
        return indices, ops.one_hot(indices, self.num_embeddings, dtype=flat_inputs.dtype)

    def lookup(self, encoding_indices):
        """Code vectors of `encoding_indices` [...] -> [..., D], for decoding and sampling.

        (Sonnet calls this `quantize`; Keras 3 layers already own a `quantize` method, for
        int8 weight quantization, so it is not overridden here.)

        A dense one-hot matmul, not a gather: a gather hands the optimiser sparse
        `IndexedSlices` gradients, with which Adam's moments drift for unused codes.
        """
        one_hot = ops.one_hot(
            ops.cast(encoding_indices, "int32"), self.num_embeddings, dtype=self.embeddings.dtype
        )
        return ops.matmul(one_hot, self.embeddings)

    def call(self, inputs, training=False):
        """Quantize `inputs` [..., D].

        Under `tf.distribute` the batch is the global batch (every replica's slice): code counts,
        perplexity, codes used and the codebook updates are computed from statistics summed over
        the replicas, and `loss` is this replica's share of the global batch's mean
        (`keras_vqpix.replicas.global_mean`; the shares sum to it).

        Returns:
            dict with `quantize` (straight-through, same shape as inputs), `loss` (scalar VQ
            loss), `perplexity` (scalar, exp of the entropy of code usage in the batch),
            `codes_used` (scalar, distinct codes in the batch) and `encoding_indices`
            (int32, inputs' shape without the last axis).
        """
        inputs = ops.cast(inputs, "float32")
        input_shape = ops.shape(inputs)
        flat_inputs = ops.reshape(inputs, (-1, self.embedding_dim))
        indices, one_hot = self._encode_flat(flat_inputs)
        quantized = ops.reshape(ops.matmul(one_hot, self.embeddings), input_shape)
        loss = self._loss(inputs, quantized)

        counts = all_reduce_sum(ops.sum(one_hot, axis=0))
        if training:
            self._update_codebook(flat_inputs, one_hot, counts)
            if self.dead_code_steps:
                self._restart_dead_codes(flat_inputs, counts)

        probabilities = counts / ops.maximum(ops.sum(counts), 1.0)
        perplexity = ops.exp(-ops.sum(probabilities * ops.log(probabilities + 1e-10)))
        codes_used = ops.sum(ops.cast(counts > 0, "float32"))
        # Straight-through estimator: the forward pass sees the codes, the backward pass copies
        # the decoder's gradient to the encoder output unchanged.
        quantized_st = inputs + ops.stop_gradient(quantized - inputs)
        return {
            "quantize": quantized_st,
            "loss": loss,
            "perplexity": perplexity,
            "codes_used": codes_used,
            "encoding_indices": ops.cast(ops.reshape(indices, input_shape[:-1]), "int32"),
        }

    def _restart_dead_codes(self, flat_inputs, counts):
        """Re-initialise codes unused for `dead_code_steps` steps from encoder outputs.

        Candidates are rows of the current batch, so a restarted code lands where the encoder
        actually puts its outputs; see `_candidates` for the batch under `tf.distribute`.
        """
        steps = ops.where(counts > 0, 0.0, self.steps_since_used + 1.0)
        dead = steps >= float(self.dead_code_steps)
        self._reset_codes(dead, self._candidates(ops.stop_gradient(flat_inputs)))
        self.steps_since_used.assign(ops.where(dead, 0.0, steps))

    def _candidates(self, flat_inputs):
        """One row of the (global) batch `[N, D]` per code, drawn uniformly: `[K, D]`.

        Under `tf.distribute` the row indices are drawn over the global batch (every replica
        draws the same ones: the seed generator's state is mirrored), each replica fills in the
        rows it holds, and a sum over replicas assembles them: the same candidates as a single
        device would draw from the same global batch, whichever replica holds the rows, and no
        replica indexes into an empty slice.
        """
        num_rows = ops.shape(flat_inputs)[0]
        offset, total = global_rows(num_rows)
        picks = keras.random.randint((self.num_embeddings,), 0, total, seed=self.seed_generator)
        if sync_context() is None:  # one replica: the whole batch is here
            return ops.take(flat_inputs, picks, axis=0)
        local = picks - offset
        held = (local >= 0) & (local < num_rows)
        # A zero row at index num_rows stands in for rows another replica holds.
        padded = ops.concatenate([flat_inputs, ops.zeros((1, self.embedding_dim))], axis=0)
        return all_reduce_sum(ops.take(padded, ops.where(held, local, num_rows), axis=0))

    def _reset_codes(self, dead, candidates):
        self.embeddings.assign(ops.where(dead[:, None], candidates, self.embeddings))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim,
                "commitment_cost": self.commitment_cost,
                "dead_code_steps": self.dead_code_steps,
                "seed": self.seed,
            }
        )
        return config

    def compute_output_spec(self, inputs, training=False):
        scalar = keras.KerasTensor((), dtype="float32")
        return {
            "quantize": keras.KerasTensor(inputs.shape, dtype="float32"),
            "loss": scalar,
            "perplexity": scalar,
            "codes_used": scalar,
            "encoding_indices": keras.KerasTensor(inputs.shape[:-1], dtype="int32"),
        }


@keras.saving.register_keras_serializable(package="keras_vqpix")
class VectorQuantizer(_BaseVectorQuantizer):
    """Vector quantizer whose codebook learns by gradient (van den Oord et al. 2017).

    Each input vector is replaced by its nearest codebook vector. The loss is
    `||sg[z_e] - e||^2 + commitment_cost * ||z_e - sg[e]||^2`: the first (codebook) term moves the
    codes toward the encoder outputs assigned to them, the second (commitment) term keeps the
    encoder near its codes. The straight-through estimator passes the decoder's gradient to the
    encoder. Both terms are taken on the *un*-straight-through codes, so the codebook gets its
    gradient (a common bug feeds both terms the straight-through tensor and the codebook never
    learns).

    Shapes: any `[..., D]` input is flattened to `[N, D]`; e.g. `[16, 32, 32, 64]` ->
    `[16384, 64]`, assigned to K codes, and reshaped back; `encoding_indices` is `[16, 32, 32]`.

    Args:
        num_embeddings: int, codebook size K.
        embedding_dim: int, code vector size D (the input's last axis).
        commitment_cost: float, beta of the commitment loss (paper: 0.25).
        dead_code_steps: int, restart a code unused for this many training steps from an
            encoder output of the current batch; 0 disables restarts.
        seed: int or None, seed of the restart draws.

    Input shape: `[..., D]`. Output: the dict described in `call`.

    Example:
    >>> vq = VectorQuantizer(num_embeddings=8, embedding_dim=4)
    >>> out = vq(keras.random.normal((2, 3, 3, 4)))
    >>> out["quantize"].shape, out["encoding_indices"].shape
    (TensorShape([2, 3, 3, 4]), TensorShape([2, 3, 3]))
    """

    _codebook_trainable = True

    def _loss(self, inputs, quantized):
        codebook_loss = global_mean(ops.square(ops.stop_gradient(inputs) - quantized))
        commitment_loss = global_mean(ops.square(inputs - ops.stop_gradient(quantized)))
        return codebook_loss + self.commitment_cost * commitment_loss

    def _update_codebook(self, flat_inputs, one_hot, counts):
        """The codebook learns through the loss; nothing to update here."""


@keras.saving.register_keras_serializable(package="keras_vqpix")
class VectorQuantizerEMA(_BaseVectorQuantizer):
    """Vector quantizer whose codebook is an exponential moving average of its assigned inputs.

    Differs from `VectorQuantizer` in how the codebook learns: instead of a codebook loss and
    an optimiser, each code is set to the running mean of the encoder outputs assigned to it
    (van den Oord et al. 2017, appendix A.1), with Laplace-smoothed counts so rare codes do not
    divide by zero. It converges faster and uses more of the codebook; the loss is only the
    commitment term. Statistics are summed over replicas under `tf.distribute`.

    Shapes as in `VectorQuantizer`: `[16, 32, 32, 64]` -> `[16384, 64]` -> indices `[16, 32, 32]`.

    Args:
        num_embeddings: int, codebook size K.
        embedding_dim: int, code vector size D.
        commitment_cost: float, beta of the commitment loss.
        decay: float in (0, 1), EMA decay (paper: 0.99).
        epsilon: float, Laplace smoothing of the counts.
        dead_code_steps: int, restart a code unused for this many training steps; 0 disables.
        seed: int or None, seed of the restart draws.

    Example:
    >>> vq = VectorQuantizerEMA(num_embeddings=8, embedding_dim=4, decay=0.9)
    >>> out = vq(keras.random.normal((2, 3, 3, 4)), training=True)
    >>> out["encoding_indices"].shape
    TensorShape([2, 3, 3])
    """

    _codebook_trainable = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_steps: int = 0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(
            num_embeddings, embedding_dim, commitment_cost, dead_code_steps, seed, **kwargs
        )
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1). Received: decay={decay}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0. Received: epsilon={epsilon}")
        self.decay = float(decay)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        super().build(input_shape)
        # Start as if every code had been seen once at its initial value, so an unused code
        # keeps that value instead of collapsing to zero.
        self.ema_cluster_size = self.add_weight(
            name="ema_cluster_size",
            shape=(self.num_embeddings,),
            initializer="ones",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.ema_dw = self.add_weight(
            name="ema_dw",
            shape=(self.num_embeddings, self.embedding_dim),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.ema_dw.assign(self.embeddings)

    def _loss(self, inputs, quantized):
        return self.commitment_cost * global_mean(ops.square(inputs - ops.stop_gradient(quantized)))

    def _update_codebook(self, flat_inputs, one_hot, counts):
        dw = all_reduce_sum(ops.matmul(ops.transpose(one_hot), ops.stop_gradient(flat_inputs)))
        cluster_size = self.decay * self.ema_cluster_size + (1.0 - self.decay) * counts
        ema_dw = self.decay * self.ema_dw + (1.0 - self.decay) * dw
        total = ops.sum(cluster_size)
        smoothed = (
            (cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        )
        self.ema_cluster_size.assign(cluster_size)
        self.ema_dw.assign(ema_dw)
        self.embeddings.assign(ema_dw / smoothed[:, None])

    def _reset_codes(self, dead, candidates):
        super()._reset_codes(dead, candidates)
        # A restarted code starts its statistics afresh, as if seen once at its new value.
        self.ema_cluster_size.assign(ops.where(dead, 1.0, self.ema_cluster_size))
        self.ema_dw.assign(ops.where(dead[:, None], candidates, self.ema_dw))

    def get_config(self):
        config = super().get_config()
        config.update({"decay": self.decay, "epsilon": self.epsilon})
        return config
