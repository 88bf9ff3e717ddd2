"""Training: one entry point, `train_run`, for the VQ-VAE stage, the prior stage, or both."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits, discover_splits, display_path, slice_frame
from keras_vqpix.io import atomic_write_text
from keras_vqpix.training.artifacts import (
    LOCK_NAME,
    RunFolderError,
    RunPaths,
    check_run_folder,
    prepare_run_folder,
    read_config,
    read_json,
    run_folder_lock,
    write_json,
)

STAGES = ("vqvae", "prior", "all")


class DistributedRunError(RuntimeError):
    """Another worker of a multi-worker run failed or refused, or the workers disagree."""


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


def split_record(splits: DataSplits) -> dict:
    """The patients of each split, as saved in `split.json`."""
    return {
        name: sorted({r.patient for r in getattr(splits, name)})
        for name in ("train", "validation", "test")
    }


def load_splits(
    data_root: str | os.PathLike, config: RunConfig, paths: RunPaths | None = None
) -> DataSplits:
    """The run's data splits; when the run folder recorded its split, the data must match it.

    Files that cannot be read are left out (and listed in `DataSplits.skipped`).
    """
    splits = discover_splits(
        data_root, config.data.validation_fraction, config.seed, skip_unreadable=True
    )
    if paths is not None and paths.split.is_file():
        recorded = read_json(paths.split)
        if {k: recorded.get(k) for k in ("train", "validation", "test")} != split_record(splits):
            raise RunFolderError(
                f"the patients in {data_root} differ from those {paths.root} was trained on ({paths.split}); "
                "pass the run's original --data"
            )
    return splits


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
    from keras_vqpix.training.distribute import single_process

    started = time.time()
    cluster = cluster or single_process()
    if cluster.name not in ("none", "auto: none") or config.precision != "float32":
        log(cluster.describe(config.data.batch_size, config.precision))
    paths = RunPaths(Path(run_dir))
    if not cluster.is_chief:
        return _train_as_worker(paths, data_root, config, stage, cluster, verbose, log, started)
    with contextlib.ExitStack() as stack:
        try:
            splits = _claim_run_folder(stack, paths, data_root, config, stage, overwrite, log)
        except BaseException:
            cluster.all_ready(False)  # release the workers waiting for the run folder
            raise
        cluster.all_ready(True)  # the run folder is ready: the workers copy it
        if not cluster.all_ready(True):
            raise DistributedRunError(
                "a worker could not start (see its messages); nothing was trained"
            )
        result = _train_stages(paths, splits, config, stage, cluster, verbose, log)
        cluster.all_ready(True)  # the workers wait for the chief's reports (see _train_as_worker)
    result.seconds = time.time() - started
    return result


def _claim_run_folder(stack, paths, data_root, config, stage, overwrite, log) -> DataSplits:
    """Check the run folder and the data, lock the folder (until `stack` closes), prepare it."""
    if stage == "prior":
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


def _train_as_worker(paths, data_root, config, stage, cluster, verbose, log, started):
    """A worker other than the chief: train in step with it, in a temporary copy of its run folder.

    The copy is taken once the chief has prepared the run folder and before it writes again
    (both wait at barriers), so every worker resumes from exactly the chief's state.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"vqpix-{cluster.task.replace(' ', '')}-"))
    try:
        if not cluster.all_ready(True):
            raise DistributedRunError(
                f"the chief could not prepare {paths.root} (see its messages); nothing was trained"
            )
        own = RunPaths(scratch / "run")
        try:
            if paths.root.is_dir():
                shutil.copytree(
                    paths.root,
                    own.root,
                    ignore=lambda folder, names: [
                        n for n in names if n in _NOT_COPIED or n.startswith(".")
                    ],
                )
            splits = load_splits(data_root, config, own if own.split.is_file() else None)
            prepare_run_folder(own, config)
        except BaseException:
            cluster.all_ready(False)
            raise
        if not cluster.all_ready(True):
            raise DistributedRunError(
                "another worker could not start (see its messages); nothing was trained"
            )
        with run_folder_lock(own):
            result = _train_stages(own, splits, config, stage, cluster, verbose, log)
        # Stay until the chief has written its plots and test figures: a worker that leaves
        # first is reported by TensorFlow's coordination service as crashed.
        cluster.all_ready(True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.task = cluster.task
    result.seconds = time.time() - started
    return result


def _train_stages(paths, splits, config, stage, cluster, verbose, log) -> TrainResult:
    result = TrainResult(paths.root, [])
    if stage in ("vqvae", "all"):
        from keras_vqpix.training.vqvae_training import train_vqvae

        result.vqvae = train_vqvae(paths, splits, config, cluster=cluster, verbose=verbose, log=log)
        result.stages.append("vqvae")
    if stage in ("prior", "all"):
        from keras_vqpix.training.prior_training import train_prior

        result.prior = train_prior(paths, splits, config, cluster=cluster, verbose=verbose, log=log)
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
