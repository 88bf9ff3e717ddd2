"""Training on several devices or machines (`tf.distribute`), and mixed precision.

Strategies (`vqpix train --strategy`):

- `none`: TensorFlow's default strategy, one device.
- `mirrored`: `tf.distribute.MirroredStrategy`, one replica per GPU of this machine (without a
  GPU, per logical CPU device: one, unless split with `tf.config.set_logical_device_configuration`).
- `multiworker`: `tf.distribute.MultiWorkerMirroredStrategy` over the processes (workers) that
  `TF_CONFIG` lists, one replica per GPU of each (or its CPU). Every worker runs the same
  command; one of them, the chief, owns the run folder.
- `auto`: `mirrored` when more than one GPU is visible, else `none`.

Whatever the strategy, `data.batch_size` is the global batch: Keras' `fit` splits each batch
into one slice per replica, each replica's loss is its share of the global batch's mean, and the
gradients are summed over replicas (`keras_vqpix.replicas`): the step is the one a single device
would take on the same batch, up to the order of floating-point sums.

Several workers: only the chief writes into the run folder (and takes its lock). Every other
worker copies what a resumed run reads from it into a private temporary folder, trains there
step for step with the chief, writing its own checkpoints and models (all workers take part in
every save: a save may run collective ops) and deletes the folder at the end. They meet at two
barriers before training (the chief has prepared the run folder; every worker has its copy and
its data), so a refusal on any of them stops them all instead of leaving the others waiting.

Mixed precision (`RunConfig.precision`): layers compute in float16 (GPUs) or bfloat16 (CPUs,
TPUs) with float32 weights; the quantizer (distances, codebook), the decoder's output, the prior's
logits and every loss stay float32. Float16 needs loss scaling: `LossScaleOptimizer`. The models
saved for use (`vqvae.keras`, `prior.keras`) are float32 twins with the same weights, so that
evaluation, sampling and export behave the same however a model was trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_vqpix.replicas import all_reduce_sum
from keras_vqpix.run_folder import fingerprint_number, weights_fingerprint

STRATEGIES = ("auto", "none", "mirrored", "multiworker")
_JOBS = ("chief", "worker")


class DistributedRunError(RuntimeError):
    """Another worker of a multi-worker run failed or refused, or the workers disagree."""


# -- Strategies and roles ------------------------------------------------------------------------
def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `TF_CONFIG` of a multi-worker run, checked: `{"cluster": {...}, "task": {...}}`.

    `cluster` maps "chief" (at most one) and "worker" to lists of "host:port"; `task` names this
    process's job ("chief" or "worker") and index. Parameter servers and evaluators are not
    supported.

    Raises:
        ValueError: missing or malformed, saying what is wrong.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        raise ValueError(
            "multiworker needs the TF_CONFIG environment variable: the cluster's workers and this "
            "process's task, e.g. "
            '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error})") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError('TF_CONFIG needs a "cluster" and a "task" object')
    other = sorted(set(cluster) - set(_JOBS))
    if other:
        raise ValueError(
            f"TF_CONFIG's cluster may list only chief and worker jobs; received {other}"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise ValueError(f'TF_CONFIG\'s cluster "{job}" must be a list of "host:port"')
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("TF_CONFIG's cluster may have only one chief")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ValueError(
            f"TF_CONFIG's task {task} is not in its cluster ({', '.join(sorted(cluster))})"
        )
    return config


def local_devices() -> list[str]:
    """The devices a `mirrored` strategy replicates over: every GPU, else every logical CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def precision_policy(mixed: bool) -> str:
    """`float32`; or with `mixed`, `mixed_float16` where a GPU is visible, else `mixed_bfloat16`."""
    if not mixed:
        return "float32"
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


@dataclass(frozen=True)
class Cluster:
    """The strategy a training process runs under, and its place among the workers.

    Attributes:
        strategy: the `tf.distribute.Strategy` the models are built under.
        name: "auto", "none", "mirrored" or "multiworker" (as chosen).
        task_type: "chief" or "worker" under `multiworker`, else None.
        task_id: index of this process in its job.
        num_workers: processes training together (1 but under `multiworker`).
    """

    strategy: Any
    name: str = "none"
    task_type: str | None = None
    task_id: int = 0
    num_workers: int = 1

    @property
    def is_chief(self) -> bool:
        """Whether this process owns the run folder (the chief; else worker 0)."""
        if self.task_type is None:
            return True
        return self.task_type == "chief" or (
            self.task_type == "worker" and self.task_id == 0 and not self._has_chief_job
        )

    @property
    def _has_chief_job(self) -> bool:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        return resolver is not None and "chief" in resolver.cluster_spec().jobs

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def task(self) -> str:
        """This process's task, e.g. "worker 1" ("" when it trains alone)."""
        return "" if self.task_type is None else f"{self.task_type} {self.task_id}"

    def record(self) -> dict[str, Any]:
        """What the best models' metadata records of how they were trained."""
        return {"strategy": self.name, "replicas": self.replicas, "workers": self.num_workers}

    def describe(self, batch_size: int, precision: str) -> str:
        """One line for the log: replicas, devices, the batch per replica, the precision."""
        kind = type(self.strategy).__name__
        if self.num_workers > 1:
            where = f"{kind}, {self.num_workers} workers; this one is {self.task}"
        elif isinstance(self.strategy, tf.distribute.MirroredStrategy):
            devices = self.strategy.extended.worker_devices
            where = f"{kind} on {', '.join(d.split('/')[-1] for d in devices)}"
        else:
            where = "one device"
        low, high = batch_size // self.replicas, -(-batch_size // self.replicas)
        per = f"{low}" if low == high else f"{low}-{high}"
        return (
            f"Training on {self.replicas} replica{'s' * (self.replicas > 1)} ({where}): "
            f"global batch {batch_size}, {per} per replica; precision {precision}"
        )

    # -- Agreement between workers (no-ops for a single process) ------------------------------
    def _gather(self, values: list[float]) -> np.ndarray:
        """`values` of every replica (each process's own on each of its replicas): [replicas, n]."""
        local = tf.constant([values], tf.float64)

        @tf.function
        def gather():
            return self.strategy.gather(self.strategy.run(lambda: tf.identity(local)), axis=0)

        return gather().numpy()

    def all_ready(self, ready: bool) -> bool:
        """A barrier: whether every worker is `ready` (each says whether it is)."""
        if self.num_workers == 1:
            return ready
        return bool(np.all(self._gather([float(ready)]) == 1.0))

    def check_same(self, what: str, values: list[float]) -> None:
        """Raise `DistributedRunError` unless every worker holds the same `values`."""
        if self.num_workers == 1:
            return
        rows = self._gather([float(v) for v in values])
        if not np.all(rows == rows[:1]):
            raise DistributedRunError(
                f"the workers disagree on {what} ({', '.join(str(r.tolist()) for r in rows)}): "
                "every worker must see the chief's run folder and the same data, on a filesystem "
                "they share"
            )


def last_weights(model, epoch_variable, cluster: Cluster, name: str) -> dict[str, Any]:
    """`last_epoch` and `last_fingerprint` of a trained `model`, the same on every worker.

    Raises:
        DistributedRunError: the workers ended with different weights.
    """
    epoch, fingerprint = int(epoch_variable.numpy()), weights_fingerprint(model)
    cluster.check_same(
        f"the {name}'s weights after training", [epoch, fingerprint_number(fingerprint)]
    )
    return {"last_epoch": epoch, "last_fingerprint": fingerprint}


def single_process() -> Cluster:
    """One process on TensorFlow's current (by default: the default) strategy."""
    return Cluster(tf.distribute.get_strategy())


def make_cluster(name: str, environ: Mapping[str, str] | None = None) -> Cluster:
    """The strategy `name` (one of `STRATEGIES`) for this process.

    Create it before TensorFlow runs anything: `MultiWorkerMirroredStrategy` configures the
    process's collective ops, which TensorFlow allows only at start-up.

    Raises:
        ValueError: an unknown name, or `multiworker` without a valid `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "auto":
        chosen = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
        return dataclasses.replace(make_cluster(chosen, environ), name=f"auto: {chosen}")
    if name == "none":
        return Cluster(tf.distribute.get_strategy(), name)
    if name == "mirrored":
        return Cluster(tf.distribute.MirroredStrategy(local_devices()), name)
    config = read_tf_config(environ)
    task = config["task"]
    kind, index = task["type"], int(task.get("index", 0))
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(config["cluster"]), task_type=kind, task_id=index, rpc_layer="grpc"
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        ),
    )
    workers = sum(len(config["cluster"].get(job, [])) for job in _JOBS)
    return Cluster(strategy, name, kind, index, workers)


# -- Mixed precision -----------------------------------------------------------------------------
@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to `name` while models are built in the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="keras_vqpix")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """`keras.optimizers.LossScaleOptimizer` whose overflow check agrees across replicas.

    Keras (3.15) decides whether to apply a step or skip it (and halve the loss scale) from
    each replica's own gradients before they are summed; under `MirroredStrategy` it takes the
    first replica's verdict, so an overflow on any other replica reaches the weights (measured:
    inf weights after one step), and under `MultiWorkerMirroredStrategy` the replicas may take
    different branches around the gradients' all-reduce. Here a step is skipped on every
    replica when any replica's gradients are not finite.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        overflows = all_reduce_sum(tf.cast(tf.logical_not(finite), tf.float32))
        return tf.equal(overflows, 0.0)


def training_optimizer(optimizer, precision: str):
    """`optimizer`, wrapped in a `LossScaleOptimizer` for float16 (which needs loss scaling)."""
    if precision == "mixed_float16":
        return LossScaleOptimizer(optimizer)
    return optimizer


def float32_twin(model, build, precision: str):
    """The model to save for use: `model` itself in float32, else a float32 twin of its weights.

    Args:
        model: the trained model.
        build: a callable returning a new, built model of the same architecture (called under
            the float32 policy and outside any strategy scope).
        precision: the policy `model` was built with.
    """
    if precision == "float32":
        return model
    with dtype_policy("float32"):
        twin = build()
    twin.set_weights(model.get_weights())
    return twin
