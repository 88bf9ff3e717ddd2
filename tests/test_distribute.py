"""Several replicas, several workers, mixed precision: on CPU only.

Two replicas on one machine: the host CPU split into two logical devices, in a subprocess
(`tests/mirrored_check.py`). Two workers: two `vqpix train --strategy multiworker` processes on
localhost with `TF_CONFIG`. Tolerances, for training on 2 replicas against 1 device with the
same global batch: the step is the same computation but for the order of a few floating-point
sums (each replica sums its slice, then the slices are summed), so values differ in their last
bits (measured: relative 6e-7 on losses and SSIM, absolute 3e-8 on the codebook after 4 steps).
The tests allow about 20 times that: rtol 1e-5 on losses and metrics, atol 1e-6 on codebook
values; which codes are used, and the EMA counts, must be equal. Weights get atol 1e-5: Adam
divides each gradient by its running magnitude, so where a gradient is tiny the sums' rounding
enters an update of ordinary size (measured: up to 1.2e-6 on the prior's weights after 4 steps).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")

TESTS = Path(__file__).parent
TIMEOUT = 300  # seconds for a subprocess, TensorFlow's import included
RTOL = 1e-5
ATOL = 1e-6
WEIGHTS_ATOL = 1e-5


def environment(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess: quiet TensorFlow, no inherited TF_CONFIG."""
    env = {name: value for name, value in os.environ.items() if name != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **extra}


# -- Two replicas on one machine -----------------------------------------------------------------
@pytest.fixture(scope="module")
def mirrored(tiny_adni, tmp_path_factory) -> dict:
    """`tests/mirrored_check.py`'s results: one device and two mirrored replicas."""
    out = tmp_path_factory.mktemp("mirrored")
    done = subprocess.run(
        [sys.executable, str(TESTS / "mirrored_check.py"), str(tiny_adni), str(out)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "weights.npz") as weights:
        results["weights"] = dict(weights)
    return results


def assert_same_history(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, err_msg=name)


def assert_same_weights(weights: dict, stage: str) -> None:
    names = sorted(n for n in weights if n.startswith(f"none/{stage}/"))
    assert names
    for name in names:
        np.testing.assert_allclose(
            weights[name.replace("none/", "mirrored/", 1)],
            weights[name],
            atol=WEIGHTS_ATOL,
            err_msg=name,
        )


@pytest.mark.large
def test_two_mirrored_replicas_train_the_vqvae_as_one_device_does(mirrored):
    one, two = mirrored["none"], mirrored["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # Losses, SSIM, and the codebook usage of each epoch (2 steps of 30 and 2 slices: the
    # two-replica plan, which both runs train on).
    assert_same_history(two["history"], one["history"])
    assert two["history"]["codes_used"] == one["history"]["codes_used"]
    assert one["history"]["codes_used"][-1] >= 4  # the restarts spread the codes
    q1, q2 = one["quantizer"], two["quantizer"]
    assert q2["ema_cluster_size"] == q1["ema_cluster_size"]  # the same counts, exactly
    assert q2["steps_since_used"] == q1["steps_since_used"]
    for name in ("embeddings", "ema_dw"):
        np.testing.assert_allclose(q2[name], q1[name], atol=ATOL, err_msg=name)
    assert_same_weights(mirrored["weights"], "vqvae")


@pytest.mark.large
def test_no_replica_is_handed_an_empty_slice_of_a_batch(mirrored):
    # On CPUs where TensorFlow's oneDNN Conv2D is on (AVX-512), an empty slice makes the first
    # convolution return the input's shape and the next one fail; checked here on any CPU by
    # the slices themselves, as `fit` splits each batch of every training pipeline.
    planned, plain = (mirrored["replica_batch_sizes"][p] for p in ("planned", "plain"))
    assert sorted(planned) == ["prior_train", "prior_validation", "vqvae_train", "vqvae_validation"]
    for name, sizes in planned.items():
        assert all(len(replicas) == 2 and min(replicas) >= 1 for replicas in sizes), (name, sizes)
        # Every example of the pass, none dropped (plain batching holds each once too).
        assert sum(map(sum, sizes)) == sum(map(sum, plain[name])), name
        # Plain batching is the case guarded against: its last batch leaves a replica empty.
        assert min(plain[name][-1]) == 0, (name, plain[name])


@pytest.mark.large
def test_two_mirrored_replicas_give_the_prior_the_loss_and_label_dropout_of_one_device(mirrored):
    one, two = mirrored["none"], mirrored["mirrored"]
    np.testing.assert_allclose(two["prior_loss"], one["prior_loss"], rtol=RTOL)
    assert two["label_draws"] == one["label_draws"]  # the same draw for every map, exactly


@pytest.mark.large
def test_an_overflow_on_one_replica_skips_the_step_on_every_replica(mirrored):
    step = mirrored["loss_scale"]
    assert step["weights"] == [1.0, 2.0]  # not inf: the step was skipped
    assert step["scale"] == step["initial_scale"] / 2


# -- Two workers on localhost --------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "quick",
        "--stage",
        "vqvae",
        "--epochs",
        str(epochs),
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]


def last_fingerprint(output: str) -> tuple[int, str]:
    match = re.search(r"last epoch (\d+) \(weights ([0-9a-f]{16})\)", output)
    assert match, output[-3000:]
    return int(match.group(1)), match.group(2)


def checkpoint_fingerprint(run: Path) -> str:
    """The fingerprint of the weights in the run's newest VQ-VAE checkpoint."""
    import tensorflow as tf

    from keras_vqpix.run_folder import RunPaths, read_config, weights_fingerprint
    from keras_vqpix.training.callbacks import training_checkpoint
    from keras_vqpix.training.vqvae_training import build_vqvae

    model = build_vqvae(read_config(RunPaths(run)))
    checkpoint = training_checkpoint(model, tf.Variable(0, dtype=tf.int64))
    path = tf.train.latest_checkpoint(str(run / "checkpoints" / "vqvae"))
    checkpoint.read(path).assert_existing_objects_matched()
    return weights_fingerprint(model)


@pytest.mark.large
def test_two_workers_resume_a_run_train_in_step_and_only_the_chief_writes(
    quick_run, tiny_adni, tmp_path
):
    # The session's quick run (3 epochs on one device), resumed by two workers for a 4th.
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    before = sorted(p.name for p in run.iterdir())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    scratch = [tmp_path / f"tmp{index}" for index in range(2)]  # each worker's TMPDIR
    processes, logs = [], []
    try:
        for index in range(2):
            scratch[index].mkdir()
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            logs.append(open(tmp_path / f"worker{index}.log", "w+b"))  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "keras_vqpix_cli.main"]
                    + train_args(tiny_adni, run, 4, "--strategy", "multiworker"),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    env=environment(TF_CONFIG=json.dumps(tf_config), TMPDIR=str(scratch[index])),
                )
            )
        codes = [process.wait(timeout=TIMEOUT) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().decode("utf-8", "replace"))
            log.close()
    chief, worker = outputs
    assert codes == [0, 0], f"chief:\n{chief[-3000:]}\nworker:\n{worker[-3000:]}"
    for output in outputs:
        assert "VQ-VAE: resuming from epoch 3 " in output
        assert "Training on 2 replicas (CollectiveAllReduceStrategy, 2 workers" in output
    assert "Run folder:" in chief and "Worker 1: done" in worker
    # The workers end with the same weights, and they are the chief's newest checkpoint's.
    assert last_fingerprint(worker) == last_fingerprint(chief) == (4, checkpoint_fingerprint(run))
    # Only the chief wrote, into the run folder; the worker's temporary folder is gone.
    assert sorted(p.name for p in (run / "checkpoints" / "vqvae").glob("*.index")) == [
        "ckpt-3.index",
        "ckpt-4.index",
    ]
    assert sorted(p.name for p in run.iterdir()) == before
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]
    assert [list(folder.iterdir()) for folder in scratch] == [[], []]
    meta = json.loads((run / "vqvae.json").read_text())  # the best epoch's, and how it trained
    assert meta["trained_with"] == (
        {"strategy": "multiworker", "replicas": 2, "workers": 2}
        if meta["epoch"] == 4
        else {"strategy": "auto: none", "replicas": 1, "workers": 1}
    )


# -- Mixed precision -----------------------------------------------------------------------------
@pytest.mark.large
def test_mixed_precision_keeps_the_codebook_and_losses_float32(tiny_adni, tmp_path):
    import tensorflow as tf

    from keras_vqpix.run_folder import load_vqvae
    from keras_vqpix.training.callbacks import read_history

    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, train_args(tiny_adni, run, 1, "--strategy", "none", "--mixed-precision")
    )
    assert result.exit_code == 0, result.output
    assert "precision mixed_bfloat16" in result.output  # CPU: bfloat16
    assert json.loads((run / "config.json").read_text())["precision"] == "mixed_bfloat16"
    rows = read_history(run / "history.csv")
    assert rows and all(np.isfinite(row[name]) for row in rows for name in row if "loss" in name)
    reader = tf.train.load_checkpoint(str(run / "checkpoints" / "vqvae"))
    dtypes = reader.get_variable_to_dtype_map()
    quantizer = [name for name in dtypes if name.startswith("model/quantizer/")]
    assert quantizer and all(dtypes[name] == tf.float32 for name in quantizer)
    # The saved model is a float32 twin: evaluation and export do not depend on the precision.
    model, _, _ = load_vqvae(run)
    assert model.dtype_policy.name == "float32"

    # A run resumes only with the precision it began with.
    again = CliRunner().invoke(main, train_args(tiny_adni, run, 1, "--strategy", "none"))
    assert again.exit_code == 2, again.output
    assert "precision: 'mixed_bfloat16' there, 'float32' here" in again.output


def test_mixed_precision_computes_in_low_precision_around_float32_parts():
    import keras
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.training.distribute import LossScaleOptimizer
    from keras_vqpix.training.prior_training import build_prior
    from keras_vqpix.training.vqvae_training import build_vqvae

    config = get_config("quick")
    for precision, low in (("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")):
        model = build_vqvae(config.replace(precision=precision))
        assert model.encoder.stem.compute_dtype == low
        assert model.quantizer.compute_dtype == "float32"
        assert model.quantizer.embeddings.dtype == "float32"
        assert model.decoder.output_conv.compute_dtype == "float32"
        outputs = model(tf.random.uniform((2, 32, 32, 1)), training=False)
        assert outputs["reconstruction"].dtype == tf.float32
        assert outputs["vq_loss"].dtype == tf.float32
        # float16 needs loss scaling, bfloat16 (float32's exponent range) does not.
        assert isinstance(model.optimizer, LossScaleOptimizer) == (low == "float16")
        prior = build_prior(config.replace(precision=precision))
        assert isinstance(prior.optimizer, LossScaleOptimizer) == (low == "float16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone


# -- Options -------------------------------------------------------------------------------------
BAD_TF_CONFIGS = {
    "missing": (None, "needs the TF_CONFIG environment variable"),
    "not JSON": ("{cluster", "TF_CONFIG is not valid JSON"),
    "no task": ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'needs a "cluster" and a "task"'),
    "task not in the cluster": (
        '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
        "is not in its cluster",
    ),
    "parameter servers": (
        '{"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}',
        "only chief and worker jobs",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TF_CONFIGS))
def test_multiworker_without_a_valid_tf_config_exits_2_naming_the_option(
    case, tiny_adni, tmp_path, monkeypatch
):
    tf_config, message = BAD_TF_CONFIGS[case]
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, train_args(tiny_adni, out, 1, "--strategy", "multiworker"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "--strategy" in lines[0] and message in lines[0], result.output
    assert not out.exists()


def test_train_help_lists_the_distribution_options():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for text in ("--strategy", "multiworker", "--mixed-precision"):
        assert text in result.output


def test_the_chief_is_the_chief_job_or_else_worker_0():
    from types import SimpleNamespace

    from keras_vqpix.training.distribute import Cluster

    def cluster(jobs, task_type, task_id):
        spec = SimpleNamespace(jobs=jobs)
        strategy = SimpleNamespace(cluster_resolver=SimpleNamespace(cluster_spec=lambda: spec))
        return Cluster(strategy, "multiworker", task_type, task_id, 3)

    assert cluster(["worker"], "worker", 0).is_chief
    assert not cluster(["worker"], "worker", 1).is_chief
    assert cluster(["chief", "worker"], "chief", 0).is_chief
    assert not cluster(["chief", "worker"], "worker", 0).is_chief
