"""`train_run`: the entry point that trains the VQ-VAE stage, the prior stage, or both, in a run folder.

Several workers (`tf.distribute.MultiWorkerMirroredStrategy`) train in step. Only the chief
writes into the run folder; every other worker trains in a temporary copy of it. They meet at
three named barriers, each a function below that every worker calls once, in this order:

1. `run_folder_prepared`: the chief has checked, locked and prepared the run folder (or failed:
   then every worker stops); the workers copy it now.
2. `workers_started`: every worker holds its copy and its data (or one failed: all stop).
3. `chief_finished`: the chief has written its plots and test figures; the workers leave only
   then (a worker that leaves first is reported by TensorFlow's coordination service as crashed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits, display_path, slice_frame
from keras_vqpix.io import atomic_write_text
from keras_vqpix.run_folder import (
    LOCK_NAME,
    RunFolderError,
    RunPaths,
    check_run_folder,
    load_splits,
    prepare_run_folder,
    read_config,
    run_folder_lock,
    split_record,
    write_json,
)
from keras_vqpix.training.distribute import Cluster, DistributedRunError, single_process

STAGES = ("vqvae", "prior", "all")


@dataclass
class TrainResult:
    """What a `train_run` call produced."""

    run_dir: Path
    stages: list[str]
    vqvae: dict = field(default_factory=dict)
    prior: dict = field(default_factory=dict)
    seconds: float = 0.0
    task: str = ""  # "worker 1" for a worker that is not the chief (its run_dir is gone)

    def summary(self) -> str:
        if self.task:
            head = f"{self.task.capitalize()}: done ({self.seconds:.0f} s); the chief's run folder holds the run"
        else:
            head = f"Run folder: {self.run_dir} ({self.seconds:.0f} s)"
        lines = [head]
        if self.vqvae:
            lines.append(
                f"VQ-VAE: best epoch {self.vqvae.get('epoch')}, validation brain SSIM {self.vqvae.get('val_ssim_foreground', float('nan')):.4f} (weights {self.vqvae.get('fingerprint')})"
                + _last(self.vqvae)
            )
        if self.prior:
            lines.append(
                f"Prior: best epoch {self.prior.get('epoch')}, validation {self.prior.get('val_bits_per_code', float('nan')):.3f} bits per code (weights {self.prior.get('fingerprint')})"
                + _last(self.prior)
            )
        return "\n".join(lines)


def _last(meta: dict) -> str:
    if "last_epoch" not in meta:
        return ""
    return f"; last epoch {meta['last_epoch']} (weights {meta['last_fingerprint']})"


def train_run(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    config: RunConfig,
    *,
    stage: str = "all",
    overwrite: bool = False,
    verbose: int | str = "auto",
    log=print,
    cluster=None,
) -> TrainResult:
    """Train the stages of a run in `run_dir` on `data_root`; resume what an earlier call began.

    Args:
        run_dir: the run folder (created; a folder of another config is refused).
        data_root: ADNI-layout data folder.
        config: the run's config (for `stage="prior"` on an existing run, its own config).
        stage: "vqvae", "prior" or "all".
        overwrite: replace a run of another config instead of refusing.
        verbose: Keras `fit` verbosity.
        log: where progress messages go.
        cluster: the `keras_vqpix.training.distribute.Cluster` to train with (default: one
            device). Under several workers every worker calls `train_run` with the same
            arguments; only the chief writes into `run_dir`, the others into temporary folders
            of their own, removed at the end.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}. Received: stage={stage!r}")
    started = time.time()
    cluster = cluster or single_process()
    if cluster.name not in ("none", "auto: none") or config.precision != "float32":
        log(cluster.describe(config.data.batch_size, config.precision))
    job = _Job(RunPaths(Path(run_dir)), data_root, config, stage, cluster, verbose, log)
    if not cluster.is_chief:
        result = _train_as_worker(job)
        result.task = cluster.task
    else:
        result = _train_as_chief(job, overwrite)
    result.seconds = time.time() - started
    return result


# -- The barriers of the multi-worker protocol (module docstring); no-ops for one process ---------
def run_folder_prepared(cluster: Cluster, ready: bool) -> bool:
    """Barrier 1: whether the chief prepared the run folder (the chief says, workers say True)."""
    return cluster.all_ready(ready)


def workers_started(cluster: Cluster, ready: bool) -> bool:
    """Barrier 2: whether every worker holds its copy of the run folder and its data."""
    return cluster.all_ready(ready)


def chief_finished(cluster: Cluster) -> None:
    """Barrier 3: the chief has written its reports; every worker waits for it before leaving."""
    cluster.all_ready(True)


@dataclass(frozen=True)
class _Job:
    """What every worker of a `train_run` call trains (the same on all of them)."""

    paths: RunPaths
    data_root: str | os.PathLike
    config: RunConfig
    stage: str
    cluster: Cluster
    verbose: int | str
    log: Callable[[str], object]


def _train_as_chief(job: _Job, overwrite: bool) -> TrainResult:
    """The process that owns the run folder (the only one without several workers)."""
    with contextlib.ExitStack() as stack:
        try:
            splits = _claim_run_folder(stack, job, overwrite)
        except BaseException:
            run_folder_prepared(job.cluster, False)  # release the workers waiting for it
            raise
        run_folder_prepared(job.cluster, True)
        if not workers_started(job.cluster, True):
            raise DistributedRunError(
                "a worker could not start (see its messages); nothing was trained"
            )
        result = _train_stages(job, job.paths, splits)
        chief_finished(job.cluster)
    return result


def _claim_run_folder(stack: contextlib.ExitStack, job: _Job, overwrite: bool) -> DataSplits:
    """Check the run folder and the data, lock the folder (until `stack` closes), prepare it."""
    paths, data_root, config, log = job.paths, job.data_root, job.config, job.log
    if job.stage == "prior":
        existing = read_config(paths)
        if existing.to_dict() | {"prior": None} != config.to_dict() | {"prior": None}:
            raise RunFolderError(
                f"--stage prior trains on the VQ-VAE of {paths.root}; its config differs from the one given"
            )
    # Everything is checked before anything is written: a refused run leaves no trace.
    check_run_folder(paths, config, overwrite=overwrite)
    splits = load_splits(
        data_root, config, paths if paths.config.is_file() and not overwrite else None
    )
    stack.enter_context(run_folder_lock(paths))
    prepare_run_folder(paths, config, overwrite=overwrite)
    write_json(
        paths.split,
        {
            **split_record(splits),
            "data": str(Path(data_root).resolve()),
            # The source slices' (width, height): `vqpix generate` writes slices back in it.
            "frame": slice_frame(splits.train),
            "summary": splits.summary(),
        },
    )
    report_skipped(paths, splits, data_root, log)
    return splits


# What a worker copies from the chief's run folder: everything a resumed run reads.
_NOT_COPIED = {"logs", "plots", LOCK_NAME, "skipped_files.txt"}


def _train_as_worker(job: _Job) -> TrainResult:
    """A worker other than the chief: train in step with it, in a temporary copy of its run folder.

    The copy is taken once the chief has prepared the run folder and before it writes again
    (both wait at barriers), so every worker resumes from exactly the chief's state.
    """
    cluster = job.cluster
    scratch = Path(tempfile.mkdtemp(prefix=f"vqpix-{cluster.task.replace(' ', '')}-"))
    try:
        if not run_folder_prepared(cluster, True):
            raise DistributedRunError(
                f"the chief could not prepare {job.paths.root} (see its messages); nothing was trained"
            )
        own = RunPaths(scratch / "run")
        try:
            if job.paths.root.is_dir():
                shutil.copytree(
                    job.paths.root,
                    own.root,
                    ignore=lambda folder, names: [
                        n for n in names if n in _NOT_COPIED or n.startswith(".")
                    ],
                )
            splits = load_splits(job.data_root, job.config, own if own.split.is_file() else None)
            prepare_run_folder(own, job.config)
        except BaseException:
            workers_started(cluster, False)
            raise
        if not workers_started(cluster, True):
            raise DistributedRunError(
                "another worker could not start (see its messages); nothing was trained"
            )
        with run_folder_lock(own):
            result = _train_stages(job, own, splits)
        chief_finished(cluster)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _train_stages(job: _Job, paths: RunPaths, splits: DataSplits) -> TrainResult:
    """Train the job's stages in `paths` (the run folder, or a worker's copy of it)."""
    result = TrainResult(paths.root, [])
    options = {"cluster": job.cluster, "verbose": job.verbose, "log": job.log}
    if job.stage in ("vqvae", "all"):
        from keras_vqpix.training.vqvae_training import train_vqvae

        result.vqvae = train_vqvae(paths, splits, job.config, **options)
        result.stages.append("vqvae")
    if job.stage in ("prior", "all"):
        from keras_vqpix.training.prior_training import train_prior

        result.prior = train_prior(paths, splits, job.config, **options)
        result.stages.append("prior")
    return result


def report_skipped(
    paths: RunPaths, splits: DataSplits, data_root: str | os.PathLike, log=print, shown: int = 5
) -> None:
    """Warn in one line about unreadable files left out, and list them in `RUN/skipped_files.txt`.

    The list is rewritten on every run (removed when nothing is skipped), so it always describes
    the data the last run used.
    """
    if not splits.skipped:
        paths.skipped_files.unlink(missing_ok=True)
        return
    root = Path(data_root)

    def name(path: str) -> str:
        return display_path(
            os.path.relpath(path, root) if Path(path).is_relative_to(root) else path
        )

    atomic_write_text(
        paths.skipped_files,
        f"# Files under {display_path(root.resolve())} left out of this run: they cannot be read\n"
        + "".join(f"{name(path)}\t{reason}\n" for path, reason in splits.skipped),
    )
    total = len(splits.skipped) + sum(
        len(getattr(splits, s)) for s in ("train", "validation", "test")
    )
    listed = ", ".join(f"{name(path)} ({reason})" for path, reason in splits.skipped[:shown])
    more = f", and {len(splits.skipped) - shown} more" if len(splits.skipped) > shown else ""
    log(
        f"warning: skipped {len(splits.skipped)} of {total} image files that cannot be read "
        f"(all listed in {paths.skipped_files}): {listed}{more}"
    )
