"""The demo data set: synthetic ADNI-like axial T1 slices of AD and NC patients.

Real ADNI data cannot be shipped, so every command can fall back on this set. `demo_render`
draws each patient from the MNI152 template with its own anatomy, atrophy and image quality;
this module picks the patients (ADNI-like ids, a per-patient disease severity for AD, milder
age-related atrophy for everyone), writes them atomically as
`OUT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg` (256x240 8-bit grayscale, train and test
split by patient) and keeps the default set in a cache.

NumPy and Pillow only: no TensorFlow and no scipy at run time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from keras_vqpix.data.demo_render import (
    PatientParams,
    random_patient,
    render_patient,
    render_patient_with_lesions,
)
from keras_vqpix.data.lesions import mask_path
from keras_vqpix.io import atomic_directory

__all__ = [
    "FORMAT_VERSION",
    "cache_root",
    "ensure_demo_dataset",
    "generate_demo_dataset",
]

# Bump when the generator changes what it writes: cached sets of another version are not reused.
FORMAT_VERSION = 1
JPEG_QUALITY = 92
CLASS_FOLDERS = {0: "NC", 1: "AD"}
# ADNI-like site numbers for patient ids "SSS_S_PPPP".
_SITES = (2, 5, 6, 7, 10, 11, 12, 13, 14, 16, 18, 20, 21, 22, 23, 24, 27, 29, 31, 32, 33, 35)
_SITES += (36, 37, 41, 52, 53, 57, 62, 67, 68, 70, 73, 82, 94, 98, 99, 100, 109, 114, 116)
_SITES += (123, 126, 127, 128, 130, 131, 133, 135, 136, 137, 141, 153, 941)


def _patient_ids(rng: np.random.Generator, count: int) -> list[str]:
    """Unique ADNI-style ids, e.g. `002_S_0413`."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        site = _SITES[int(rng.integers(len(_SITES)))]
        number = int(rng.choice([rng.integers(1, 1500), rng.integers(4000, 7000)]))
        patient = f"{site:03d}_S_{number:04d}"
        if patient not in seen:
            seen.add(patient)
            ids.append(patient)
    return ids


def _plan(seed: int, train_per_class: int, test_per_class: int) -> list[tuple[str, PatientParams]]:
    """(split, params) of every patient, in a fixed order."""
    counts = [("train", train_per_class), ("test", test_per_class)]
    total = 2 * (train_per_class + test_per_class)
    rng = np.random.default_rng([seed, 0])
    ids = iter(_patient_ids(rng, total))
    seeds = iter(np.random.SeedSequence([seed, 3]).generate_state(total, dtype=np.uint64))
    plan = []
    for split, count in counts:
        for label in (1, 0):
            for _ in range(count):
                plan.append((split, random_patient(next(ids), label, int(next(seeds)))))
    return plan


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_dataset(
    folder: Path,
    seed: int,
    train_per_class: int,
    test_per_class: int,
    slices: int,
    lesions: bool = False,
) -> dict:
    plan = _plan(seed, train_per_class, test_per_class)
    lesion_records: dict[str, list] = {}
    for split in ("train", "test"):
        for name in CLASS_FOLDERS.values():
            (folder / split / name).mkdir(parents=True, exist_ok=True)

    def write(item: tuple[str, PatientParams]) -> None:
        split, params = item
        with_lesions = lesions and split == "test"
        if with_lesions:
            images, masks, drawn = render_patient_with_lesions(params, slices)
        else:
            images = render_patient(params, slices)
        class_dir = folder / split / CLASS_FOLDERS[params.label]
        for k, image in enumerate(images):
            path = class_dir / f"{params.patient}_{params.first_slice + k}.jpeg"
            path.write_bytes(_encode_jpeg(image))
            if with_lesions:
                np.save(mask_path(path), masks[k].astype(np.uint8))
                lesion_records[path.name] = [asdict(lesion) for lesion in drawn[k]]

    # NumPy and Pillow release the GIL in the heavy parts; threads avoid forking a process
    # that may already run TensorFlow.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(write, plan))

    summary = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "slices_per_patient": slices,
        "images": len(plan) * slices,
        "patients": len(plan),
        "splits": {
            split: {
                name: {
                    "patients": sum(1 for s, p in plan if s == split and p.label == label),
                    "images": slices * sum(1 for s, p in plan if s == split and p.label == label),
                }
                for label, name in CLASS_FOLDERS.items()
            }
            for split in ("train", "test")
        },
    }
    if lesions:
        summary["lesions"] = {
            "slices_with_lesions": sum(1 for found in lesion_records.values() if found),
            "lesions": sum(len(found) for found in lesion_records.values()),
            "test_slices": len(lesion_records),
        }
    info = {**summary, "patient_params": [{"split": s, **asdict(p)} for s, p in plan]}
    if lesions:
        info["lesions_per_slice"] = dict(sorted(lesion_records.items()))
    (folder / "demo_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return summary


def _check_counts(train_per_class: int, test_per_class: int, slices: int) -> None:
    if train_per_class < 1:
        raise ValueError(
            f"train_patients_per_class must be at least 1. Received: train_patients_per_class={train_per_class}"
        )
    if test_per_class < 1:
        raise ValueError(
            f"test_patients_per_class must be at least 1. Received: test_patients_per_class={test_per_class}"
        )
    if slices < 1:
        raise ValueError(
            f"slices_per_patient must be at least 1. Received: slices_per_patient={slices}"
        )


def generate_demo_dataset(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    train_patients_per_class: int = 40,
    test_patients_per_class: int | None = None,
    slices_per_patient: int = 20,
    lesions: bool = False,
) -> dict:
    """Write the synthetic set to `out/{train,test}/{AD,NC}/<patient>_<slice>.jpeg`.

    Files are written into a hidden temporary folder that is renamed to `out` when complete.
    The same seed gives byte-identical files.

    Args:
        out: the folder to create; it may exist only if empty.
        seed: random seed of patients, anatomy and noise.
        train_patients_per_class: patients per class in `train/`.
        test_patients_per_class: patients per class in `test/`; default
            `max(1, train_patients_per_class // 4)`.
        slices_per_patient: consecutive axial slices per patient.
        lesions: add synthetic lesions to about half of the test slices and write each test
            slice's mask beside it (`keras_vqpix.data.lesions`); the slices without lesions,
            and the whole train split, are byte for byte those of the same set without.

    Returns:
        A summary dict: `images`, `patients`, `seed`, `format_version`, `slices_per_patient`
        and `splits[split][class]` = `{"patients": n, "images": n}`; with `lesions`, also
        `lesions` = `{"slices_with_lesions", "lesions", "test_slices"}`. `demo_info.json`
        lists every lesion (centre, radius, contrast, tissue) per slice file.

    Raises:
        FileExistsError: `out` exists and is not empty.
        ValueError: a count is below 1.

    Example:

    >>> summary = generate_demo_dataset("demo", seed=0, train_patients_per_class=2)
    >>> summary["images"], summary["splits"]["test"]["AD"]
    (120, {'patients': 1, 'images': 20})
    """
    out = Path(out)
    if test_patients_per_class is None:
        test_patients_per_class = max(1, train_patients_per_class // 4)
    _check_counts(train_patients_per_class, test_patients_per_class, slices_per_patient)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    # An existing empty folder may be replaced; anything else is refused above.
    with atomic_directory(out, overwrite=out.exists()) as tmp:
        return _write_dataset(
            tmp,
            seed,
            train_patients_per_class,
            test_patients_per_class,
            slices_per_patient,
            lesions,
        )


def cache_root() -> Path:
    """`$KERAS_VQPIX_CACHE`, else `$XDG_CACHE_HOME/keras_vqpix`, else `~/.cache/keras_vqpix`."""
    if os.environ.get("KERAS_VQPIX_CACHE"):
        return Path(os.environ["KERAS_VQPIX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "keras_vqpix"
    return Path.home() / ".cache" / "keras_vqpix"


def _remove_stale_temporaries(root: Path, age_s: float = 3600.0) -> None:
    """Drop temporary folders that killed runs left beside `root` (a live run takes a minute)."""
    now = time.time()
    for path in root.parent.glob(f".{root.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > age_s:
                shutil.rmtree(path)


def ensure_demo_dataset(seed: int = 0) -> tuple[Path, bool]:
    """The default demo set in the cache, generated on first use: `(folder, created_now)`.

    The folder name carries `FORMAT_VERSION` and the seed (`demo-v1-seed0`), so a changed
    generator never reuses stale files. Two processes may race: each writes its own temporary
    folder and renames it into place; the loser drops its copy and uses the winner's.

    Raises:
        FileExistsError: the cache folder exists but holds something else.
    """
    root = cache_root() / f"demo-v{FORMAT_VERSION}-seed{seed}"
    if (root / "demo_info.json").is_file():
        return root, False
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists but is not a complete demo set; remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write_dataset(tmp, seed, 40, 10, 20)
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # an empty leftover would block the rename
            os.rename(tmp, root)
        except OSError:
            if (root / "demo_info.json").is_file():
                return root, False  # another process finished first
            raise
        return root, True
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
