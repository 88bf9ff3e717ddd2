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
- Reproducible: map `j` of batch `b` is drawn with the batch seed `batch_seed(seed, b)`; the
  same run, seed, temperature and counts give the same bytes. `manifest.csv` records every
  file's split, label, seed, map index and temperature (or source for reconstructions),
  `generator.json` the run, its fingerprints, the options and the command.
- Atomic: everything is written into a hidden sibling folder renamed to `DIR` at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_vqpix.data.discover import CLASS_NAMES, SliceRecord, discover_folder, slice_frame

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


def to_frame(images: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Square images `[n, S, S, 1]` in [0, 1] -> 8-bit slices `[n, height, width]` of `frame`.

    The inverse of the input pipeline's `resize_with_pad`: crop the padding, then resize
    (bilinear, antialiased) to the frame.
    """
    import tensorflow as tf

    top, left, height, width = padding_box(frame, images.shape[1])
    cropped = images[:, top : top + height, left : left + width]
    resized = tf.image.resize(cropped, (frame[1], frame[0]), antialias=True).numpy()
    return np.round(np.clip(resized[..., 0], 0.0, 1.0) * 255.0).astype(np.uint8)


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


def generate_dataset(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_class: int = 400,
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
    patients = per_class // stack
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int32), patients)
    number = np.tile(np.arange(patients), len(CLASS_NAMES))
    test_count = int(round(test_fraction * patients))
    splits = np.where(number >= patients - test_count, "test", "train")
    rows: list[dict] = []
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        for batch, start in enumerate(range(0, len(labels), batch_size)):
            chunk = slice(start, start + batch_size)
            draw_seed = batch_seed(seed, batch)
            if stack == 1:
                codes = sample_codes(
                    prior,
                    len(labels[chunk]),
                    draw_seed,
                    labels[chunk],
                    temperature,
                    guidance=guidance,
                )[:, None]
            else:
                codes = sample_stacks(
                    prior,
                    len(labels[chunk]),
                    stack,
                    draw_seed,
                    labels[chunk],
                    temperature,
                    guidance=guidance,
                    first_prior=first_prior,
                )
            slices = to_frame(decode_codes(vqvae, codes.reshape(-1, *codes.shape[2:])), frame)
            names = []
            for index, (label, k, split) in enumerate(
                zip(labels[chunk], number[chunk], splits[chunk], strict=True)
            ):
                name = CLASS_NAMES[label]
                patient = f"syn{seed}-{name}-{k:05d}"
                for z in range(stack):
                    names.append((split, name, f"{patient}_{z}.jpeg"))
                    rows.append(
                        {
                            "file": f"{split}/{name}/{patient}_{z}.jpeg",
                            "split": split,
                            "label": name,
                            "patient": patient,
                            "seed": draw_seed,
                            "map_index": index,
                            "temperature": temperature,
                            "source": "",
                        }
                    )
            _write_slices(tmp, names, slices)
            if on_progress is not None:
                done = min(start + batch_size, len(labels)) * stack
                on_progress(done, len(labels) * stack)
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
            },
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
) -> GenerateSummary:
    """Write the VQ-VAE round trip (encode, quantise, decode) of every slice of `data_root`.

    Same layout, splits and classes as `data_root`; file `<patient>_<slice>.jpeg` becomes
    `rec-<patient>_<slice>.jpeg`, in the frame of `generate_dataset`. Arguments as there.
    """
    import tensorflow as tf

    from keras_vqpix.data.pipeline import make_dataset
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
    reconstruct = tf.function(lambda images: vqvae(images, training=False)["reconstruction"])
    rows: list[dict] = []
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        dataset = make_dataset(
            [r for _, r in records], config.data.image_size, batch_size, cache=""
        )
        start = 0
        for images, _ in dataset:
            chunk = records[start : start + len(images)]
            slices = to_frame(reconstruct(images).numpy(), frame)
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
                    }
                )
            _write_slices(tmp, names, slices)
            start += len(chunk)
            if on_progress is not None:
                on_progress(start, len(records))
        _write_manifest(tmp / "manifest.csv", rows)
        record = {
            "kind": "reconstructions",
            **_run_record(paths, vqvae_meta, None, config),
            "data": str(data_root.resolve()),
            "command": command,
            "options": {"size": list(frame), "batch_size": batch_size},
            "frame": list(frame),
            "patients": "each reconstruction keeps its source's patient and slice, prefixed rec-",
            "counts": _counts(rows),
        }
        (tmp / "generator.json").write_text(json.dumps(record, indent=2) + "\n")
    return GenerateSummary(out_dir, _counts(rows), frame)
