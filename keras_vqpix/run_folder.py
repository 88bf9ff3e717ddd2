"""The run folder: where each artifact lives, its JSON, fingerprints, loading the saved models,
the recorded split, and refusing to clobber other runs.

A low-level module: training writes a run folder, and sampling, evaluation, sample quality and
export read one, all through the functions here (`training/` only trains).

```
RUN/config.json            the RunConfig that made the run
RUN/split.json             patients of train / validation / test
RUN/vqvae.keras            best VQ-VAE by validation SSIM
RUN/vqvae.json             its epoch, validation SSIM and fingerprint
RUN/history.csv            VQ-VAE metrics per epoch
RUN/checkpoints/vqvae/     last complete epochs (model + optimizer), for resuming
RUN/logs/vqvae/            TensorBoard
RUN/plots/*.png            curves, reconstructions, codebook usage, samples
RUN/codes/*.npz            cached code maps of each split (with the VQ-VAE fingerprint)
RUN/noise.json             acquisition-noise levels of the training slices, fitted for `vqpix
                           generate` on first use (with the VQ-VAE fingerprint they belong to)
RUN/noise_square.json      the same at the model's resolution, for `vqpix export`
RUN/skipped_files.txt      data files that cannot be read, left out (only when there are any)
RUN/.lock                  held by the `vqpix train` working in the folder
RUN/prior.keras            best PixelCNN prior by validation bits per code
RUN/prior.json             its epoch, validation and test bits per code, fingerprint, and the
                           fingerprint of the VQ-VAE whose codes it learnt (`load_prior` checks it)
RUN/prior_history.csv      prior metrics per epoch
RUN/checkpoints/prior/     last complete prior epochs, and the VQ-VAE fingerprint they belong to
RUN/logs/prior/            TensorBoard
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_vqpix.config import RunConfig
from keras_vqpix.data.discover import DataSplits, discover_splits
from keras_vqpix.io import atomic_path, atomic_write_text


class RunFolderError(ValueError):
    """The run folder holds something else, or lacks what a step needs."""


@dataclass(frozen=True)
class RunPaths:
    """Paths inside a run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    split = property(lambda self: self.root / "split.json")
    vqvae_model = property(lambda self: self.root / "vqvae.keras")
    vqvae_meta = property(lambda self: self.root / "vqvae.json")
    history = property(lambda self: self.root / "history.csv")
    vqvae_checkpoints = property(lambda self: self.root / "checkpoints" / "vqvae")
    vqvae_logs = property(lambda self: self.root / "logs" / "vqvae")
    plots = property(lambda self: self.root / "plots")
    codes = property(lambda self: self.root / "codes")
    skipped_files = property(lambda self: self.root / "skipped_files.txt")
    noise = property(lambda self: self.root / "noise.json")
    noise_square = property(lambda self: self.root / "noise_square.json")
    prior_model = property(lambda self: self.root / "prior.keras")
    prior_meta = property(lambda self: self.root / "prior.json")
    prior_history = property(lambda self: self.root / "prior_history.csv")
    prior_checkpoints = property(lambda self: self.root / "checkpoints" / "prior")
    prior_logs = property(lambda self: self.root / "logs" / "prior")


# Fields a user may change when continuing a run (train longer); everything else must match.
RESUMABLE_FIELDS = {"vqvae.epochs", "prior.epochs"}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted names of the fields where two configs differ."""
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def read_config(paths: RunPaths) -> RunConfig:
    """The run's config; a clear error when the folder is not a run."""
    if not paths.config.is_file():
        raise RunFolderError(
            f"{paths.root} is not a run folder (no config.json); train one with `vqpix train --out {paths.root}`"
        )
    try:
        return RunConfig.from_json(paths.config.read_text())
    except (ValueError, TypeError) as error:
        raise RunFolderError(f"{paths.config} is not a valid run config: {error}") from error


def check_run_folder(paths: RunPaths, config: RunConfig, *, overwrite: bool = False) -> bool:
    """Whether `config` may train in `paths.root`; True when an earlier run of it is there.

    Reads only. A folder holding a run of a different config is refused (unless `overwrite`),
    so a typo in `--out` never clobbers finished work; differences only in epochs are allowed
    (train longer). A non-empty folder that holds no run is refused too.

    Raises:
        RunFolderError: naming the differing fields with both values, and how to go on.
    """
    if paths.root.exists() and not paths.root.is_dir():
        raise RunFolderError(f"--out {paths.root} is a file; choose a folder")
    if overwrite or not paths.root.is_dir():
        return False
    if not paths.config.is_file():
        if any(not p.name.startswith(".") for p in paths.root.iterdir()):
            raise RunFolderError(
                f"--out {paths.root} exists, is not empty and holds no run; choose another folder or pass --overwrite"
            )
        return False
    old = read_config(paths)
    differences = [d for d in config_differences(old, config) if d not in RESUMABLE_FIELDS]
    if differences:
        flat_old, flat_new = _flatten(old.to_dict()), _flatten(config.to_dict())
        shown = "; ".join(
            f"{name}: {flat_old.get(name)!r} there, {flat_new.get(name)!r} here"
            for name in differences[:3]
        ) + ("; ..." if len(differences) > 3 else "")
        raise RunFolderError(
            f"--out {paths.root} holds a run of another config ({shown}); "
            "repeat its options to resume it, choose another --out, or pass --overwrite to replace it"
        )
    return True


def prepare_run_folder(paths: RunPaths, config: RunConfig, *, overwrite: bool = False) -> bool:
    """Claim `paths.root` for `config`; True when an earlier run of the same config is there.

    Checks as `check_run_folder`; with `overwrite`, the folder's contents are moved into a
    hidden folder inside it and deleted, `config.json` first (a kill midway leaves a folder that
    no longer claims the old run, never a mix of two runs). The lock file stays, so call this
    holding `run_folder_lock`.
    """
    resuming = check_run_folder(paths, config, overwrite=overwrite)
    if overwrite and paths.root.is_dir():
        trash = Path(tempfile.mkdtemp(prefix=".overwritten.", dir=paths.root))
        for entry in sorted(paths.root.iterdir(), key=lambda p: p.name != paths.config.name):
            if entry.name != LOCK_NAME and entry != trash:
                os.replace(entry, trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, config.to_json())
    return resuming


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folder_lock(paths: RunPaths) -> Iterator[None]:
    """Hold an exclusive lock on the run folder (`RUN/.lock`, created with the folder).

    A second `vqpix train` on the same folder is refused instead of interleaving its
    checkpoints with the first one's. The kernel drops the lock when its process ends, even by
    SIGKILL, so a killed run never leaves a stale lock behind. (No lock where `fcntl` is
    missing, i.e. on Windows.)

    Raises:
        RunFolderError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderError(
                f"--out {paths.root} is in use by another vqpix train; wait for it to finish or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights (in order: shapes and values): which VQ-VAE a prior belongs to.

    Variable paths are left out: Keras prefixes them differently before and after a reload.
    """
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.asarray(variable.numpy())
        digest.update(str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def fingerprint_number(fingerprint: str) -> int:
    """The first 52 bits of a fingerprint as an integer (exact in a float64, for comparisons)."""
    return int(fingerprint[:13], 16)


def write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_text(
        path, json.dumps(values, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_model(model, path: Path) -> None:
    """`model.save(path)` written to a temporary sibling, then renamed into place."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def load_vqvae(run_dir: str | os.PathLike):
    """The run's best VQ-VAE, its config and its metadata (with a verified fingerprint)."""
    import keras

    from keras_vqpix.models import vqvae  # noqa: F401  (registers the classes for loading)

    paths = RunPaths(run_dir)
    config = read_config(paths)
    if not paths.vqvae_model.is_file() or not paths.vqvae_meta.is_file():
        raise RunFolderError(
            f"{paths.root} has no trained VQ-VAE yet; run `vqpix train --out {paths.root} --stage vqvae`"
        )
    model = keras.saving.load_model(paths.vqvae_model, compile=False)
    meta = read_json(paths.vqvae_meta)
    fingerprint = weights_fingerprint(model)
    if meta.get("fingerprint") != fingerprint:
        raise RunFolderError(
            f"{paths.vqvae_model} does not match {paths.vqvae_meta} (fingerprint {fingerprint} != {meta.get('fingerprint')}); "
            "the file was replaced or is damaged"
        )
    return model, config, meta


def load_prior(run_dir: str | os.PathLike, vqvae_meta: dict[str, Any] | None = None):
    """The run's best prior and its metadata; refuses a prior trained on another VQ-VAE.

    `prior.json` records the fingerprint of the VQ-VAE whose codes the prior learnt; when
    `vqvae.keras` was retrained or replaced since, the prior's codes mean something else and
    sampling from it would decode noise, so this raises a one-line `RunFolderError`.

    Args:
        run_dir: the run folder.
        vqvae_meta: the metadata `load_vqvae` returned for the VQ-VAE in use (its fingerprint
            verified against the file); default: the run's VQ-VAE is loaded and verified here.

    Returns:
        `(prior, prior_meta)`.
    """
    import keras

    from keras_vqpix.models import pixelcnn  # noqa: F401  (registers the classes for loading)

    paths = RunPaths(run_dir)
    if not paths.prior_model.is_file() or not paths.prior_meta.is_file():
        raise RunFolderError(
            f"{paths.root} has no trained prior yet; run `vqpix train --out {paths.root} --stage prior`"
        )
    if vqvae_meta is None:
        _, _, vqvae_meta = load_vqvae(paths.root)
    meta = read_json(paths.prior_meta)
    trained_on, current = meta.get("vqvae_fingerprint"), vqvae_meta.get("fingerprint")
    if trained_on != current:
        raise RunFolderError(
            f"{paths.prior_model} was trained on the codes of VQ-VAE {trained_on}, but {paths.vqvae_model} is "
            f"now {current} (retrained or replaced); retrain the prior with `vqpix train --out {paths.root} --stage prior`"
        )
    model = keras.saving.load_model(paths.prior_model, compile=False)
    fingerprint = weights_fingerprint(model)
    if meta.get("fingerprint") != fingerprint:
        raise RunFolderError(
            f"{paths.prior_model} does not match {paths.prior_meta} (fingerprint {fingerprint} != {meta.get('fingerprint')}); "
            "the file was replaced or is damaged"
        )
    return model, meta


# -- The recorded split ------------------------------------------------------------------------
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
    from keras_vqpix.data.screen import unreadable_files

    splits = discover_splits(
        data_root, config.data.validation_fraction, config.seed, unreadable=unreadable_files
    )
    if paths is not None and paths.split.is_file():
        recorded = read_json(paths.split)
        if {k: recorded.get(k) for k in ("train", "validation", "test")} != split_record(splits):
            raise RunFolderError(
                f"the patients in {data_root} differ from those {paths.root} was trained on ({paths.split}); "
                "pass the run's original --data"
            )
    return splits
