"""Odd and broken files in the data folders: converted, or skipped and reported, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import encoded, make_adni_folder, write_slice
from PIL import Image

from keras_vqpix.data import DatasetLayoutError, discover_splits
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.usefixtures("time_limit")
FUZZ_FILES = 320
FUZZ_TIMEOUT = 150  # seconds, TensorFlow's import included


def test_odd_images_are_converted_to_the_square_grayscale_input(odd_adni):
    from keras_vqpix.data import load_image

    root, odd = odd_adni
    for name in odd["readable"]:
        image = load_image(os.fsencode(root / name), 32).numpy()
        assert image.shape == (32, 32, 1) and image.dtype == np.float32, name
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.2, name


def test_rgb_alpha_and_16_bit_give_the_gray_values_of_the_8_bit_slice(tmp_path):
    from keras_vqpix.data import load_image

    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    variants = {
        "gray.png": Image.fromarray(gray),
        "rgb.png": Image.fromarray(np.stack([gray] * 3, -1)),
        "deep.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "opaque_la.png": Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1)),
        "bmp.png": Image.fromarray(np.stack([gray] * 3, -1)),
    }
    for name, image in variants.items():
        (tmp_path / name).write_bytes(encoded(image, "BMP" if name == "bmp.png" else "PNG"))
    reference = load_image(str(tmp_path / "gray.png"), 32).numpy()
    for name in variants:
        np.testing.assert_allclose(load_image(str(tmp_path / name), 32), reference, atol=2e-3)
    # Transparent pixels are composited onto the black background.
    alpha = np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None].repeat(48, 0)
    (tmp_path / "half.png").write_bytes(
        encoded(Image.fromarray(np.stack([gray, alpha], -1)), "PNG")
    )
    image = load_image(str(tmp_path / "half.png"), 64).numpy()[8:-8, :, 0]  # 8 rows of padding
    assert image[:, :32].max() == 0.0 and image[:, 34:].min() > 0.4


def test_resize_with_pad_matches_tensorflow_and_keeps_a_strip(tmp_path):
    import tensorflow as tf

    from keras_vqpix.data.pipeline import resize_with_pad

    rng = np.random.default_rng(0)
    for height, width, size in [
        (240, 256, 32),
        (100, 512, 32),
        (37, 19, 16),
        (8, 8, 64),
        (10, 300, 32),
    ]:
        image = tf.constant(rng.random((height, width, 1)), tf.float32)
        expected = tf.image.resize_with_pad(image, size, size, antialias=True)
        np.testing.assert_array_equal(resize_with_pad(image, size), expected)
    # tf.image.resize_with_pad fails on these ("output dimensions must be positive").
    for shape in [(1, 3000, 1), (3000, 1, 1)]:
        strip = resize_with_pad(tf.ones(shape), 32).numpy()[..., 0]
        assert strip.shape == (32, 32)
        assert np.count_nonzero(strip.max(axis=1 if shape[0] == 1 else 0)) == 1


def test_unreadable_files_are_found_with_a_reason(odd_adni):
    from keras_vqpix.data.screen import unreadable_files

    root, odd = odd_adni
    names = odd["readable"] + odd["unreadable"]
    reasons = unreadable_files([str(root / name) for name in names])
    assert sorted(names[i] for i in reasons) == odd["unreadable"]
    by_name = {names[i]: reason for i, reason in reasons.items()}
    assert by_name["train/AD/trAD000_S_0000_90.jpeg"] == "empty file"
    assert "JPEG" in by_name["train/AD/trAD001_S_0001_91.jpeg"]
    assert "PNG" in by_name["train/NC/trNC001_S_0001_91.png"]
    assert "Unknown image file format" in by_name["train/NC/trNC000_S_0000_90.png"]
    assert all(reason and "\n" not in reason for reason in reasons.values())


def test_discover_splits_leaves_unreadable_files_out_and_the_rest_feeds_an_epoch(odd_adni):
    from keras_vqpix.data.pipeline import make_dataset
    from keras_vqpix.data.screen import unreadable_files

    root, odd = odd_adni
    plain = discover_splits(root, 0.2, seed=0)
    assert plain.skipped == ()
    splits = discover_splits(root, 0.2, seed=0, unreadable=unreadable_files)
    skipped = sorted(os.path.relpath(path, root) for path, _ in splits.skipped)
    assert skipped == odd["unreadable"]
    kept = {
        os.path.relpath(r.path, root)
        for s in (splits.train, splits.validation, splits.test)
        for r in s
    }
    assert kept.isdisjoint(skipped) and set(odd["readable"]) <= kept
    # Hidden files, other suffixes, subfolders and folders named like a slice are no slices.
    assert all(Path(name).suffix.lower() in (".jpeg", ".jpg", ".png") for name in kept)
    assert not any(Path(name).name.startswith(".") for name in kept)
    assert {"train/AD/extra/trAD000_S_0000_99.jpeg", "train/NC/trNC003_S_0003_95.jpeg"}.isdisjoint(
        kept
    )
    assert len(kept) + len(skipped) == sum(
        len(s) for s in (plain.train, plain.validation, plain.test)
    )
    for records in (splits.train, splits.validation, splits.test):
        images = np.concatenate([x.numpy() for x, _ in make_dataset(records, 32, 8)])
        assert images.shape == (len(records), 32, 32, 1) and np.isfinite(images).all()


def test_a_folder_where_nothing_is_readable_is_exit_2_before_anything_is_written(tmp_path):
    root = make_adni_folder(tmp_path / "data", train_patients=2, test_patients=1, slices=2)
    for path in (root / "train").rglob("*.jpeg"):
        path.write_bytes(b"")
    from keras_vqpix.data.screen import unreadable_files

    with pytest.raises(
        DatasetLayoutError, match=r"no image file in .*train can be read \(e\.g\. .*: empty file\)"
    ):
        discover_splits(root, 0.2, unreadable=unreadable_files)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--config", "quick", "--data", str(root), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "can be read" in error_lines[0]
    assert not out.exists()


FUZZ_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from keras_vqpix.data import discover_splits
    from keras_vqpix.data.pipeline import make_dataset, steps_per_epoch
    from keras_vqpix.data.screen import unreadable_files
    started = time.monotonic()
    splits = discover_splits(sys.argv[1], 0.2, seed=0, unreadable=unreadable_files)
    counts = {"skipped": len(splits.skipped)}
    for name in ("train", "validation", "test"):
        records = getattr(splits, name)
        dataset = make_dataset(records, 32, 16, shuffle=name == "train", seed=0)
        seen = sum(int(x.shape[0]) for x, _ in dataset.take(steps_per_epoch(len(records), 16)))
        counts[name] = len(records)
        assert seen == len(records), (name, seen, len(records))
    counts["seconds"] = time.monotonic() - started
    print(json.dumps(counts))
    """
)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Random byte flips, a truncation, or both."""
    data = bytearray(data)
    kind = rng.integers(3)
    if kind != 1:
        for position in rng.integers(0, len(data), rng.integers(1, 12)):
            data[position] = rng.integers(256)
    if kind != 0:
        data = data[: rng.integers(0, len(data))]
    return bytes(data)


@pytest.mark.large
def test_fuzzed_jpeg_and_png_files_neither_crash_nor_hang_the_pipeline(tmp_path):
    root = make_adni_folder(tmp_path / "data", train_patients=3, test_patients=1, slices=2)
    rng = np.random.default_rng(2024)
    gray = Image.open(next((root / "train" / "AD").glob("*.jpeg")))
    seeds = {
        ".jpeg": encoded(gray, "JPEG", quality=90),
        ".jpg": encoded(gray.convert("RGB"), "JPEG"),
        ".png": encoded(gray, "PNG"),
        ".PNG": encoded(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"),
    }
    suffixes = sorted(seeds)
    folders = [root / s / c for s in ("train", "test") for c in ("AD", "NC")]
    for i in range(FUZZ_FILES):
        suffix = suffixes[i % len(suffixes)]
        folder = folders[i % len(folders)]
        patient = f"fz{folder.parent.name[:2]}{folder.name}{i % 7:03d}_S_{i % 7:04d}"
        (folder / f"{patient}_{100 + i}{suffix}").write_bytes(mutate(seeds[suffix], rng))
    write_slice(root / "test" / "NC" / "extra000_S_0000_1.jpeg", rng)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=FUZZ_TIMEOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    total = FUZZ_FILES + 2 * (3 * 2 + 1 * 2) + 1  # fuzzed, clean slices, the extra one
    assert counts["skipped"] + counts["train"] + counts["validation"] + counts["test"] == total
    # The fuzzing did produce both kinds: damaged files that still decode, and unreadable ones.
    assert 20 < counts["skipped"] < FUZZ_FILES
    assert time.monotonic() - started < FUZZ_TIMEOUT
