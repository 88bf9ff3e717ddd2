"""Run by `tests/test_distribute.py` in a subprocess: one device against two mirrored replicas.

The host CPU is split into two logical devices first (TensorFlow allows that only before it
initialises its devices, hence a process of its own). Then, with the same config, data and
global batch, on one device and on a two-replica `MirroredStrategy`: two epochs of the VQ-VAE
(`fit` as the training stage calls it, without its files, on the batches the training stage
plans for two replicas), the prior's loss and label-dropout
draws on one batch (a whole `fit` of the prior costs 20 s more of tracing under the strategy),
and one step of the replica-safe `LossScaleOptimizer` where only the second replica overflows. Writes
`results.json` and `weights.npz` into OUT for the test to compare.

It also records the size of every replica's slice of every batch that the training pipelines
hand a two-replica strategy, with the plan of `batch_sizes` and with plain batching.

Usage: python tests/mirrored_check.py DATA OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_vqpix.config import get_config  # noqa: E402
from keras_vqpix.data.pipeline import make_dataset, steps_per_epoch  # noqa: E402
from keras_vqpix.run_folder import load_splits  # noqa: E402
from keras_vqpix.training.distribute import LossScaleOptimizer, make_cluster  # noqa: E402
from keras_vqpix.training.prior_training import build_prior, code_dataset  # noqa: E402
from keras_vqpix.training.vqvae_training import build_vqvae, training_dataset  # noqa: E402

# 32 training slices in batches of 31: plain batching would end every epoch with a batch of one
# slice and leave the second replica an empty slice; the plan for two replicas is 30 + 2.
# Dead-code restarts fire at the first step.
BATCH = 31
REPLICAS = 2
EPOCHS = 2
QUANTIZER = ("ema_cluster_size", "embeddings", "steps_since_used", "ema_dw")


def train_vqvae_steps(config, splits, cluster) -> tuple[dict, dict, list[np.ndarray]]:
    """The VQ-VAE stage's `fit`: history, quantizer state, weights."""
    # Both the one-device and the two-replica run train on the two-replica plan's batches.
    steps = steps_per_epoch(len(splits.train), BATCH, min_batch=REPLICAS)
    with cluster.strategy.scope():
        model = build_vqvae(config, steps)
    data = training_dataset(splits.train, config, min_batch=REPLICAS)
    history = model.fit(data, steps_per_epoch=steps, epochs=EPOCHS, shuffle=False, verbose=0)
    quantizer = {name: getattr(model.quantizer, name).numpy().tolist() for name in QUANTIZER}
    return history.history, quantizer, model.get_weights()


def prior_step(config, cluster) -> tuple[list[float], list[int]]:
    """The prior's loss and label-dropout draws on one batch of 17 maps (slices of 9 and 8).

    Each replica's loss is its share of the batch's (summed here), and each replica's labels
    are dropped by its slice of the draws a single device makes for the whole batch.
    """
    rng = np.random.default_rng(1)
    size = config.code_size
    codes = rng.integers(0, config.vqvae.num_embeddings, (17, size, size)).astype(np.int32)
    labels = rng.integers(0, 2, 17).astype(np.int32)
    with cluster.strategy.scope():
        prior = build_prior(config)
    dataset = code_dataset(codes, labels, 17)
    batch = next(iter(cluster.strategy.experimental_distribute_dataset(dataset)))

    @tf.function
    def step(batch):
        def replica_step(codes, labels):
            draws = prior._label_draws(tf.shape(labels)[0])
            return prior.code_loss(codes, prior(codes, labels, training=True)), draws

        losses, draws = cluster.strategy.run(replica_step, args=batch)
        local = cluster.strategy.experimental_local_results
        return tf.add_n(local(losses)), tf.concat(local(draws), axis=0)

    loss, draws = step(batch)
    return [float(loss)], draws.numpy().tolist()


def loss_scale_step(cluster) -> dict:
    """One step where only replica 1's loss overflows: skipped everywhere, the scale halved."""
    with cluster.strategy.scope():
        weights = keras.Variable([1.0, 2.0])
        optimizer = LossScaleOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build([weights])

    @tf.function
    def step():
        def replica_step():
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(weights.value * weights.value)
                overflow = tf.equal(context.replica_id_in_sync_group, 1)
                loss = loss * tf.where(overflow, float("inf"), 1.0)
                scaled = optimizer.scale_loss(loss)
            optimizer.apply(tape.gradient(scaled, [weights.value]), [weights])

        cluster.strategy.run(replica_step)

    step()
    return {
        "weights": weights.numpy().tolist(),
        "scale": float(optimizer.dynamic_scale.numpy()),
        "initial_scale": float(optimizer.initial_scale),
    }


def replica_batch_sizes(strategy, dataset, steps: int) -> list[list[int]]:
    """The rows of each replica's slice of the first `steps` batches, as Keras' `fit` splits them."""
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    sizes = []
    for _ in range(steps):
        slices = strategy.experimental_local_results(next(batches)[0])
        sizes.append([int(s.shape[0]) for s in slices])
    return sizes


def pipelines(config, splits, min_batch: int) -> dict[str, tuple]:
    """One epoch of each training stage's pipelines (dataset, steps) with this `min_batch`."""
    train, validation = splits.train, splits.validation
    size, rng = config.data.image_size, np.random.default_rng(2)
    codes = rng.integers(0, 4, (33, 2, 2)).astype(np.int32)  # 33 maps: 16 + 16 + 1 plainly
    labels = np.zeros(33, np.int32)
    return {
        "vqvae_train": (
            training_dataset(train, config, min_batch=min_batch),
            steps_per_epoch(len(train), BATCH, min_batch=min_batch),
        ),
        "vqvae_validation": (
            make_dataset(validation, size, len(validation) - 1, min_batch=min_batch),
            steps_per_epoch(len(validation), len(validation) - 1, min_batch=min_batch),
        ),
        "prior_train": (
            code_dataset(codes, labels, 16, shuffle=True, min_batch=min_batch),
            steps_per_epoch(33, 16, min_batch=min_batch),
        ),
        "prior_validation": (
            code_dataset(codes, labels, 16, min_batch=min_batch),
            steps_per_epoch(33, 16, min_batch=min_batch),
        ),
    }


def main(data: str, out: str) -> None:
    out = Path(out)
    config = get_config("quick").replace(**{"data.batch_size": BATCH})
    splits = load_splits(data, config)
    results, weights = {}, {}
    for name in ("none", "mirrored"):
        cluster = make_cluster(name)
        history, quantizer, vqvae_weights = train_vqvae_steps(config, splits, cluster)
        prior_loss, label_draws = prior_step(config, cluster)
        weights.update({f"{name}/vqvae/{i}": w for i, w in enumerate(vqvae_weights)})
        results[name] = {
            "replicas": cluster.replicas,
            "history": history,
            "quantizer": quantizer,
            "prior_loss": prior_loss,
            "label_draws": label_draws,
        }
    mirrored = make_cluster("mirrored")
    results["loss_scale"] = loss_scale_step(mirrored)
    results["replica_batch_sizes"] = {
        plan: {
            name: replica_batch_sizes(mirrored.strategy, dataset, steps)
            for name, (dataset, steps) in pipelines(config, splits, min_batch).items()
        }
        for plan, min_batch in (("planned", REPLICAS), ("plain", 1))
    }
    np.savez(out / "weights.npz", **weights)
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
