"""`Model.fit` under `tf.distribute.MultiWorkerMirroredStrategy` with Keras 3.15: two workarounds.

Keras 3's TensorFlow trainer (3.15, the pinned version) breaks under a multi-worker strategy in
two places (tensorflow/tensorflow#72388), both fixed here for the project's models:

- Before training, `fit` takes the first distributed batch and averages it across workers with
  `Strategy.reduce`, which under `MultiWorkerMirroredStrategy` accepts one tensor, not the
  `(images, labels)` tuple the datasets yield ("Attempt to convert a value (PerReplica...)").
  It only does so to build an unbuilt model; the training code builds models before `fit`.
- After each step, `fit` averages the step's logs across workers with
  `Strategy.reduce("MEAN", value, axis=0)`, which fails for scalars ("Invalid reduction
  dimension 0 for input with 0 dimensions"); the steps return one-element vectors there.
"""

from __future__ import annotations

from keras import ops

from keras_vqpix.replicas import across_workers


class DistributedFitMixin:
    """Mixin for a `keras.Model` subclass trained with `fit` under any `tf.distribute` strategy.

    Build the model (and its optimizer) before `fit`; return `self.step_logs(logs)` from
    `train_step` and `test_step`.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.built:
            return  # nothing to build; and no cross-worker reduce of a batch (module docstring)
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @staticmethod
    def step_logs(logs: dict) -> dict:
        """A step's logs: scalars, or one-element vectors when several workers train."""
        if not across_workers():
            return logs
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
