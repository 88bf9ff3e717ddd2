"""VQ-VAE: convolutional encoder, vector quantizer, decoder (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers, ops

from keras_vqpix.config import VQVAEConfig
from keras_vqpix.layers.residual import ResidualBlock
from keras_vqpix.layers.vector_quantizer import VectorQuantizer, VectorQuantizerEMA
from keras_vqpix.metrics import (
    CodebookUsage,
    fast_ssim_foreground_per_image,
    fast_ssim_map,
    fast_ssim_per_image,
    foreground_mean,
)
from keras_vqpix.models.distributed import DistributedFitMixin
from keras_vqpix.replicas import all_reduce_sum, global_mean

# The defaults of `VQVAE`'s arguments: those of the run config (one source).
_DEFAULTS = VQVAEConfig()


def _num_downsamplings(downsample_factor: int) -> int:
    steps = int(round(math.log2(downsample_factor)))
    if downsample_factor < 2 or 2**steps != downsample_factor:
        raise ValueError(
            f"downsample_factor must be a power of two >= 2. Received: downsample_factor={downsample_factor}"
        )
    return steps


class _ConvStack(layers.Layer):
    """What the encoder and decoder share: their arguments, a residual stack and the config."""

    def __init__(
        self,
        hidden_channels: int,
        residual_channels: int,
        num_residual_blocks: int,
        downsample_factor: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.steps = _num_downsamplings(downsample_factor)
        self.hidden_channels = hidden_channels
        self.residual_channels = residual_channels
        self.num_residual_blocks = num_residual_blocks
        self.downsample_factor = downsample_factor
        self.conv = layers.Conv2D(
            hidden_channels, 3, padding="same", name="conv", dtype=self.dtype_policy
        )
        self.blocks = [
            ResidualBlock(residual_channels, name=f"residual_{i}", dtype=self.dtype_policy)
            for i in range(num_residual_blocks)
        ]

    def residual_stack(self, x):
        """3x3 convolution, the residual blocks, ReLU (the paper's stack)."""
        x = self.conv(x)
        for block in self.blocks:
            x = block(x)
        return ops.relu(x)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "residual_channels": self.residual_channels,
            "num_residual_blocks": self.num_residual_blocks,
            "downsample_factor": self.downsample_factor,
        }


@keras.saving.register_keras_serializable(package="keras_vqpix")
class Encoder(_ConvStack):
    """Image `[B, H, W, 1]` -> continuous latents `[B, H/f, W/f, D]`.

    A space-to-depth rearrangement (2x2 pixels -> 4 channels) and a 3x3 convolution, then
    `log2(f) - 1` stride-2 4x4 convolutions (channels doubling up to `hidden_channels`), a 3x3
    convolution, `num_residual_blocks` residual blocks, ReLU and a 1x1 projection to D. The
    space-to-depth first step sees every pixel, like a stride-2 convolution, at a fraction of
    the cost of convolving a one-channel full-resolution image (measured: the full-resolution
    layers dominated a CPU training step).

    Args:
        hidden_channels: int, channels at the latent resolution.
        residual_channels: int, bottleneck of the residual blocks.
        num_residual_blocks: int.
        downsample_factor: int, power of two f >= 2.
        embedding_dim: int, D.

    Example:
    >>> Encoder(32, 8, 1, 4, 16)(keras.ops.zeros((2, 64, 64, 1))).shape
    TensorShape([2, 16, 16, 16])
    """

    def __init__(
        self,
        hidden_channels: int,
        residual_channels: int,
        num_residual_blocks: int,
        downsample_factor: int,
        embedding_dim: int,
        **kwargs,
    ):
        super().__init__(
            hidden_channels, residual_channels, num_residual_blocks, downsample_factor, **kwargs
        )
        self.embedding_dim = embedding_dim
        policy = self.dtype_policy
        widths = [max(hidden_channels // 2 ** (self.steps - 1 - i), 1) for i in range(self.steps)]
        self.stem = layers.Conv2D(
            widths[0], 3, padding="same", activation="relu", name="stem", dtype=policy
        )
        self.downsamplers = [
            layers.Conv2D(
                width,
                4,
                strides=2,
                padding="same",
                activation="relu",
                name=f"down_{i}",
                dtype=policy,
            )
            for i, width in enumerate(widths[1:])
        ]
        self.project = layers.Conv2D(embedding_dim, 1, name="project", dtype=policy)

    def call(self, images):
        x = self.stem(tf.nn.space_to_depth(images, 2))
        for layer in self.downsamplers:
            x = layer(x)
        return self.project(self.residual_stack(x))

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim}


@keras.saving.register_keras_serializable(package="keras_vqpix")
class Decoder(_ConvStack):
    """Quantized latents `[B, h, w, D]` -> image `[B, h*f, w*f, 1]` in [0, 1].

    A 3x3 convolution, residual blocks, ReLU, `log2(f) - 1` stride-2 4x4 transposed
    convolutions (channels halving), then a sub-pixel output (Shi et al. 2016,
    https://arxiv.org/abs/1609.05158): a 3x3 convolution to 4 channels rearranged depth-to-space
    into the full-resolution image, and a sigmoid. The output is bounded, so SSIM and PSNR with
    `max_val=1` mean what they say.

    Args: as `Encoder`, without `embedding_dim`.

    Example:
    >>> Decoder(32, 8, 1, 4)(keras.ops.zeros((2, 16, 16, 16))).shape
    TensorShape([2, 64, 64, 1])
    """

    def __init__(
        self,
        hidden_channels: int,
        residual_channels: int,
        num_residual_blocks: int,
        downsample_factor: int,
        **kwargs,
    ):
        super().__init__(
            hidden_channels, residual_channels, num_residual_blocks, downsample_factor, **kwargs
        )
        policy = self.dtype_policy
        self.upsamplers = [
            layers.Conv2DTranspose(
                max(hidden_channels // 2 ** (i + 1), 1),
                4,
                strides=2,
                padding="same",
                activation="relu",
                name=f"up_{i}",
                dtype=policy,
            )
            for i in range(self.steps - 1)
        ]
        # The output stays float32 under mixed precision: it is what SSIM and the loss read.
        self.output_conv = layers.Conv2D(4, 3, padding="same", name="output", dtype="float32")

    def call(self, latents):
        x = self.residual_stack(latents)
        for layer in self.upsamplers:
            x = layer(x)
        return ops.sigmoid(tf.nn.depth_to_space(self.output_conv(x), 2))


@keras.saving.register_keras_serializable(package="keras_vqpix")
class VQVAE(DistributedFitMixin, keras.Model):
    """VQ-VAE for single-channel images in [0, 1].

    `images [B, H, W, 1]` -> encoder -> `[B, H/f, W/f, D]` -> quantizer -> codes
    `[B, H/f, W/f]` (int32 in [0, K)) -> decoder -> `reconstruction [B, H, W, 1]` in [0, 1].
    E.g. 128x128 slices with f=4 give 32x32 code maps.

    Loss: `MSE + ssim_loss_weight * (1 - SSIM) + VQ loss` (commitment, plus the codebook term
    for the gradient quantizer). Metrics: loss, reconstruction_loss, vq_loss, ssim, and the
    epoch's perplexity and codes_used (over every code assigned in the epoch).

    Args:
        hidden_channels, residual_channels, num_residual_blocks, downsample_factor: the
            encoder/decoder (see `Encoder`).
        num_embeddings: int, K.
        embedding_dim: int, D.
        commitment_cost: float, beta.
        quantizer: "ema" (`VectorQuantizerEMA`) or "gradient" (`VectorQuantizer`).
        ema_decay: float, EMA decay for the "ema" quantizer.
        dead_code_steps: int, dead-code restart period (0: off).
        ssim_loss_weight: float, weight of the SSIM term of the loss.
        seed: int or None, seed of the quantizer's restarts.

    Defaults are those of `keras_vqpix.config.VQVAEConfig` (the one place they are written);
    `VQVAE.from_run_config` builds the model of a run config.
    """

    def __init__(
        self,
        hidden_channels: int = _DEFAULTS.hidden_channels,
        residual_channels: int = _DEFAULTS.residual_channels,
        num_residual_blocks: int = _DEFAULTS.num_residual_blocks,
        downsample_factor: int = _DEFAULTS.downsample_factor,
        num_embeddings: int = _DEFAULTS.num_embeddings,
        embedding_dim: int = _DEFAULTS.embedding_dim,
        commitment_cost: float = _DEFAULTS.commitment_cost,
        quantizer: str = _DEFAULTS.quantizer,
        ema_decay: float = _DEFAULTS.ema_decay,
        dead_code_steps: int = _DEFAULTS.dead_code_steps,
        ssim_loss_weight: float = _DEFAULTS.ssim_loss_weight,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if quantizer not in ("ema", "gradient"):
            raise ValueError(
                f"quantizer must be 'ema' or 'gradient'. Received: quantizer={quantizer!r}"
            )
        self.hidden_channels = hidden_channels
        self.residual_channels = residual_channels
        self.num_residual_blocks = num_residual_blocks
        self.downsample_factor = downsample_factor
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.quantizer_kind = quantizer
        self.ema_decay = ema_decay
        self.dead_code_steps = dead_code_steps
        self.ssim_loss_weight = ssim_loss_weight
        self.seed = seed
        self.encoder = Encoder(
            hidden_channels,
            residual_channels,
            num_residual_blocks,
            downsample_factor,
            embedding_dim,
            name="encoder",
        )
        common = {
            "commitment_cost": commitment_cost,
            "dead_code_steps": dead_code_steps,
            "seed": seed,
        }
        if quantizer == "ema":
            self.quantizer = VectorQuantizerEMA(
                num_embeddings, embedding_dim, decay=ema_decay, name="quantizer", **common
            )
        else:
            self.quantizer = VectorQuantizer(
                num_embeddings, embedding_dim, name="quantizer", **common
            )
        self.decoder = Decoder(
            hidden_channels,
            residual_channels,
            num_residual_blocks,
            downsample_factor,
            name="decoder",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.vq_tracker = keras.metrics.Mean(name="vq_loss")
        self.ssim_tracker = keras.metrics.Mean(name="ssim")
        self.ssim_foreground_tracker = keras.metrics.Mean(name="ssim_foreground")
        self.usage = CodebookUsage(num_embeddings, name="codebook")

    @classmethod
    def from_run_config(cls, config: VQVAEConfig, seed: int | None = None) -> VQVAE:
        """Build from a `keras_vqpix.config.VQVAEConfig` (every field but the training recipe)."""
        return cls(**config.model_arguments(), seed=seed)

    def call(self, images, training=False):
        """`images [B, H, W, 1]` -> dict: reconstruction, codes, vq_loss, perplexity, codes_used."""
        latents = self.encoder(images)
        quantized = self.quantizer(latents, training=training)
        return {
            "reconstruction": self.decoder(quantized["quantize"]),
            "codes": quantized["encoding_indices"],
            "vq_loss": quantized["loss"],
            "perplexity": quantized["perplexity"],
            "codes_used": quantized["codes_used"],
        }

    def encode(self, images):
        """`images [B, H, W, 1]` -> codes `[B, H/f, W/f]` int32."""
        return self.quantizer(self.encoder(images), training=False)["encoding_indices"]

    def decode(self, codes):
        """codes `[B, h, w]` int -> images `[B, h*f, w*f, 1]` in [0, 1]."""
        return self.decoder(self.quantizer.lookup(codes))

    def reconstruction_loss(self, images, reconstruction):
        """MSE over the image, plus `ssim_loss_weight * (1 - SSIM over the brain)`.

        The SSIM term is averaged inside the head mask of the input: the background is black
        noise that no decoder should spend capacity reproducing.

        Under `tf.distribute` this is the replica's share of the global batch's loss (the shares
        add up to it; see `keras_vqpix.replicas`), so the optimizer's sum of the replicas'
        gradients is the gradient of the global batch's loss, whatever the slices' sizes.
        """
        loss = global_mean(ops.square(images - reconstruction))
        if self.ssim_loss_weight:
            one = global_mean(ops.ones_like(images[:, 0, 0, 0]))  # 1, or this replica's share
            loss = loss + self.ssim_loss_weight * (
                one - foreground_mean(images, fast_ssim_map(images, reconstruction))
            )
        return loss

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.reconstruction_tracker,
            self.vq_tracker,
            self.ssim_tracker,
            self.ssim_foreground_tracker,
            self.usage,
        ]

    def _step(self, images, training):
        outputs = self(images, training=training)
        reconstruction_loss = self.reconstruction_loss(images, outputs["reconstruction"])
        loss = reconstruction_loss + outputs["vq_loss"]
        return outputs, reconstruction_loss, loss

    def _update_metrics(self, images, outputs, reconstruction_loss, loss):
        # Under tf.distribute the losses are this replica's shares: their sums over replicas are
        # the global batch's losses, the same on every replica, and each replica's trackers count
        # the step once (so their totals over replicas average over steps, as on one device).
        loss, reconstruction_loss, vq_loss = all_reduce_sum(
            [loss, reconstruction_loss, outputs["vq_loss"]]
        )
        # Scalars go in as one-element vectors (the same mean): a Keras metric adds by
        # `total.assign(total + value)`, and Grappler's arithmetic optimizer folded the sum that
        # makes `loss` into that add, so the validation loss varied in its last bit between
        # identical runs.
        for tracker, value in (
            (self.loss_tracker, loss),
            (self.reconstruction_tracker, reconstruction_loss),
            (self.vq_tracker, vq_loss),
        ):
            tracker.update_state(ops.reshape(value, (1,)))
        self.ssim_tracker.update_state(fast_ssim_per_image(images, outputs["reconstruction"]))
        foreground = fast_ssim_foreground_per_image(images, outputs["reconstruction"])
        # Blank slices have no brain (NaN): they do not count.
        self.ssim_foreground_tracker.update_state(
            tf.where(tf.math.is_nan(foreground), 0.0, foreground),
            sample_weight=tf.cast(~tf.math.is_nan(foreground), tf.float32),
        )
        self.usage.update_state(outputs["codes"])
        results = {
            tracker.name: tracker.result() for tracker in self.metrics if tracker is not self.usage
        }
        return results | self.usage.result()

    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        with tf.GradientTape() as tape:
            outputs, reconstruction_loss, loss = self._step(images, training=True)
            # Under tf.distribute `loss` is this replica's share of the global batch's loss, so
            # the replicas' gradients, which the optimizer sums, add up to the global batch's
            # gradient. A loss-scale optimizer (float16) scales it further.
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
        return self.step_logs(self._update_metrics(images, outputs, reconstruction_loss, loss))

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        outputs, reconstruction_loss, loss = self._step(images, training=False)
        return self.step_logs(self._update_metrics(images, outputs, reconstruction_loss, loss))

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "residual_channels": self.residual_channels,
            "num_residual_blocks": self.num_residual_blocks,
            "downsample_factor": self.downsample_factor,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "commitment_cost": self.commitment_cost,
            "quantizer": self.quantizer_kind,
            "ema_decay": self.ema_decay,
            "dead_code_steps": self.dead_code_steps,
            "ssim_loss_weight": self.ssim_loss_weight,
            "seed": self.seed,
        }
