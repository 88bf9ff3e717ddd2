"""Synthetic data sets in the ADNI layout: `vqpix generate RUN --out DIR [--reconstruct DATA]`.

`generate_dataset` samples code maps from a run's conditional prior (`sample_codes`), decodes
them (`decode_codes`) and writes `DIR/{train,test}/{AD,NC}/<patient>_<slice>.jpeg`, 8-bit
grayscale, the layout `discover_splits` reads, so `vqpix train --data DIR` and
`vqpix compare DIR --real DATA` take it unchanged. `reconstruct_dataset` writes the VQ-VAE
round trip of a real data set the same way (`vqpix compare SAMPLES --real RECONSTRUCTIONS`
then isolates the prior, `vqpix compare RECONSTRUCTIONS --real DATA` the decoder).

- Frame: by default the slices come back in the frame of the slices the run was trained on
  (`run_frame`): the aspect-ratio padding of `resize_with_pad` removed and resized to the
  source width x height (e.g. 256x240).
- Patients: by default sampled slices are drawn one at a time, so each is its own patient
  `syn<seed>-<class>-<number>` with slice number 0 (a slice-context prior draws each at a
  position of its own, `keras_vqpix.sampling.draw_positions`). With `slices_per_patient` S > 1
  (`vqpix generate --slices-per-patient S`), whole patients: S consecutive slices
  `syn<seed>-<class>-<number>_<0 .. S-1>.jpeg` drawn slice after slice by a prior that reads the
  previous slice (`keras_vqpix.sampling.sample_stacks`), and train/test split by patient.
  Reconstructions keep their source's patient and slice with the prefix `rec-`. Neither can be mistaken for an ADNI id
  (`002_S_0295`) or a demo id.
- Noise: by default the decoded slices get MRI acquisition noise (`keras_vqpix.noise`:
  Rician, one level per patient drawn from the run's training slices of its class, fitted on
  first use by `run_noise_levels` and cached in `RUN/noise.json`); `noise=False`
  (`--no-noise`) writes the decoder's noise-free means.
- Refined (`refine=F`, `--refine F`, single slices; by default 3 for single slices, off for
  whole patients: `config.GENERATE_REFINE`): F times as many maps are drawn and `per_class` of
  each class kept by discriminator resampling against the run's training slices
  (`keras_vqpix.refine`); each kept slice keeps the seed and map index of its draw.
- Reproducible: map `j` of batch `b` is drawn with the batch seed `batch_seed(seed, b)`; the
  same run, seed, temperature and counts give the same bytes. `manifest.csv` records every
  file's split, label, seed, map index and temperature (or source for reconstructions),
  `generator.json` the run, its fingerprints, the options and the command.
- Atomic: everything is written into a hidden sibling folder renamed to `DIR` at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_vqpix.config import GENERATE_PER_CLASS, GENERATE_REFINE, RefineConfig
from keras_vqpix.data.discover import (
    CLASS_NAMES,
    SliceRecord,
    discover_folder,
    slice_frame,
    spread_records,
)
from keras_vqpix.noise import FIT_VERSION, NoiseLevels, add_noise, fit_noise_level

BATCH_SIZE = 64
JPEG_QUALITY = 95
MANIFEST_COLUMNS = (
    "file",
    "split",
    "label",
    "patient",
    "seed",
    "map_index",
    "temperature",
    "source",
    "noise_brain",
    "noise_background",
)


@dataclass(frozen=True)
class GenerateSummary:
    """What a `generate_dataset` / `reconstruct_dataset` call wrote."""

    out_dir: Path
    counts: dict[str, dict[str, int]]
    frame: tuple[int, int]

    def format(self) -> str:
        total = sum(sum(c.values()) for c in self.counts.values())
        parts = ", ".join(
            f"{split} {'/'.join(f'{n} {name}' for name, n in counts.items())}"
            for split, counts in self.counts.items()
        )
        width, height = self.frame
        return f"Wrote {total} slices ({parts}) of {width}x{height} to {self.out_dir}"


# -- Frames ----------------------------------------------------------------------------------------
def run_frame(run_dir: str | os.PathLike) -> tuple[int, int]:
    """`(width, height)` of the source slices a run was trained on.

    Recorded in the run's `split.json` (`"frame"`) at training time; for runs trained before
    that, read from one slice of the data folder `split.json` names.
    """
    from keras_vqpix.run_folder import RunFolderError, RunPaths, read_json

    paths = RunPaths(Path(run_dir))
    if not paths.split.is_file():
        raise RunFolderError(f"{paths.root} has no split.json; train the run first")
    record = read_json(paths.split)
    if record.get("frame"):
        width, height = record["frame"]
        return int(width), int(height)
    data = Path(record.get("data", ""))
    try:
        frame = slice_frame(discover_folder(data, "train"))
    except ValueError:
        frame = None
    if frame is None:
        raise RunFolderError(
            f"{paths.split} records no frame and its data folder {data} cannot be read; pass --size WxH"
        )
    return frame


def padding_box(frame: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """`(top, left, height, width)` of a `frame` slice inside the padded square of `resize_with_pad`."""
    width, height = frame
    ratio = max(height / image_size, width / image_size)
    new_height = max(int(np.floor(height / ratio)), 1)
    new_width = max(int(np.floor(width / ratio)), 1)
    top = max(int(np.floor((image_size - height / ratio) / 2)), 0)
    left = max(int(np.floor((image_size - width / ratio) / 2)), 0)
    return top, left, new_height, new_width


def to_frame_float(images: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Square images `[n, S, S, 1]` in [0, 1] -> slices `[n, height, width]` of `frame`, float.

    The inverse of the input pipeline's `resize_with_pad`: crop the padding, then resize
    (bilinear, antialiased) to the frame.
    """
    import tensorflow as tf

    top, left, height, width = padding_box(frame, images.shape[1])
    cropped = images[:, top : top + height, left : left + width]
    resized = tf.image.resize(cropped, (frame[1], frame[0]), antialias=True).numpy()
    return np.clip(resized[..., 0], 0.0, 1.0)


def to_pixels(slices: np.ndarray) -> np.ndarray:
    """Slices in [0, 1] -> 8 bits."""
    return np.round(np.clip(slices, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_frame(images: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """`to_frame_float`, in 8 bits."""
    return to_pixels(to_frame_float(images, frame))


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def batch_seed(seed: int, batch: int) -> int:
    """The int32 sampling seed of batch `batch` of a data set generated with `seed`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, batch]).generate_state(1)[0] >> 1)


# -- Writing ---------------------------------------------------------------------------------------
def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _write_slices(tmp: Path, names: Sequence[tuple[str, str, str]], slices: np.ndarray) -> None:
    for (split, label, name), pixels in zip(names, slices, strict=True):
        folder = tmp / split / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg(pixels))


def _counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    return {
        split: {
            name: sum(r["split"] == split and r["label"] == name for r in rows)
            for name in CLASS_NAMES
        }
        for split in ("train", "test")
    }


# -- Acquisition noise -----------------------------------------------------------------------------
# The run's training slices the noise levels are fitted on, at most (spread over the patients).
NOISE_FIT_SLICES = 512


def _real_slice(path: str, frame: tuple[int, int]) -> np.ndarray:
    """One data file as `[height, width]` float in [0, 1], decoded as training decodes it."""
    import tensorflow as tf

    from keras_vqpix.data.decode import decode_grayscale

    image = decode_grayscale(tf.io.read_file(path))
    if tuple(image.shape[1::-1]) != tuple(frame):
        image = tf.image.resize(image, (frame[1], frame[0]), antialias=True)
    return image.numpy()[..., 0]


def _written_and_read(image: np.ndarray) -> np.ndarray:
    """A slice `[H, W]` as `generate_dataset` writes it, read back as training and compare read."""
    import tensorflow as tf

    from keras_vqpix.data.decode import decode_grayscale

    return decode_grayscale(tf.constant(_jpeg(to_pixels(image)))).numpy()[..., 0]


def run_noise_levels(
    run_dir: str | os.PathLike,
    *,
    batch_size: int = BATCH_SIZE,
    square: bool = False,
) -> NoiseLevels:
    """The run's `keras_vqpix.noise.NoiseLevels`, fitted on its training slices on first use.

    Up to `NOISE_FIT_SLICES` training slices (spread over the patients) and their VQ-VAE round
    trips, in the run's frame and stored as `generate_dataset` stores slices; with `square`,
    instead as the model sees them, the padded squares of the input pipeline, stored as float
    (the exported generator's `noisy_images`). Cached in `RUN/noise.json` (`RUN/noise_square.json`)
    with the VQ-VAE fingerprint, the resolution and the fit's version (refitted when any
    changed). A run folder that cannot be written to is fitted each time.
    """
    from keras_vqpix.io import atomic_write_text
    from keras_vqpix.run_folder import RunFolderError, RunPaths, load_vqvae, read_config, read_json

    paths = RunPaths(Path(run_dir))
    if not paths.vqvae_meta.is_file():
        raise RunFolderError(f"{paths.root} has no trained VQ-VAE yet")
    cache = paths.noise_square if square else paths.noise
    key = {
        "vqvae_fingerprint": read_json(paths.vqvae_meta).get("fingerprint"),
        "fit_version": FIT_VERSION,
    }
    if square:
        key["square"] = read_config(paths).data.image_size
    else:
        key["frame"] = list(run_frame(paths.root))
    if cache.is_file():
        # A cache, so a file that is not one (edited, another tool's) is fitted again.
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            cached = read_json(cache)
            if all(cached.get(k) == v for k, v in key.items()):
                return NoiseLevels.from_json(json.dumps(cached["levels"]))
    vqvae, config, vqvae_meta = load_vqvae(paths.root)
    key["vqvae_fingerprint"] = vqvae_meta.get("fingerprint")
    records = _training_records(
        paths, config, NOISE_FIT_SLICES, "the noise levels are fitted on", "pass --no-noise"
    )
    brain, background = [], []
    for first, images, means in _round_trips(vqvae, records, config.data.image_size, batch_size):
        if square:
            reals, means, store = images[..., 0], means[..., 0], _as_float
        else:
            frame = tuple(key["frame"])
            chunk = records[first : first + len(means)]
            reals = [_real_slice(record.path, frame) for record in chunk]
            means, store = to_frame_float(means, frame), _written_and_read
        for real, mean in zip(reals, means, strict=True):
            pair = fit_noise_level(real, mean, store=store)
            brain.append(pair[0])
            background.append(pair[1])
    levels = NoiseLevels(tuple(brain), tuple(background), tuple(r.label for r in records))
    # A read-only run keeps no cache: the fit is deterministic, so fitting again is the same.
    with contextlib.suppress(OSError):
        atomic_write_text(
            cache,
            json.dumps({**key, "levels": json.loads(levels.to_json())}, indent=2) + "\n",
        )
    return levels


def _training_records(
    paths, config, count: int, needs: str, instead: str, patients: Sequence[str] = ()
) -> list[SliceRecord]:
    """Up to `count` of the run's training slices (of `patients` only, when given), spread over
    the patients; when the data folder is gone or a patient is not in the training split, a
    one-line error saying what `needs` them and what to do `instead`."""
    from keras_vqpix.run_folder import RunFolderError, load_splits, read_json

    data = Path(read_json(paths.split).get("data", ""))
    if not data.is_dir():
        raise RunFolderError(
            f"{needs} the training slices of {paths.root} in {data}, which is missing; "
            f"restore it, or {instead}"
        )
    records = load_splits(data, config, paths).train
    if patients:
        wanted = set(patients)
        unknown = sorted(wanted - {r.patient for r in records})
        if unknown:
            raise RunFolderError(
                f"{needs} training patients of {paths.root} that its training split does not "
                f"have: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        records = [r for r in records if r.patient in wanted]
    return spread_records(records, count)


def _round_trips(
    vqvae, records: Sequence[SliceRecord], image_size: int, batch_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """`(first, images, reconstructions)` batch by batch: `records[first:]`'s images `[n, S, S,
    1]` as training reads them and their VQ-VAE round trips, NumPy."""
    import tensorflow as tf

    from keras_vqpix.data.pipeline import make_dataset

    reconstruct = tf.function(lambda images: vqvae(images, training=False)["reconstruction"])
    first = 0
    for images, _ in make_dataset(records, image_size, batch_size, cache=""):
        yield first, images.numpy(), reconstruct(images).numpy()
        first += len(images)


def _as_float(image: np.ndarray) -> np.ndarray:
    """A slice as the exported generator returns it: float32 in [0, 1], no storage."""
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _noise_columns(brain: float | None = None, background: float | None = None) -> dict:
    if brain is None:
        return {"noise_brain": "", "noise_background": ""}
    return {"noise_brain": f"{brain:.6f}", "noise_background": f"{background:.6f}"}


def _noise_record(paths, levels) -> dict | None:
    if levels is None:
        return None
    return {
        "levels": str(paths.noise.resolve()),
        "model": "Rician, one (brain, background) sigma pair per patient drawn from the run's "
        "training slices of its class (keras_vqpix.noise)",
        "per_class": {CLASS_NAMES[int(k)]: v for k, v in levels.summary().items()},
    }


def _run_record(paths, vqvae_meta: dict, prior_meta: dict | None, config) -> dict:
    record = {
        "run": str(paths.root.resolve()),
        "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
        "vqvae_epoch": vqvae_meta.get("epoch"),
        "image_size": config.data.image_size,
        "run_config": config.to_dict(),
    }
    if prior_meta is not None:
        record.update(
            prior_fingerprint=prior_meta.get("fingerprint"), prior_epoch=prior_meta.get("epoch")
        )
    return record


# -- Discriminator resampling (--refine) -----------------------------------------------------------
@dataclass
class _Draw:
    """Code maps `[n, S, h, w]` with each map's label, batch seed and index in its batch."""

    codes: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    map_index: np.ndarray

    def take(self, index) -> _Draw:
        return _Draw(
            self.codes[index], self.labels[index], self.seeds[index], self.map_index[index]
        )

    @staticmethod
    def join(parts: Sequence[_Draw]) -> _Draw:
        return _Draw(
            *(
                np.concatenate([getattr(p, name) for p in parts])
                for name in ("codes", "labels", "seeds", "map_index")
            )
        )


@dataclass
class _Refined:
    kept: _Draw
    record: dict


def _rebatched(draw: _Draw, batch_size: int) -> Iterator[_Draw]:
    for start in range(0, len(draw.labels), batch_size):
        yield draw.take(slice(start, start + batch_size))


def _refine(
    paths,
    vqvae,
    config,
    draws: Iterator[_Draw],
    labels: np.ndarray,
    per_class: int,
    seed: int,
    batch_size: int,
    refine_config: RefineConfig,
    on_progress: Callable[[int, int], None] | None,
) -> _Refined:
    """Keep `per_class` of the candidate maps `draws` of each class (`keras_vqpix.refine`)."""
    from keras_vqpix.compare import area_downsampled
    from keras_vqpix.refine import (
        class_log_density_ratio,
        log_density_ratio,
        resample,
        view_factor,
    )
    from keras_vqpix.sampling import decode_codes

    real_records = _training_records(
        paths,
        config,
        refine_config.real_slices,
        "--refine weighs the samples against",
        "leave out --refine",
        refine_config.patients,
    )
    factor = view_factor(config.data.image_size, refine_config)
    parts: list[_Draw] = []
    views = []
    drawn = 0
    for draw in draws:
        parts.append(draw)
        views.append(area_downsampled(decode_codes(vqvae, draw.codes[:, 0]), factor))
        drawn += len(draw.labels)
        if on_progress is not None:
            on_progress(drawn, len(labels))
    real = np.concatenate(
        [
            area_downsampled(means, factor)
            for _, _, means in _round_trips(vqvae, real_records, config.data.image_size, batch_size)
        ]
    )
    if refine_config.by_class:
        real_labels = np.array([r.label for r in real_records])
        log_weights = class_log_density_ratio(
            real, real_labels, np.concatenate(views), labels, refine_config, seed
        )
    else:
        log_weights = log_density_ratio(real, np.concatenate(views), refine_config, seed)
    classes = range(len(CLASS_NAMES))
    kept = resample(log_weights, labels, {c: per_class for c in classes}, seed)
    chosen = np.zeros(len(labels), bool)
    chosen[kept] = True
    record = {
        "method": "discriminator resampling (keras_vqpix.refine): candidates drawn per slice "
        "kept, weighed by a classifier against the run's training slices",
        "candidates": len(labels),
        "kept": len(kept),
        "real_slices": len(real),
        "real_patients": len({r.patient for r in real_records}),
        "config": refine_config.to_dict(),
        "view": f"{config.data.image_size // factor} px ({factor}x area downsampling)",
        "log_weight_mean": {
            "kept": float(log_weights[chosen].mean()),
            "dropped": float(log_weights[~chosen].mean()) if (~chosen).any() else None,
        },
    }
    return _Refined(_Draw.join(parts).take(kept), record)


def default_refine(slices_per_patient: int) -> int:
    """`generate_dataset`'s candidates per slice when none are given: `GENERATE_REFINE` for single
    slices, 1 (the prior's own draw) for whole patients, which are not refined."""
    return GENERATE_REFINE if slices_per_patient == 1 else 1


def generate_dataset(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_class: int = GENERATE_PER_CLASS,
    test_fraction: float = 0.2,
    seed: int = 0,
    temperature: float = 1.0,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
    command: str = "",
    on_progress: Callable[[int, int], None] | None = None,
    slices_per_patient: int = 1,
    guidance: float | None = None,
    first_slices_from: str | os.PathLike | None = None,
    noise: bool = True,
    refine: int | None = None,
    refine_config: RefineConfig | None = None,
) -> GenerateSummary:
    """Sample a labelled data set from the run's conditional prior into `out_dir` (module docstring).

    Args:
        run_dir: a run with a trained conditional prior.
        out_dir: new (or empty) folder; a non-empty one only with `overwrite`.
        per_class: slices per class (NC and AD); a multiple of `slices_per_patient`.
        test_fraction: share of each class's patients written to `test/` (the last drawn).
        seed: sampling seed (int32).
        temperature: softmax temperature of the prior.
        size: `(width, height)` of the slices; default `run_frame(run_dir)`.
        overwrite: replace a non-empty `out_dir`.
        batch_size: code maps sampled and decoded at once (bounds memory). The images depend on
            it (each batch has its own seed): keep the default to reproduce a data set.
        command: the command line, recorded in `generator.json`.
        on_progress: called with `(slices done, slices)` after each batch.
        slices_per_patient: S, slices of each synthetic patient: 1 (every slice its own
            patient), or S > 1 consecutive slices drawn as a stack (a prior that reads the
            previous slice); batches are then `batch_size` patients.
        guidance: None, or w >= 0: classifier-free guidance (`keras_vqpix.sampling.sample_codes`;
            w > 1 strengthens the class, for twice the arithmetic).
        first_slices_from: None, or a run of the same VQ-VAE whose per-slice prior draws each
            patient's first slice (`keras_vqpix.sampling.sample_stacks`' `first_prior`).
        noise: draw acquisition noise on the decoded slices (`keras_vqpix.noise`), one level
            per patient from the run's training slices of its class (`run_noise_levels`);
            False writes the decoder's noise-free means.
        refine: F, candidate slices drawn per slice written: 1 writes the prior's draw; F > 1
            keeps the `per_class` a classifier finds most like the run's training slices
            (`keras_vqpix.refine`; single slices only). None: `default_refine`.
        refine_config: the resampling's settings (default `RefineConfig()`).
    """
    from keras_vqpix.io import atomic_directory, check_output_folder
    from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae
    from keras_vqpix.sampling import (
        check_guidance,
        check_num_slices,
        check_seed,
        check_temperature,
        decode_codes,
        load_first_prior,
        sample_codes,
        sample_stacks,
    )

    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"--per-class must be an int >= 1. Received: per_class={per_class!r}")
    try:
        stack = check_num_slices(slices_per_patient)
    except ValueError:
        raise ValueError(
            f"--slices-per-patient must be an int >= 1. Received: {slices_per_patient!r}"
        ) from None
    if per_class % stack:
        raise ValueError(
            f"--per-class ({per_class}) must be a multiple of --slices-per-patient ({stack})"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            f"--test-fraction must be in [0, 1). Received: test_fraction={test_fraction}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    if refine is None:
        refine = default_refine(stack)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 1:
        raise ValueError(f"--refine must be an int >= 1. Received: refine={refine!r}")
    if refine > 1 and stack > 1:
        raise ValueError(
            "--refine applies to single slices; whole patients (--slices-per-patient > 1) are "
            "written as the prior draws them"
        )
    seed = check_seed(seed)
    temperature = check_temperature(temperature)
    try:
        guidance = check_guidance(guidance)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    paths = RunPaths(Path(run_dir))
    frame = tuple(size) if size is not None else run_frame(paths.root)
    vqvae, config, vqvae_meta = load_vqvae(paths.root)
    prior, prior_meta = load_prior(paths.root, vqvae_meta)
    if not prior.conditional:
        raise ValueError(
            f"the prior of {paths.root} is unconditional (trained without labels): it cannot "
            "generate AD and NC slices; train a conditional prior"
        )
    if stack > 1 and not getattr(prior, "previous_slice", False):
        raise ValueError(
            f"--slices-per-patient {stack}: the prior of {paths.root} does not read the previous "
            "slice (trained before slice context, or with prior.previous_slice false); it "
            "draws single slices only"
        )
    first_prior = first_meta = None
    if first_slices_from is not None:
        if stack == 1:
            raise ValueError("--first-slices applies to whole patients: give --slices-per-patient")
        first_prior, first_meta = load_first_prior(first_slices_from, paths.root, vqvae_meta, prior)
    levels = run_noise_levels(paths.root, batch_size=batch_size) if noise else None
    patients = per_class // stack
    test_count = int(round(test_fraction * patients))

    def draws(labels: np.ndarray) -> Iterator[_Draw]:
        for batch, start in enumerate(range(0, len(labels), batch_size)):
            chunk = labels[start : start + batch_size]
            draw_seed = batch_seed(seed, batch)
            if stack == 1:
                codes = sample_codes(
                    prior, len(chunk), draw_seed, chunk, temperature, guidance=guidance
                )[:, None]
            else:
                codes = sample_stacks(
                    prior,
                    len(chunk),
                    stack,
                    draw_seed,
                    chunk,
                    temperature,
                    guidance=guidance,
                    first_prior=first_prior,
                )
            count = len(chunk)
            yield _Draw(codes, chunk, np.full(count, draw_seed), np.arange(count))

    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int32), patients)
    refined = None
    if refine > 1:
        candidates = np.repeat(labels, refine)
        refined = _refine(
            paths,
            vqvae,
            config,
            draws(candidates),
            candidates,
            patients,
            seed,
            batch_size,
            refine_config or RefineConfig(),
            on_progress,
        )
        batches = _rebatched(refined.kept, batch_size)
    else:
        batches = draws(labels)
    rows: list[dict] = []
    done = 0
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        for batch, draw in enumerate(batches):
            noise_seed = batch_seed(seed, batch)
            slices = to_frame_float(
                decode_codes(vqvae, draw.codes.reshape(-1, *draw.codes.shape[2:])), frame
            )
            count = len(draw.labels)
            brain = background = np.full(count, None)
            if levels is not None:  # one level per patient, the same on all its slices
                brain, background = levels.draw(draw.labels, noise_seed)
                slices = add_noise(
                    slices, np.repeat(brain, stack), np.repeat(background, stack), noise_seed
                )
            names = []
            for index, label in enumerate(draw.labels):
                name = CLASS_NAMES[label]
                k = (done + index) % patients  # the class's patients in drawing order
                split = "test" if k >= patients - test_count else "train"
                patient = f"syn{seed}-{name}-{k:05d}"
                for z in range(stack):
                    names.append((split, name, f"{patient}_{z}.jpeg"))
                    rows.append(
                        {
                            "file": f"{split}/{name}/{patient}_{z}.jpeg",
                            "split": split,
                            "label": name,
                            "patient": patient,
                            "seed": int(draw.seeds[index]),
                            "map_index": int(draw.map_index[index]),
                            "temperature": temperature,
                            "source": "",
                            **_noise_columns(brain[index], background[index]),
                        }
                    )
            _write_slices(tmp, names, to_pixels(slices))
            done += count
            if on_progress is not None and refined is None:
                on_progress(done * stack, len(labels) * stack)
        _write_manifest(tmp / "manifest.csv", rows)
        record = {
            "kind": "samples",
            **_run_record(paths, vqvae_meta, prior_meta, config),
            "command": command,
            "options": {
                "per_class": per_class,
                "test_fraction": test_fraction,
                "seed": seed,
                "temperature": temperature,
                "size": list(frame),
                "batch_size": batch_size,
                "slices_per_patient": stack,
                "guidance": guidance,
                "first_slices_from": None if first_slices_from is None else str(first_slices_from),
                "noise": noise,
                "refine": refine,
            },
            "noise": _noise_record(paths, levels),
            "refine": None if refined is None else refined.record,
            "frame": list(frame),
            "patients": (
                "each synthetic slice is its own patient (slices are drawn one at a time)"
                if stack == 1
                else f"each synthetic patient is a stack of {stack} consecutive slices "
                "(slice z drawn conditioned on slice z - 1"
                + (
                    ""
                    if first_meta is None
                    else f"; slice 0 by the per-slice prior {first_meta['fingerprint']} "
                    f"of {first_slices_from}"
                )
                + ")"
            ),
            "counts": _counts(rows),
        }
        (tmp / "generator.json").write_text(json.dumps(record, indent=2) + "\n")
    return GenerateSummary(out_dir, _counts(rows), frame)


def reconstruct_dataset(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
    command: str = "",
    on_progress: Callable[[int, int], None] | None = None,
    noise: bool = True,
) -> GenerateSummary:
    """Write the VQ-VAE round trip (encode, quantise, decode) of every slice of `data_root`.

    Same layout, splits and classes as `data_root`; file `<patient>_<slice>.jpeg` becomes
    `rec-<patient>_<slice>.jpeg`, in the frame of `generate_dataset`. Arguments as there; with
    `noise` each source patient gets a level drawn as a sampled patient's (seed 0), so samples
    and reconstructions carry the same noise model and their comparison judges the prior alone.
    """
    from keras_vqpix.io import atomic_directory, check_output_folder
    from keras_vqpix.run_folder import RunPaths, load_vqvae

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    data_root = Path(data_root)
    records: list[tuple[str, SliceRecord]] = [
        (split, record)
        for split in ("train", "test")
        for record in discover_folder(data_root, split)
    ]
    paths = RunPaths(Path(run_dir))
    frame = tuple(size) if size is not None else run_frame(paths.root)
    vqvae, config, vqvae_meta = load_vqvae(paths.root)
    levels = run_noise_levels(paths.root, batch_size=batch_size) if noise else None
    patient_levels = {}
    if levels is not None:
        patients = sorted({(r.patient, r.label) for _, r in records})
        brain, background = levels.draw(np.array([label for _, label in patients]), 0)
        patient_levels = {
            patient: (b, g) for (patient, _), b, g in zip(patients, brain, background, strict=True)
        }
    rows: list[dict] = []
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        round_trips = _round_trips(
            vqvae, [r for _, r in records], config.data.image_size, batch_size
        )
        for batch, (start, _, means) in enumerate(round_trips):
            chunk = records[start : start + len(means)]
            slices = to_frame_float(means, frame)
            if levels is not None:
                pairs = np.array([patient_levels[r.patient] for _, r in chunk])
                slices = add_noise(slices, pairs[:, 0], pairs[:, 1], batch_seed(0, batch))
            names = []
            for split, record in chunk:
                name = CLASS_NAMES[record.label]
                file_name = f"rec-{Path(record.path).stem}.jpeg"
                names.append((split, name, file_name))
                rows.append(
                    {
                        "file": f"{split}/{name}/{file_name}",
                        "split": split,
                        "label": name,
                        "patient": f"rec-{record.patient}",
                        "seed": "",
                        "map_index": "",
                        "temperature": "",
                        "source": os.path.relpath(record.path, data_root),
                        **_noise_columns(*patient_levels.get(record.patient, (None, None))),
                    }
                )
            _write_slices(tmp, names, to_pixels(slices))
            if on_progress is not None:
                on_progress(start + len(chunk), len(records))
        _write_manifest(tmp / "manifest.csv", rows)
        record = {
            "kind": "reconstructions",
            **_run_record(paths, vqvae_meta, None, config),
            "data": str(data_root.resolve()),
            "command": command,
            "options": {"size": list(frame), "batch_size": batch_size, "noise": noise},
            "noise": _noise_record(paths, levels),
            "frame": list(frame),
            "patients": "each reconstruction keeps its source's patient and slice, prefixed rec-",
            "counts": _counts(rows),
        }
        (tmp / "generator.json").write_text(json.dumps(record, indent=2) + "\n")
    return GenerateSummary(out_dir, _counts(rows), frame)
