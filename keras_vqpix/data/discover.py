"""Find ADNI-style slices on disk and split them by patient.

Layout read: `root/{train,test}/{AD,NC}/<patient id>_<slice>.{jpeg,jpg,png}`. Everything before
the last `_` of a file's stem is the patient id. Labels: NC = 0, AD = 1.

The train folder is split into train and validation **by patient**, stratified by class, so no
patient's slices sit on both sides (splitting by image leaks a patient's anatomy into
validation and inflates every validation figure).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("NC", "AD")
LABELS = {name: index for index, name in enumerate(CLASS_NAMES)}
UNCONDITIONAL = -1  # the label of a sample drawn without a class
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLIT_FOLDERS = ("train", "test")
EXPECTED_LAYOUT = "expected ROOT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg"


def label_name(label: int) -> str:
    """ "NC", "AD" or "unconditional" (any label < 0)."""
    return "unconditional" if label < 0 else CLASS_NAMES[label]


class DatasetLayoutError(ValueError):
    """The data folder is missing, empty or not in the ADNI layout."""


@dataclass(frozen=True, order=True)
class SliceRecord:
    """One image file: its path, patient id, slice index and label (0 NC, 1 AD)."""

    patient: str
    slice_index: int
    path: str
    label: int


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test records; train and validation share no patient.

    `skipped` lists the `(path, reason)` of files left out because they cannot be read.
    """

    train: tuple[SliceRecord, ...]
    validation: tuple[SliceRecord, ...]
    test: tuple[SliceRecord, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts of images and patients per split and class."""
        out = {}
        for name in ("train", "validation", "test"):
            records = getattr(self, name)
            out[name] = {
                "images": len(records),
                "patients": len({r.patient for r in records}),
                **{f"images_{c}": sum(r.label == LABELS[c] for r in records) for c in CLASS_NAMES},
            }
        return out


def display_path(path: str | os.PathLike) -> str:
    """`path` fit for a message: bytes of a file name that are not UTF-8 shown as `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def patient_and_slice(filename: str) -> tuple[str, int]:
    """`"941_S_1311_78.jpeg"` -> `("941_S_1311", 78)`; a stem without `_` is its own patient."""
    stem = Path(filename).stem
    patient, sep, tail = stem.rpartition("_")
    if not sep:
        return stem, 0
    match = re.search(r"\d+", tail)
    return patient, int(match.group()) if match else 0


def discover_folder(root: str | os.PathLike, split: str) -> list[SliceRecord]:
    """Records of `root/split/{AD,NC}/*`, sorted by patient then slice.

    Raises:
        DatasetLayoutError: the folder is missing, has no class subfolder, or holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder {root} does not exist; {EXPECTED_LAYOUT}")
    folder = root / split
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} is missing; {EXPECTED_LAYOUT}")
    class_dirs = [folder / name for name in CLASS_NAMES if (folder / name).is_dir()]
    if not class_dirs:
        raise DatasetLayoutError(f"{folder} has no AD or NC subfolder; {EXPECTED_LAYOUT}")
    records = []
    for class_dir in class_dirs:
        label = LABELS[class_dir.name]
        for entry in os.scandir(class_dir):
            if (
                entry.is_file()
                and entry.name.lower().endswith(IMAGE_SUFFIXES)
                and not entry.name.startswith(".")
            ):
                patient, slice_index = patient_and_slice(entry.name)
                records.append(SliceRecord(patient, slice_index, entry.path, label))
    if not records:
        raise DatasetLayoutError(f"{folder} holds no .jpeg/.jpg/.png image; {EXPECTED_LAYOUT}")
    patients_in_both = {r.patient for r in records if r.label == 0} & {
        r.patient for r in records if r.label == 1
    }
    if patients_in_both:
        example = sorted(patients_in_both)[0]
        raise DatasetLayoutError(
            f"patient {example!r} has slices in both {folder / 'AD'} and {folder / 'NC'}; "
            "each patient must have one label"
        )
    return sorted(records)


def split_by_patient(
    records: list[SliceRecord] | tuple[SliceRecord, ...], validation_fraction: float, seed: int
) -> tuple[tuple[SliceRecord, ...], tuple[SliceRecord, ...]]:
    """Split records into (train, validation) by patient, stratified by class.

    Within each class the sorted patient ids are shuffled with `seed` and the first
    `round(validation_fraction * n)` (at least one when the class has two or more patients)
    go to validation. Deterministic for a seed, independent of file-system order.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be in (0, 1). Received: validation_fraction={validation_fraction}"
        )
    rng = np.random.default_rng(seed)
    validation_patients: set[str] = set()
    for label in sorted({r.label for r in records}):
        patients = sorted({r.patient for r in records if r.label == label})
        count = int(round(validation_fraction * len(patients)))
        count = min(max(count, 1), len(patients) - 1) if len(patients) >= 2 else 0
        order = rng.permutation(len(patients))
        validation_patients.update(patients[i] for i in order[:count])
    train = tuple(r for r in records if r.patient not in validation_patients)
    validation = tuple(r for r in records if r.patient in validation_patients)
    return train, validation


def discover_splits(
    root: str | os.PathLike,
    validation_fraction: float = 0.2,
    seed: int = 0,
    *,
    unreadable: Callable[[Sequence[str]], dict[int, str]] | None = None,
) -> DataSplits:
    """Read `root/train` and `root/test` and split train by patient into train/validation.

    Args:
        root: the ADNI-layout folder.
        validation_fraction: share of the train folder's patients held out, per class.
        seed: seed of the split.
        unreadable: a screen `paths -> {index: reason}` of the files that are no readable
            image, e.g. `keras_vqpix.data.screen.unreadable_files` (which decodes every file
            once with TensorFlow; this module stays NumPy-only, so it is passed in, not
            imported). Those files are left out before splitting and listed in
            `DataSplits.skipped`. Default: no screening.

    Raises:
        DatasetLayoutError: a folder is missing or not in the layout, no file of `train/` or of
            `test/` can be read, or the patients do not allow the split.
    """
    root = Path(root)
    found, skipped = _readable(
        root, {split: discover_folder(root, split) for split in SPLIT_FOLDERS}, unreadable
    )
    train_records, test_records = found["train"], found["test"]
    train, validation = split_by_patient(train_records, validation_fraction, seed)
    if not validation:
        raise DatasetLayoutError(
            f"{root / 'train'} has too few patients to hold out a validation set; "
            "each class needs at least two patients"
        )
    overlap = {r.patient for r in train_records} & {r.patient for r in test_records}
    if overlap:
        raise DatasetLayoutError(
            f"patient {sorted(overlap)[0]!r} appears in both {root / 'train'} and {root / 'test'}; "
            "the test set must hold different patients"
        )
    return DataSplits(train, validation, tuple(test_records), skipped)


def spread_records(records: Sequence[SliceRecord], count: int) -> list[SliceRecord]:
    """`count` records spread over patients, deterministically.

    Round robin over the patients (sorted by id): first each patient's middle slice, then the
    slices next to the middle, and so on; so N records cover min(N, patients) patients.
    """
    by_patient: dict[str, list[SliceRecord]] = defaultdict(list)
    for record in records:
        by_patient[record.patient].append(record)
    queues = []
    for patient in sorted(by_patient):
        slices = sorted(by_patient[patient], key=lambda r: (r.slice_index, r.path))
        middle = (len(slices) - 1) / 2
        queues.append(
            sorted(slices, key=lambda r, s=slices: (abs(s.index(r) - middle), s.index(r)))
        )
    chosen = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [queue[depth] for queue in queues if depth < len(queue)]
    return chosen[:count]


def slice_frame(records: Sequence[SliceRecord], probe: int = 32) -> tuple[int, int] | None:
    """The most common `(width, height)` of the first `probe` readable records; None if none is.

    Reads image headers only (Pillow), so it is fast on any number of files: the frame the
    source slices had before `resize_with_pad` squared them, recorded in a run's `split.json`.
    """
    from collections import Counter

    from PIL import Image, UnidentifiedImageError

    sizes: Counter = Counter()
    for record in records[:probe]:
        try:
            with Image.open(record.path) as image:
                sizes[image.size] += 1
        except (OSError, UnidentifiedImageError, ValueError):
            continue
    return sizes.most_common(1)[0][0] if sizes else None


def discover_records(
    root: str | os.PathLike,
    folders: tuple[str, ...] | None = ("test",),
    *,
    unreadable: Callable[[Sequence[str]], dict[int, str]] | None = None,
) -> tuple[tuple[SliceRecord, ...], tuple[tuple[str, str], ...]]:
    """Every slice of some split folders of `root`, with no train/validation split.

    For data that is only evaluated (another cohort, a hospital's test set): any number of
    patients and classes will do, one class folder or one patient included.

    Args:
        root: the ADNI-layout folder.
        folders: the split folders to read, e.g. `("test",)`; None reads every one present
            (`train/`, `test/` or both).
        unreadable: a screen of the files that are no readable image, left out (as
            `discover_splits`); None keeps every file.

    Returns:
        `(records, skipped)`: the records sorted by patient then slice (folder by folder), and
        the `(path, reason)` of the unreadable files left out.

    Raises:
        DatasetLayoutError: a folder asked for is missing or not in the layout (with None: no
            split folder at all), or none of a folder's files can be read.
    """
    root = Path(root)
    if folders is None:
        if not root.is_dir():
            raise DatasetLayoutError(f"data folder {root} does not exist; {EXPECTED_LAYOUT}")
        folders = tuple(split for split in SPLIT_FOLDERS if (root / split).is_dir())
        if not folders:
            raise DatasetLayoutError(
                f"{root} has neither a train nor a test folder; {EXPECTED_LAYOUT}"
            )
    found, skipped = _readable(
        root, {split: discover_folder(root, split) for split in folders}, unreadable
    )
    return tuple(r for split in folders for r in found[split]), skipped


def _readable(
    root: Path,
    found: dict[str, list[SliceRecord]],
    unreadable: Callable[[Sequence[str]], dict[int, str]] | None,
) -> tuple[dict[str, list[SliceRecord]], tuple[tuple[str, str], ...]]:
    """`found` (records per split folder) without the files the `unreadable` screen names.

    Raises `DatasetLayoutError` when no file of a folder can be read.
    """
    if unreadable is None:
        return found, ()
    every = [r for records in found.values() for r in records]
    reasons = unreadable([r.path for r in every])
    skipped = tuple((every[i].path, reasons[i]) for i in sorted(reasons))
    left_out = {path for path, _ in skipped}
    kept = {
        split: [r for r in records if r.path not in left_out] for split, records in found.items()
    }
    for split, records in kept.items():
        if not records:
            path, reason = next((p, r) for p, r in skipped if Path(p).parent.parent == root / split)
            raise DatasetLayoutError(
                f"no image file in {root / split} can be read (e.g. {display_path(path)}: {reason}); "
                "the folders must hold JPEG or PNG images"
            )
    return kept, skipped
