"""Sums and means over the global batch, for code that runs once per replica under `tf.distribute`.

Under a `tf.distribute` strategy, `train_step` runs once per replica (device), each on its own
slice of the global batch; the optimizer then *sums* the replicas' gradients. So that the sum is
the gradient of the global batch's mean loss, each replica contributes its *share*: the sum of
its terms divided by the number of terms in the global batch (not its own mean divided by the
number of replicas, which is wrong when the slices differ in size, and NaN on a replica whose
slice is empty: a last, partial batch smaller than the number of replicas).

Every helper is the plain single-device computation (the same ops, bit for bit) outside a
replica context or with one replica in sync.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops


def sync_context():
    """The replica context when several replicas run in sync, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def all_reduce_sum(value):
    """`value` summed over the replicas in sync (identical on every replica); else `value`."""
    context = sync_context()
    if context is None:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def global_mean(values):
    """Mean of `values` over the global batch, as this replica's share of it.

    One replica: `ops.mean(values)`. Several: `sum(values) / (number of values on all
    replicas)`, so the shares add up to the global mean (an empty slice contributes 0).
    """
    context = sync_context()
    if context is None:
        return ops.mean(values)
    count = all_reduce_sum(ops.cast(ops.size(values), values.dtype))
    return ops.sum(values) / ops.maximum(ops.stop_gradient(count), 1.0)


def global_rows(num_rows):
    """`(offset, total)`: this replica's first row in the global batch, and the global row count.

    The global batch is the replicas' slices in replica order, which is how
    `Strategy.experimental_distribute_dataset` splits a batch on one machine: a row index drawn
    in `[0, total)` names the same example as on a single device.
    """
    context = sync_context()
    if context is None:
        return 0, num_rows
    replica = context.replica_id_in_sync_group
    # Counts travel as float32 (exact below 2**24 rows), the dtype every all-reduce supports.
    mine = tf.one_hot(replica, context.num_replicas_in_sync) * tf.cast(num_rows, tf.float32)
    rows = tf.cast(context.all_reduce(tf.distribute.ReduceOp.SUM, mine), tf.int32)
    return tf.reduce_sum(rows[:replica]), tf.reduce_sum(rows)


def across_workers() -> bool:
    """Whether the current strategy trains with several worker processes (machines).

    True under `tf.distribute.MultiWorkerMirroredStrategy` with more than one chief or worker
    in its cluster (`TF_CONFIG`).
    """
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) > 1
