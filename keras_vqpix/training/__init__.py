"""Training: one entry point, `train_run`, for the VQ-VAE stage, the prior stage, or both."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits, discover_splits
from keras_vqpix.training.artifacts import (
    RunFolderError,
    RunPaths,
    prepare_run_folder,
    read_config,
    read_json,
    write_json,
)

STAGES = ("vqvae", "prior", "all")


@dataclass
class TrainResult:
    """What a `train_run` call produced."""

    run_dir: Path
    stages: list[str]
    vqvae: dict = field(default_factory=dict)
    prior: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"Run folder: {self.run_dir} ({self.seconds:.0f} s)"]
        if self.vqvae:
            lines.append(
                f"VQ-VAE: best epoch {self.vqvae.get('epoch')}, validation brain SSIM {self.vqvae.get('val_ssim_foreground', float('nan')):.4f}"
            )
        if self.prior:
            lines.append(
                f"Prior: best epoch {self.prior.get('epoch')}, validation {self.prior.get('val_bits_per_code', float('nan')):.3f} bits per code"
            )
        return "\n".join(lines)


def split_record(splits: DataSplits) -> dict:
    """The patients of each split, as saved in `split.json`."""
    return {
        name: sorted({r.patient for r in getattr(splits, name)})
        for name in ("train", "validation", "test")
    }


def load_splits(
    data_root: str | os.PathLike, config: RunConfig, paths: RunPaths | None = None
) -> DataSplits:
    """The run's data splits; when the run folder recorded its split, the data must match it."""
    splits = discover_splits(data_root, config.data.validation_fraction, config.seed)
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
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}. Received: stage={stage!r}")
    started = time.time()
    paths = RunPaths(Path(run_dir))
    if stage == "prior":
        existing = read_config(paths)
        if existing.to_dict() | {"prior": None} != config.to_dict() | {"prior": None}:
            raise RunFolderError(
                f"--stage prior trains on the VQ-VAE of {paths.root}; its config differs from the one given"
            )
    splits = load_splits(
        data_root, config, paths if paths.config.is_file() and not overwrite else None
    )
    prepare_run_folder(paths, config, overwrite=overwrite)
    write_json(
        paths.split,
        {
            **split_record(splits),
            "data": str(Path(data_root).resolve()),
            "summary": splits.summary(),
        },
    )
    result = TrainResult(paths.root, [])
    if stage in ("vqvae", "all"):
        from keras_vqpix.training.vqvae_training import train_vqvae

        result.vqvae = train_vqvae(paths, splits, config, verbose=verbose, log=log)
        result.stages.append("vqvae")
    if stage in ("prior", "all"):
        from keras_vqpix.training.prior_training import train_prior

        result.prior = train_prior(paths, splits, config, verbose=verbose, log=log)
        result.stages.append("prior")
    result.seconds = time.time() - started
    return result
