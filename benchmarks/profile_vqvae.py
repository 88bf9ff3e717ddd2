"""Where a VQ-VAE training step spends its time: its parts timed one by one, and a profiler trace.

`python -m benchmarks.profile_vqvae [--config default] [--trace DIR]` prints the parts' times;
with `--trace`, it also writes a TensorFlow profiler trace of a few whole steps into DIR (open
it with TensorBoard's profile plugin). `python -m benchmarks` reports the same parts.

The parts, each its own `tf.function` over the same batch, forward and backward where the step
differentiates them: the encoder, the quantizer (its EMA and restart updates included), the
decoder, the loss (MSE and the SSIM term), the metrics the step updates, and the optimizer's
update; then the whole `train_step`.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.timing import Stats, alternate


def part_functions(model, images):
    """`{part: zero-argument function}` running each part of `model.train_step(images)` once."""
    import tensorflow as tf

    latents = tf.Variable(model.encoder(images), trainable=False)
    quantized = tf.Variable(model.quantizer(latents)["quantize"], trainable=False)
    reconstruction = tf.Variable(model.decoder(quantized), trainable=False)
    codes = model.quantizer(latents)["encoding_indices"]
    decoder_input = tf.Variable(quantized)
    recon_input = tf.Variable(reconstruction)

    @tf.function
    def encoder():
        with tf.GradientTape() as tape:
            out = model.encoder(images)
        return tape.gradient(out, model.encoder.trainable_variables, output_gradients=out)

    @tf.function
    def quantizer():
        return model.quantizer(latents, training=True)["quantize"]

    @tf.function
    def decoder():
        with tf.GradientTape() as tape:
            out = model.decoder(decoder_input)
        variables = [*model.decoder.trainable_variables, decoder_input]
        return tape.gradient(out, variables, output_gradients=out)

    @tf.function
    def loss():
        with tf.GradientTape() as tape:
            value = model.reconstruction_loss(images, recon_input)
        return tape.gradient(value, recon_input)

    @tf.function
    def metrics():
        outputs = {
            "reconstruction": reconstruction,
            "codes": codes,
            "vq_loss": tf.constant(0.0),
        }
        return model._update_metrics(images, outputs, tf.constant(0.0), tf.constant(0.0))

    gradients = [tf.zeros_like(v) for v in model.trainable_variables]

    @tf.function
    def optimizer():
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))

    step = tf.function(model.train_step, reduce_retracing=True)
    return {
        "encoder (forward + backward)": encoder,
        "quantizer (forward, EMA and restarts)": quantizer,
        "decoder (forward + backward)": decoder,
        "loss: MSE + SSIM term (forward + backward)": loss,
        "metrics update (SSIM, brain SSIM, usage)": metrics,
        "optimizer update (Adam)": optimizer,
        "whole train_step": lambda: step(images),
    }


def part_times(config, images, repeats: int = 5, calls: int = 3) -> dict[str, Stats]:
    """Seconds per call of each part (the mean of `calls` calls, `repeats` runs in alternation)."""
    from keras_vqpix.training.vqvae_training import build_vqvae

    model = build_vqvae(config)
    parts = part_functions(model, images)
    for fn in parts.values():  # trace and warm up
        fn()
        fn()

    def mean_of(fn):
        def run():
            for _ in range(calls):
                result = fn()
            _block(result)

        return run

    times = alternate({name: mean_of(fn) for name, fn in parts.items()}, repeats)
    return {name: stats.map(lambda s: s / calls) for name, stats in times.items()}


def _block(result) -> None:
    """Wait for the values of `result` (nested tensors) to be computed."""
    import tensorflow as tf

    for value in tf.nest.flatten(result):
        if hasattr(value, "numpy"):
            value.numpy()


def write_trace(config, images, logdir: str, steps: int = 5) -> None:
    """A TensorFlow profiler trace of `steps` whole training steps, for TensorBoard."""
    import tensorflow as tf

    from keras_vqpix.training.vqvae_training import build_vqvae

    model = build_vqvae(config)
    step = tf.function(model.train_step, reduce_retracing=True)
    _block(step(images))
    tf.profiler.experimental.start(logdir)
    for i in range(steps):
        with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
            _block(step(images))
    tf.profiler.experimental.stop()


def training_batch(config, data_root):
    """One training batch of real slices for `config` (its image size and batch size)."""
    from keras_vqpix.data.discover import discover_splits
    from keras_vqpix.data.pipeline import make_dataset

    splits = discover_splits(data_root, config.data.validation_fraction, config.seed)
    records = splits.train[: config.data.batch_size]
    return next(iter(make_dataset(records, config.data.image_size, len(records), cache="")))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_vqvae", description=__doc__)
    parser.add_argument("--config", default="default", choices=("quick", "default"))
    parser.add_argument("--data", default=None, help="ADNI-layout folder; default: the demo set")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace", default=None, help="write a profiler trace into this folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_vqpix.config import get_config
    from keras_vqpix.data.demo import ensure_demo_dataset

    config = get_config(args.config)
    data_root = args.data or ensure_demo_dataset()[0]
    images = training_batch(config, data_root)
    print(f"{args.config} VQ-VAE, batch {images.shape[0]} of {images.shape[1]}x{images.shape[2]}")
    for name, stats in part_times(config, images, args.repeats).items():
        print(f"{name:45s} {stats.show(3, 1000)} ms")
    if args.trace:
        write_trace(config, images, args.trace)
        print(f"profiler trace in {args.trace} (tensorboard --logdir {args.trace}, Profile tab)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
