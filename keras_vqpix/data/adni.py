"""Turn ADNI NIfTI volumes and a diagnosis CSV into the slice layout `discover_splits` reads.

`prepare_adni` reads every `.nii` / `.nii.gz` under a folder, matches it to a subject of the
label CSV, reorients it to RAS, takes `slices` consecutive slices centred on the brain, scales
intensities robustly to 8 bits, resizes keeping the physical aspect ratio and writes
`out/{train,test}/{AD,NC}/<subject>_<number>.jpeg` plus `out/manifest.csv`, split by subject.

Display convention (radiological, the same for every input orientation): axial slices have
anterior at the top and the subject's left on the image's right (seen from the feet); coronal
slices have superior at the top and the subject's left on the right (seen from the front);
sagittal slices have superior at the top and anterior on the left (seen from the subject's
left). Volumes are only permuted and flipped to the closest RAS axes
(`nibabel.as_closest_canonical`), never resampled: a volume acquired obliquely keeps its tilt
(less than 45 degrees) but always comes out the same way up and the same side round.

File numbers: the first visit (volumes of a subject in sorted path order) is numbered by its
slice index in the RAS volume; visit `v` adds `v * 1000`, so `002_S_0295_1078.jpeg` is slice 78
of the subject's second volume and everything before the last `_` is still the subject id.

Needs NumPy, nibabel and Pillow only (no TensorFlow).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.funcs import squeeze_image
from PIL import Image

from keras_vqpix.data.discover import (
    CLASS_NAMES,
    LABELS,
    SPLIT_FOLDERS,
    SliceRecord,
    split_by_patient,
)
from keras_vqpix.io import atomic_directory, check_output_folder

PLANES = ("axial", "coronal", "sagittal")
# Array axis of a RAS volume that each plane cuts across (0: left->right, 1: posterior->anterior,
# 2: inferior->superior).
PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SUBJECT_PATTERN = re.compile(r"(?<!\d)\d{3}_S_\d{4}(?!\d)")
VISIT_STRIDE = 1000
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = (
    "subject",
    "source",
    "split",
    "label",
    "diagnosis",
    "visit",
    "plane",
    "first_slice",
    "last_slice",
    "first_file",
)

# Column names accepted for each role, compared after lower-casing and turning `_`/`-` into
# spaces. The first match in this order wins (so `Group` beats a per-visit `DX`).
SUBJECT_COLUMNS = ("subject", "subject id", "subjectid", "ptid")
DIAGNOSIS_COLUMNS = ("group", "research group", "dx bl", "dx", "diagnosis")
PATH_COLUMNS = ("path", "file", "filename", "file name", "file path", "volume")

# ADNI diagnosis spellings -> the classes used here. ADNIMERGE writes "Dementia" for AD.
DIAGNOSES = {
    "ad": "AD",
    "dementia": "AD",
    "cn": "NC",
    "nc": "NC",
    "normal": "NC",
    "mci": "MCI",
    "emci": "MCI",
    "lmci": "MCI",
}
# With `include_mci`, MCI subjects join the AD class (cognitively impaired vs normal): the
# layout has two classes only, and the manifest keeps the original diagnosis.
MCI_CLASS = "AD"
_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_STAGING = ".staging"


class VolumeError(ValueError):
    """One volume cannot be used (unreadable, 4-D, too few slices, no foreground)."""


@dataclass(frozen=True)
class LabelTable:
    """What a label CSV says: a class per subject, and why other subjects have none.

    Attributes:
        classes: subject -> "AD", "NC" or "MCI".
        diagnoses: subject -> the CSV's own spelling(s), e.g. "EMCI".
        unusable: subject -> why it has no class (blank, unknown or conflicting diagnoses).
        paths: resolved volume path -> subject, from a path column if the CSV has one.
        missing_paths: path-column entries that name no existing file.
    """

    classes: dict[str, str]
    diagnoses: dict[str, str]
    unusable: dict[str, str]
    paths: dict[Path, str] = field(default_factory=dict)
    missing_paths: tuple[str, ...] = ()


@dataclass
class PrepareSummary:
    """What `prepare_adni` wrote and what it skipped, and why."""

    out_dir: Path
    plane: str
    counts: dict[tuple[str, str], dict[str, int]]
    skipped_mci: list[str] = field(default_factory=list)
    mci_as_ad: list[str] = field(default_factory=list)
    bad_volumes: list[str] = field(default_factory=list)
    volumes_without_subject: list[str] = field(default_factory=list)
    subjects_without_label: list[str] = field(default_factory=list)
    labels_without_volume: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        """Sum of `key` ("subjects", "volumes" or "slices") over splits and classes."""
        return sum(count[key] for count in self.counts.values())

    def format(self) -> str:
        """A human-readable report: a table of counts and one line per kind of problem."""
        lines = [
            f"Wrote {self.total('slices')} {self.plane} slices of {self.total('volumes')} volumes "
            f"from {self.total('subjects')} subjects to {self.out_dir}",
            f"  {'split':<6}{'class':<7}{'subjects':>9}{'volumes':>9}{'slices':>9}",
        ]
        for (split, name), count in self.counts.items():
            lines.append(
                f"  {split:<6}{name:<7}{count['subjects']:>9}{count['volumes']:>9}{count['slices']:>9}"
            )
        lines += [
            f"Skipped MCI subjects: {_listing(self.skipped_mci)}"
            + (" (pass --include-mci to label them AD)" if self.skipped_mci else ""),
            f"Unreadable or unusable volumes: {_listing(self.bad_volumes)}",
            f"Subjects without an AD/NC/MCI label: {_listing(self.subjects_without_label)}",
            f"Volumes without an ADNI subject id: {_listing(self.volumes_without_subject)}",
            f"Labels without a volume: {_listing(self.labels_without_volume)}",
        ]
        if self.mci_as_ad:
            lines.append(f"MCI subjects labelled AD: {_listing(self.mci_as_ad)}")
        lines += [f"Warning: {warning}" for warning in self.warnings]
        lines.append(f"Manifest: {self.out_dir / MANIFEST_NAME}")
        return "\n".join(lines)


def _listing(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "0"
    shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
    return f"{len(items)} ({shown})"


# --------------------------------------------------------------------------------------------
# Labels


def _normalise_column(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _find_column(
    header: Sequence[str], wanted: str | None, candidates: Sequence[str]
) -> str | None:
    by_name = {_normalise_column(name): name for name in header}
    if wanted is not None:
        return by_name.get(_normalise_column(wanted))
    return next((by_name[c] for c in candidates if c in by_name), None)


def read_labels(
    labels_csv: str | os.PathLike,
    volumes_dir: str | os.PathLike | None = None,
    *,
    subject_column: str | None = None,
    label_column: str | None = None,
) -> LabelTable:
    """Read a subject -> class table from an ADNI-style CSV.

    Columns are found case-insensitively: the subject in `Subject`, `Subject ID` or `PTID`, the
    diagnosis in `Group`, `Research Group`, `DX_bl`, `DX` or `Diagnosis` (or the names given).
    An optional `Path`/`File`/`Filename` column ties rows to volume files (absolute, relative to
    `volumes_dir`, or relative to the CSV's folder). `CN` becomes NC; `Dementia` becomes AD;
    `MCI`, `EMCI`, `LMCI` become MCI. A subject whose non-blank rows disagree (a converter in a
    per-visit `DX` column) gets no class; use a baseline column such as `Group` or `DX_bl`.

    Raises:
        ValueError: the CSV has no header, or no subject or diagnosis column.
    """
    labels_csv = Path(labels_csv)
    try:
        text = labels_csv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{labels_csv} is not UTF-8 text ({error}); save it as UTF-8 CSV"
        ) from error
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    header = [name for name in (reader.fieldnames or []) if name]
    if not header:
        raise ValueError(f"{labels_csv} has no header row; expected columns Subject and Group")
    subject_key = _find_column(header, subject_column, SUBJECT_COLUMNS)
    label_key = _find_column(header, label_column, DIAGNOSIS_COLUMNS)
    path_key = _find_column(header, None, PATH_COLUMNS)
    found = ", ".join(header)
    if subject_key is None:
        wanted = subject_column or "Subject, Subject ID or PTID"
        raise ValueError(
            f"{labels_csv} has no subject column ({wanted}); columns found: {found}. "
            "Name the column with --subject-column"
        )
    if label_key is None:
        wanted = label_column or "Group, DX or Diagnosis"
        raise ValueError(
            f"{labels_csv} has no diagnosis column ({wanted}); columns found: {found}. "
            "Name the column with --label-column"
        )

    raw: dict[str, set[str]] = {}
    paths: dict[Path, str] = {}
    missing: list[str] = []
    roots = [Path(volumes_dir)] if volumes_dir is not None else []
    roots.append(labels_csv.parent)
    for row in reader:
        subject = (row.get(subject_key) or "").strip()
        if not subject:
            continue
        diagnosis = (row.get(label_key) or "").strip()
        raw.setdefault(subject, set())
        if diagnosis:
            raw[subject].add(diagnosis)
        entry = (row.get(path_key) or "").strip() if path_key else ""
        if entry:
            candidates = [Path(entry)] if Path(entry).is_absolute() else [r / entry for r in roots]
            existing = next((c for c in candidates if c.is_file()), None)
            if existing is None:
                missing.append(entry)
            else:
                paths[existing.resolve()] = subject

    classes: dict[str, str] = {}
    diagnoses: dict[str, str] = {}
    unusable: dict[str, str] = {}
    for subject, values in raw.items():
        diagnoses[subject] = ";".join(sorted(values))
        mapped = {DIAGNOSES.get(value.lower()) for value in values}
        if not values:
            unusable[subject] = "blank diagnosis"
        elif None in mapped:
            unknown = sorted(v for v in values if v.lower() not in DIAGNOSES)
            unusable[subject] = f"unknown diagnosis {', '.join(map(repr, unknown))}"
        elif len(mapped) > 1:
            unusable[subject] = f"conflicting diagnoses {', '.join(sorted(values))}"
        elif not _SUBJECT_ID.match(subject):
            unusable[subject] = "subject id is not usable in a file name"
        else:
            classes[subject] = mapped.pop()
    return LabelTable(classes, diagnoses, unusable, paths, tuple(missing))


# --------------------------------------------------------------------------------------------
# Volumes


def find_volumes(volumes_dir: str | os.PathLike) -> list[Path]:
    """Every `.nii` / `.nii.gz` under `volumes_dir`, sorted; hidden files and folders skipped."""
    found = []
    for folder, dirs, files in os.walk(volumes_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(VOLUME_SUFFIXES):
                found.append(Path(folder) / name)
    return found


def subject_from_path(path: str | os.PathLike) -> str | None:
    """The ADNI subject id (`\\d{3}_S_\\d{4}`) in a file name, else in its nearest folder."""
    for part in reversed(Path(path).parts):
        matches = SUBJECT_PATTERN.findall(part)
        if matches:
            return matches[-1]
    return None


def _unreadable(path: str | os.PathLike, error: Exception) -> VolumeError:
    return VolumeError(
        f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error}); "
        "re-download or remove the file"
    )


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume as float32 data in RAS axis order, and its voxel sizes in mm.

    Trailing singleton dimensions (a 4-D file holding one volume) are dropped.

    Raises:
        VolumeError: the file cannot be read, or is not a single 3-D volume.
    """
    # Any reader failure (bad header, truncated gzip, unsupported data type) makes this one
    # file unusable; the caller reports it and goes on with the others.
    try:
        image = squeeze_image(nib.load(os.fspath(path)))
    except Exception as error:
        raise _unreadable(path, error) from error
    if image.ndim != 3:
        shape = "x".join(map(str, image.shape))
        raise VolumeError(
            f"{path}: is {image.ndim}-D (shape {shape}), not one 3-D volume; "
            "split a series into 3-D files (e.g. fslsplit) or remove it"
        )
    try:
        image = nib.as_closest_canonical(image)
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:
        raise _unreadable(path, error) from error
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data, nib.affines.voxel_sizes(image.affine).astype(np.float64)


def _otsu_threshold(values: np.ndarray) -> float:
    histogram, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram)
    mass = np.cumsum(histogram * centres)
    below, above = weight[:-1], weight[-1] - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mass[:-1] / below
        mean_above = (mass[-1] - mass[:-1]) / above
        between = below * above * (mean_below - mean_above) ** 2
    return float(centres[np.nanargmax(between)]) if np.isfinite(between).any() else float(edges[0])


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Brain voxels: the nonzero ones of a skull-stripped volume.

    When nearly everything is nonzero (no clean black background) Otsu's threshold separates
    head from background instead.
    """
    if data.size == 0 or data.min() == data.max():
        return np.zeros(data.shape, bool)
    mask = data != 0
    if mask.mean() > 0.9:
        mask = data > _otsu_threshold(data)
    return mask


def centred_window(foreground_per_slice: np.ndarray, count: int) -> int:
    """Start of the `count` consecutive slices holding the most foreground.

    Ties (a brain shorter than the window) go to the window whose centre is nearest the
    foreground's centre of mass, so the window is centred on the brain, not on the array.
    """
    totals = np.concatenate([[0], np.cumsum(foreground_per_slice, dtype=np.int64)])
    sums = totals[count:] - totals[:-count]
    best = np.flatnonzero(sums == sums.max())
    positions = np.arange(len(foreground_per_slice))
    centre = (positions * foreground_per_slice).sum() / max(foreground_per_slice.sum(), 1)
    return int(best[np.argmin(np.abs(best + (count - 1) / 2 - centre))])


def scale_to_uint8_range(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip to the 0.5th-99.5th percentile of the brain's voxels and map that range to 0-255."""
    low, high = np.percentile(data[mask], [0.5, 99.5])
    if high <= low:  # a flat brain (e.g. a mask image): brain white, background black
        low = float(data.min())
        high = max(high, low + 1.0)
    return (np.clip((data - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.float32)


def to_display(slab: np.ndarray) -> np.ndarray:
    """A 2-D cut of a RAS volume (its remaining axes in RAS order) -> rows x columns on screen.

    Transposing puts the later axis (anterior or superior) on the rows and flipping both axes
    puts it at the top and the subject's right (or anterior, for sagittal) on the left: the
    radiological convention described in the module docstring.
    """
    return np.flip(slab.T)


def fit_to_size(
    image: np.ndarray, spacing: tuple[float, float], size: tuple[int, int]
) -> np.ndarray:
    """Resize `image` (rows x columns, `spacing` = mm per row, mm per column) into `size`.

    `size` is (width, height) as PIL counts it. The physical aspect ratio is kept; the rest is
    padded with black. Returns uint8 rows x columns = height x width.
    """
    width, height = size
    rows_mm, cols_mm = image.shape[0] * spacing[0], image.shape[1] * spacing[1]
    scale = min(width / cols_mm, height / rows_mm)
    new_width = min(width, max(1, round(cols_mm * scale)))
    new_height = min(height, max(1, round(rows_mm * scale)))
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (new_width, new_height), Image.Resampling.LANCZOS
    )
    canvas = np.zeros((height, width), np.float32)
    top, left = (height - new_height) // 2, (width - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = np.asarray(resized)
    # LANCZOS rings a little beyond the input range at sharp edges.
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_volume(
    path: str | os.PathLike, *, slices: int, plane: str, size: tuple[int, int]
) -> tuple[list[int], list[np.ndarray]]:
    """The chosen slice indices of one volume and their 8-bit images (height x width).

    Raises:
        VolumeError: unreadable, not 3-D, no foreground, or fewer slices than asked for.
    """
    data, voxel_sizes = load_volume(path)
    axis = PLANE_AXES[plane]
    mask = foreground_mask(data)
    if not mask.any():
        raise VolumeError(f"{path}: has no foreground (every voxel is the same); remove it")
    if data.shape[axis] < slices:
        raise VolumeError(
            f"{path}: has only {data.shape[axis]} {plane} slice(s), fewer than --slices {slices}"
        )
    other = [a for a in range(3) if a != axis]
    per_slice = mask.sum(axis=tuple(other))
    start = centred_window(per_slice, slices)
    indices = list(range(start, start + slices))
    if indices[-1] >= VISIT_STRIDE:
        raise VolumeError(f"{path}: slice index {indices[-1]} does not fit the file numbering")
    scaled = scale_to_uint8_range(data, mask)
    # Display rows run along the later remaining axis, columns along the earlier one.
    spacing = (float(voxel_sizes[other[1]]), float(voxel_sizes[other[0]]))
    images = [
        fit_to_size(to_display(np.take(scaled, index, axis=axis)), spacing, size)
        for index in indices
    ]
    return indices, images


def save_slice(path: Path, image: np.ndarray) -> None:
    """Write one uint8 slice as an 8-bit grayscale (mode L) JPEG."""
    Image.fromarray(image).save(path, format="JPEG", quality=95)


# --------------------------------------------------------------------------------------------
# The whole preparation


def _volumes_of(paths: Sequence[Path]) -> str:
    return f"{paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")


def _check_arguments(slices, plane, test_fraction, size) -> None:
    if isinstance(slices, bool) or not isinstance(slices, (int, np.integer)) or slices < 1:
        raise ValueError(f"slices must be a positive integer. Received: slices={slices!r}")
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}. Received: plane={plane!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1). Received: test_fraction={test_fraction}"
        )
    if len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise ValueError(f"size must be (width, height) in pixels. Received: size={size!r}")


def _check_out(out_dir: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    if not check_output_folder(out_dir, overwrite=overwrite).exists():
        return
    for path in inputs:
        if path.resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(
                f"--out {out_dir} holds the input {path}; replacing it would delete it"
            )


def prepare_adni(
    volumes_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    slices: int = 20,
    plane: str = "axial",
    test_fraction: float = 0.2,
    seed: int = 0,
    size: tuple[int, int] = (256, 240),
    include_mci: bool = False,
    overwrite: bool = False,
    subject_column: str | None = None,
    label_column: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PrepareSummary:
    """Write the slice layout of the ADNI volumes under `volumes_dir` into `out_dir`.

    Everything is written into a hidden temporary sibling of `out_dir` and renamed into place at
    the end, so a failure at any point leaves no half-written `out_dir`.

    Args:
        volumes_dir: folder searched recursively for `.nii` / `.nii.gz` volumes.
        labels_csv: CSV with a subject and a diagnosis column (see `read_labels`).
        out_dir: the new data folder; must not exist or be empty unless `overwrite`.
        slices: consecutive slices per volume, centred on the brain.
        plane: "axial", "coronal" or "sagittal".
        test_fraction: fraction of each class's subjects held out in `test/`.
        seed: seed of the subject split.
        size: (width, height) of the images in pixels.
        include_mci: label MCI/EMCI/LMCI subjects AD instead of skipping them.
        overwrite: replace a non-empty `out_dir`.
        subject_column: name of the subject column, if not one of the usual ones.
        label_column: name of the diagnosis column, if not one of the usual ones.
        log: called with one line per volume written or skipped (e.g. `print`).

    Returns:
        A `PrepareSummary` of what was written and skipped.

    Raises:
        FileNotFoundError: `volumes_dir` or `labels_csv` does not exist.
        FileExistsError: `out_dir` exists and is not empty, and not `overwrite`.
        ValueError: bad arguments, no volume, a CSV without the needed columns, or no volume
            of an AD or NC subject that could be read.
    """
    _check_arguments(slices, plane, test_fraction, size)
    log = log or (lambda message: None)
    volumes_dir, labels_csv, out_dir = Path(volumes_dir), Path(labels_csv), Path(out_dir)
    if not volumes_dir.is_dir():
        raise FileNotFoundError(f"--volumes folder {volumes_dir} does not exist")
    if not labels_csv.is_file():
        raise FileNotFoundError(f"--labels file {labels_csv} does not exist")
    _check_out(out_dir, (volumes_dir, labels_csv), overwrite)
    volumes = find_volumes(volumes_dir)
    if not volumes:
        raise ValueError(
            f"{volumes_dir} holds no .nii or .nii.gz volume (searched all subfolders); "
            "point --volumes at the unpacked ADNI download"
        )
    table = read_labels(
        labels_csv, volumes_dir, subject_column=subject_column, label_column=label_column
    )
    summary = PrepareSummary(out_dir, plane, {})
    for entry in table.missing_paths:
        log(f"skipped label row: {labels_csv} names {entry}, which does not exist")

    # Match volumes to subjects; keep a subject's volumes together, in sorted path order.
    by_subject: dict[str, list[Path]] = {}
    for path in volumes:
        relative = path.relative_to(volumes_dir)
        subject = table.paths.get(path.resolve()) or subject_from_path(relative)
        if subject is None:
            summary.volumes_without_subject.append(relative.as_posix())
            log(f"skipped {path}: no ADNI subject id (###_S_####) in its path or the CSV")
        else:
            by_subject.setdefault(subject, []).append(path)
    summary.labels_without_volume = sorted(set(table.classes) - set(by_subject))
    jobs: list[tuple[str, str, int, Path]] = []
    for subject, paths in sorted(by_subject.items()):
        name = table.classes.get(subject)
        if name is None:
            reason = table.unusable.get(subject, f"not in {labels_csv}")
            summary.subjects_without_label.append(subject)
            log(f"skipped {_volumes_of(paths)}: subject {subject} has no label ({reason})")
            continue
        if name == "MCI":
            if not include_mci:
                summary.skipped_mci.append(subject)
                log(f"skipped {_volumes_of(paths)}: subject {subject} is MCI (see --include-mci)")
                continue
            summary.mci_as_ad.append(subject)
            name = MCI_CLASS
        jobs.extend((subject, name, visit, path) for visit, path in enumerate(paths))
    if not jobs:
        raise ValueError(
            f"no volume under {volumes_dir} belongs to an AD or NC subject of {labels_csv} "
            f"({len(summary.skipped_mci)} MCI subjects skipped, "
            f"{len(summary.subjects_without_label)} subjects without label); check that file "
            "names hold ADNI subject ids (###_S_####) found in the CSV"
        )

    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        staging = tmp / _STAGING
        staged: dict[str, list[tuple[int, Path, list[int], list[str]]]] = {}
        classes: dict[str, str] = {}
        for number, (subject, name, visit, path) in enumerate(jobs, start=1):
            try:
                indices, images = render_volume(path, slices=slices, plane=plane, size=size)
            except VolumeError as error:
                summary.bad_volumes.append(path.relative_to(volumes_dir).as_posix())
                log(f"skipped {error}")
                continue
            folder = staging / subject
            folder.mkdir(parents=True, exist_ok=True)
            files = [f"{subject}_{visit * VISIT_STRIDE + index}.jpeg" for index in indices]
            for file_name, image in zip(files, images, strict=True):
                save_slice(folder / file_name, image)
            staged.setdefault(subject, []).append((visit, path, indices, files))
            classes[subject] = name
            log(f"[{number}/{len(jobs)}] {path}: {plane} slices {indices[0]}-{indices[-1]}")
        if not staged:
            raise ValueError(
                f"none of the {len(jobs)} volumes of AD or NC subjects under {volumes_dir} "
                "could be used; see the messages above"
            )

        # Split by subject, stratified by class: the same rule as train/validation.
        records = [SliceRecord(s, 0, "", LABELS[classes[s]]) for s in sorted(staged)]
        train, test = split_by_patient(records, test_fraction, seed)
        split_of = {r.patient: "train" for r in train} | {r.patient: "test" for r in test}
        for split in SPLIT_FOLDERS:
            for name in CLASS_NAMES:
                (tmp / split / name).mkdir(parents=True)
                summary.counts[(split, name)] = {"subjects": 0, "volumes": 0, "slices": 0}
        rows = []
        for subject, visits in sorted(staged.items()):
            split, name = split_of[subject], classes[subject]
            count = summary.counts[(split, name)]
            count["subjects"] += 1
            for visit, path, indices, files in visits:
                for file_name in files:
                    os.replace(staging / subject / file_name, tmp / split / name / file_name)
                count["volumes"] += 1
                count["slices"] += len(files)
                rows.append(
                    {
                        "subject": subject,
                        "source": path.relative_to(volumes_dir).as_posix(),
                        "split": split,
                        "label": name,
                        "diagnosis": table.diagnoses.get(subject, ""),
                        "visit": visit,
                        "plane": plane,
                        "first_slice": indices[0],
                        "last_slice": indices[-1],
                        "first_file": f"{split}/{name}/{files[0]}",
                    }
                )
            (staging / subject).rmdir()
        staging.rmdir()
        with open(tmp / MANIFEST_NAME, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    for name in CLASS_NAMES:
        subjects = sum(summary.counts[(split, name)]["subjects"] for split in SPLIT_FOLDERS)
        if subjects < 3:
            summary.warnings.append(
                f"only {subjects} {name} subject(s) written; vqpix train needs at least 3 per "
                "class (2 to split into train/validation, 1 for test)"
            )
    return summary
