"""The synthetic demo data set: layout, image format, determinism, and a real AD/NC difference."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keras_vqpix.data import demo, discover_splits, patient_and_slice
from keras_vqpix_cli.main import main

SLICES = 4


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "set"
    summary = demo.generate_demo_dataset(
        out, seed=1, train_patients_per_class=2, slices_per_patient=SLICES
    )
    return out, summary


def test_layout_counts_and_summary(small_set):
    out, summary = small_set
    # Test patients default to a quarter of the train patients, at least one.
    expected = {"train": 2, "test": 1}
    for split, patients in expected.items():
        for name in ("AD", "NC"):
            files = sorted((out / split / name).iterdir())
            assert len(files) == patients * SLICES
            assert len({patient_and_slice(f.name)[0] for f in files}) == patients
            assert summary["splits"][split][name] == {
                "patients": patients,
                "images": patients * SLICES,
            }
    assert summary["patients"] == 6
    assert summary["images"] == 6 * SLICES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_images_are_256x240_grayscale_jpegs_with_black_background(small_set):
    out, _ = small_set
    for path in sorted(out.rglob("*.jpeg")):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "L"
            assert image.size == (256, 240)
            pixels = np.asarray(image)
        assert pixels[:10, :10].mean() < 8  # skull-stripped: the corners are background
        assert pixels[100:140, 108:148].mean() > 40  # the centre is brain


def test_names_parse_into_adni_patient_ids_and_consecutive_slices(small_set):
    out, _ = small_set
    slices_of: dict[str, list[int]] = {}
    for path in out.rglob("*.jpeg"):
        patient, slice_index = patient_and_slice(path.name)
        assert path.name == f"{patient}_{slice_index}.jpeg"
        site, letter, number = patient.split("_")
        assert letter == "S" and len(site) == 3 and len(number) == 4
        slices_of.setdefault(patient, []).append(slice_index)
    for indices in slices_of.values():
        indices.sort()
        assert indices == list(range(indices[0], indices[0] + SLICES))
        assert 50 <= indices[0] <= 100


def test_no_patient_in_two_splits_or_classes_and_discover_accepts_it(small_set):
    out, _ = small_set
    owners: dict[str, set[str]] = {}
    for path in out.rglob("*.jpeg"):
        owners.setdefault(patient_and_slice(path.name)[0], set()).add(str(path.parent))
    assert all(len(folders) == 1 for folders in owners.values())
    splits = discover_splits(out)
    assert len(splits.test) == 2 * SLICES
    assert len(splits.train) + len(splits.validation) == 4 * SLICES


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(small_set, tmp_path: Path):
    out, _ = small_set
    again = tmp_path / "again"
    demo.generate_demo_dataset(again, seed=1, train_patients_per_class=2, slices_per_patient=SLICES)
    assert tree_digest(again) == tree_digest(out)

    other = tmp_path / "other"
    demo.generate_demo_dataset(other, seed=2, train_patients_per_class=2, slices_per_patient=SLICES)
    first = sorted(out.rglob("*.jpeg"))
    second = sorted(other.rglob("*.jpeg"))
    assert {p.name for p in first}.isdisjoint({p.name for p in second})
    images_1 = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in first])
    images_2 = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in second])
    assert np.abs(images_1 - images_2).mean() > 5


def test_refuses_a_non_empty_folder_but_fills_an_empty_one(tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        demo.generate_demo_dataset(full, train_patients_per_class=2, slices_per_patient=1)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    summary = demo.generate_demo_dataset(empty, train_patients_per_class=2, slices_per_patient=1)
    assert summary["images"] == 6


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"train_patients_per_class": 0}, "train_patients_per_class"),
        ({"test_patients_per_class": 0}, "test_patients_per_class"),
        ({"slices_per_patient": 0}, "slices_per_patient"),
    ],
)
def test_bad_counts_are_rejected(tmp_path: Path, kwargs, name):
    with pytest.raises(ValueError, match=f"Received: {name}=0"):
        demo.generate_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def dark_fraction(image: np.ndarray) -> float:
    """Share of CSF-dark pixels in the central box where the lateral and third ventricles lie."""
    brain = image[image > 20]
    centre = image[70:170, 98:158].astype(np.float32)
    return float((centre < 0.3 * np.percentile(brain, 90)).mean())


def test_ad_patients_have_larger_ventricles_than_nc(tmp_path: Path):
    out = tmp_path / "ventricles"
    demo.generate_demo_dataset(
        out, seed=5, train_patients_per_class=8, test_patients_per_class=1, slices_per_patient=6
    )
    per_patient: dict[tuple[str, str], list[float]] = {}
    for path in out.glob("train/*/*.jpeg"):
        key = (path.parent.name, patient_and_slice(path.name)[0])
        per_patient.setdefault(key, []).append(dark_fraction(np.asarray(Image.open(path))))
    ad = [np.mean(v) for (label, _), v in per_patient.items() if label == "AD"]
    nc = [np.mean(v) for (label, _), v in per_patient.items() if label == "NC"]
    assert len(ad) == len(nc) == 8
    # On average clearly larger, though single patients may overlap as in real data.
    assert np.mean(ad) > 1.3 * np.mean(nc)


def test_ensure_demo_dataset_generates_once_into_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KERAS_VQPIX_CACHE", str(tmp_path / "cache"))
    calls = []

    def tiny(folder, seed, train, test, slices):
        calls.append(seed)
        return real(folder, seed, 2, 1, 1)

    real = demo._write_dataset
    monkeypatch.setattr(demo, "_write_dataset", tiny)
    root, created = demo.ensure_demo_dataset(seed=4)
    assert created and root == tmp_path / "cache" / f"demo-v{demo.FORMAT_VERSION}-seed4"
    discover_splits(root)
    again, created_again = demo.ensure_demo_dataset(seed=4)
    assert again == root and not created_again
    assert calls == [4]
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KERAS_VQPIX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == tmp_path / "xdg" / "keras_vqpix"
    monkeypatch.setenv("KERAS_VQPIX_CACHE", str(tmp_path / "mine"))
    assert demo.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("KERAS_VQPIX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == tmp_path / "home" / ".cache" / "keras_vqpix"


def test_cli_demo_data(tmp_path: Path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["demo-data", str(out), "--seed", "3", "--patients-per-class", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 120 slices of 6 patients" in result.output
    discover_splits(out)

    result = CliRunner().invoke(
        main, ["demo-data", str(out), "--seed", "3", "--patients-per-class", "2"]
    )
    assert result.exit_code == 2, result.output
    assert "not empty" in result.output


def test_ensure_demo_dataset_loser_of_a_race_uses_the_winners_folder(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KERAS_VQPIX_CACHE", str(tmp_path / "cache"))
    real = demo._write_dataset
    root = tmp_path / "cache" / f"demo-v{demo.FORMAT_VERSION}-seed0"

    def slow_loser(folder, seed, train, test, slices):
        # Another process finishes and renames its folder while this one is still writing.
        real(root, seed, 2, 1, 1)
        return real(folder, seed, 2, 1, 2)

    monkeypatch.setattr(demo, "_write_dataset", slow_loser)
    got, created = demo.ensure_demo_dataset()
    assert got == root and not created
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # own copy removed
    assert len(list(root.rglob("*.jpeg"))) == 6  # the winner's one-slice set, untouched


def test_ensure_demo_dataset_clears_stale_temporaries_and_refuses_foreign_folders(
    tmp_path: Path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KERAS_VQPIX_CACHE", str(cache))
    real = demo._write_dataset
    monkeypatch.setattr(
        demo, "_write_dataset", lambda folder, seed, *_: real(folder, seed, 2, 1, 1)
    )
    name = f"demo-v{demo.FORMAT_VERSION}-seed0"
    stale, fresh = cache / f".{name}.old1.tmp", cache / f".{name}.live.tmp"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    os.utime(stale, (0, 0))
    root, created = demo.ensure_demo_dataset()
    assert created
    assert not stale.exists() and fresh.exists()  # a run in progress keeps its folder

    foreign = cache / f"demo-v{demo.FORMAT_VERSION}-seed9"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a demo set")
    with pytest.raises(FileExistsError, match="seed9"):
        demo.ensure_demo_dataset(seed=9)


def test_generator_needs_neither_tensorflow_nor_scipy_nor_nilearn():
    code = (
        "import sys, keras_vqpix.data.demo, keras_vqpix.data.demo_render as render; "
        "render._load_template(); "
        "print(sorted({'tensorflow', 'scipy', 'nilearn', 'keras'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lesions_only_in_test_slices_with_masks_beside_them(small_set, tmp_path: Path):
    from keras_vqpix.data.lesions import load_mask, mask_path

    plain, _ = small_set
    out = tmp_path / "lesions"
    summary = demo.generate_demo_dataset(
        out, seed=1, train_patients_per_class=2, slices_per_patient=SLICES, lesions=True
    )
    plain_files, lesion_files = tree_digest(plain), tree_digest(out)
    slices = [name for name in lesion_files if name.endswith(".jpeg")]
    assert sorted(slices) == sorted(n for n in plain_files if n.endswith(".jpeg"))
    with_lesions = 0
    for name in slices:
        mask = load_mask(out / name)
        if name.startswith("train"):
            assert mask is None and lesion_files[name] == plain_files[name]
            continue
        assert mask.shape == (240, 256) and mask_path(out / name).is_file()
        if mask.any():  # the lesion is in the image, inside the mask, and inside the head
            with_lesions += 1
            changed = np.asarray(Image.open(out / name), float) - np.asarray(
                Image.open(plain / name), float
            )
            assert np.abs(changed[mask]).mean() > 4 * np.abs(changed[~mask]).mean() + 1
            assert np.all(np.asarray(Image.open(plain / name))[mask] > 0)
        else:  # a slice without a lesion is byte for byte the plain set's
            assert lesion_files[name] == plain_files[name]
    assert summary["lesions"]["slices_with_lesions"] == with_lesions > 0
    assert summary["lesions"]["test_slices"] == 2 * SLICES
