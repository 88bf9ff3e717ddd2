"""The pieces a resumed run relies on: atomic writes, the checkpoint's contents, the best model."""

from __future__ import annotations

import math

import pytest

from keras_vqpix.io import atomic_path, atomic_write_text

pytestmark = pytest.mark.usefixtures("time_limit")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.csv"
    atomic_write_text(path, "epoch\n1\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("epoch\n1\n2")  # torn: the writer dies before finishing
        raise RuntimeError("killed")
    assert path.read_text() == "epoch\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_the_training_checkpoint_holds_the_random_state_of_seeded_layers(tmp_path):
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.training.callbacks import training_checkpoint
    from keras_vqpix.training.vqvae_training import build_vqvae

    config = get_config("quick")
    model = build_vqvae(config)
    epoch = tf.Variable(0, dtype=tf.int64)
    state = model.quantizer.seed_generator.state
    model.quantizer.seed_generator.next()  # as a training step's dead-code draw does
    model.quantizer.seed_generator.next()
    saved = state.numpy().copy()
    path = training_checkpoint(model, epoch).write(str(tmp_path / "ckpt"))

    other = build_vqvae(config)
    other_state = other.quantizer.seed_generator.state
    assert not (other_state.numpy() == saved).all()
    training_checkpoint(other, tf.Variable(0, dtype=tf.int64)).read(path).assert_consumed()
    assert (other_state.numpy() == saved).all()


class _Checkpoints:
    """Stand-in for `tf.train.CheckpointManager` (only `save` is called)."""

    def save(self, checkpoint_number):
        pass


@pytest.mark.parametrize(
    ("restored_epoch", "saved_best", "expected"),
    [
        (2, 0.1, [2]),  # killed between epoch 2's checkpoint and its best-model save
        (2, 0.3, []),  # epoch 2's best model was saved
        (1, 0.0, []),  # the last row is not the restored epoch's: that one is trained again
        (2, -math.inf, [2]),  # no best model saved yet
    ],
)
def test_save_missing_best_saves_the_restored_epoch_only_when_it_beat_the_saved_best(
    tmp_path, restored_epoch, saved_best, expected
):
    import tensorflow as tf

    from keras_vqpix.training.callbacks import EpochCheckpoint

    rows = [{"epoch": 1, "val_ssim": 0.1}, {"epoch": 2, "val_ssim": 0.3}]
    saved = []
    callback = EpochCheckpoint(
        tmp_path / "history.csv",
        _Checkpoints(),
        tf.Variable(restored_epoch, dtype=tf.int64),
        "val_ssim",
        lambda epoch, logs: saved.append(epoch),
        best=saved_best,
        history=rows,
    )
    callback.save_missing_best()
    assert saved == expected


def test_building_the_models_seeds_their_weights_and_leaves_the_global_rngs_alone():
    """build_vqvae/build_prior draw their weights from the config's seed alone, whatever the
    process's random state, and hand that state back as it was (no global reseeding)."""
    import random

    import numpy as np
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.training.prior_training import build_prior
    from keras_vqpix.training.vqvae_training import build_vqvae

    config = get_config("quick")
    for build in (build_vqvae, build_prior):
        weights = []
        for process_seed in (1, 2):
            random.seed(process_seed)
            np.random.seed(process_seed)
            tf.random.set_seed(process_seed)
            expected = (random.random(), np.random.random(), float(tf.random.uniform([])))
            random.seed(process_seed)
            np.random.seed(process_seed)
            tf.random.set_seed(process_seed)
            weights.append([w.numpy() for w in build(config).weights])
            after = (random.random(), np.random.random(), float(tf.random.uniform([])))
            assert after == expected, f"{build.__name__} changed the global random state"
        for a, b in zip(*weights, strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(np.any(w != 0) for w in weights[0])
