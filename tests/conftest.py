"""Shared fixtures: tiny ADNI-layout folders made on the fly (no demo template needed)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_slice(path: Path, rng: np.random.Generator, size=(256, 240), radius_scale=1.0) -> None:
    """A bright noisy ellipse on black, 8-bit grayscale, PIL size (width, height)."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = height / 2 + rng.normal(0, 4), width / 2 + rng.normal(0, 4)
    ry, rx = height * 0.38 * radius_scale, width * 0.32 * radius_scale
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ventricle = ((yy - cy) / (ry * 0.25)) ** 2 + ((xx - cx) / (rx * 0.12)) ** 2 <= 1
    image = np.where(inside, 150 + 40 * np.sin(xx / 7.0) * np.cos(yy / 9.0), 0.0)
    image = np.where(ventricle, 30, image) + rng.normal(0, 4, image.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(path, quality=92)


def make_adni_folder(
    root: Path, train_patients: int = 5, test_patients: int = 2, slices: int = 4, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_patients), ("test", test_patients)):
        for label in ("AD", "NC"):
            for p in range(count):
                patient = f"{split[:2]}{label}{p:03d}_S_{p:04d}"
                for s in range(slices):
                    write_slice(
                        root / split / label / f"{patient}_{70 + s}.jpeg",
                        rng,
                        radius_scale=0.9 if label == "AD" else 1.0,
                    )
    return root


@pytest.fixture(scope="session")
def tiny_adni(tmp_path_factory) -> Path:
    """ROOT/{train,test}/{AD,NC}: 5 train and 2 test patients per class, 4 slices each."""
    return make_adni_folder(tmp_path_factory.mktemp("adni"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo set (16 train and 4 test patients per class, 800 slices) from `vqpix demo-data`."""
    from keras_vqpix.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(root, seed=0, train_patients_per_class=16)
    return root


@pytest.fixture(scope="session")
def quick_run(tiny_adni, tmp_path_factory) -> Path:
    """`vqpix train --config quick` (both stages) on `tiny_adni`, trained once per session.

    Tests must not change it; copy it (`shutil.copytree`) to modify.
    """
    from click.testing import CliRunner

    from keras_vqpix_cli.main import main

    out = tmp_path_factory.mktemp("quick_run") / "run"
    result = CliRunner().invoke(
        main, ["train", "--config", "quick", "--data", str(tiny_adni), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Prior: best epoch" in result.output
    return out
