"""Shared fixtures: tiny ADNI-layout folders made on the fly (no demo template needed), with odd files."""

from __future__ import annotations

import faulthandler
import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from keras_vqpix.config import PATIENTS_FILTERS  # noqa: E402


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


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def add_odd_files(root: Path, seed: int = 1) -> dict[str, list[str]]:
    """Add to an ADNI folder what real exports hold besides clean slices.

    Extra slices of existing patients that must be converted (RGB, 16-bit, gray + alpha, BMP
    under a .png name, odd sizes, odd names: a space and an upper-case suffix, a name that is not
    UTF-8), files that must be skipped (empty, truncated, text, TIFF), and entries that are no
    slice at all (hidden files, other suffixes, folders). Returns the names of the readable and
    of the unreadable files added (paths relative to `root`, as `os.fsdecode` spells them).
    """
    rng = np.random.default_rng(seed)
    gray = np.clip(rng.normal(120, 40, (240, 256)), 0, 255).astype(np.uint8)
    jpeg = encoded(Image.fromarray(gray), "JPEG", quality=90)
    png = encoded(Image.fromarray(gray), "PNG")
    readable = {
        "train/AD/trAD000_S_0000_80.png": encoded(
            Image.fromarray(np.stack([gray[:128, :128]] * 3, -1)), "PNG"
        ),
        "train/AD/trAD001_S_0001_81.png": encoded(
            Image.fromarray(gray.astype(np.uint16) * 257), "PNG"
        ),
        "train/AD/trAD002_S_0002_82.png": encoded(Image.fromarray(gray).convert("RGB"), "BMP"),
        "train/NC/trNC000_S_0000_80.jpeg": encoded(Image.fromarray(gray[:50]), "JPEG"),
        "train/NC/trNC001_S_0001_81 copy.JPG": encoded(
            Image.fromarray(gray).convert("RGB").resize((300, 300)), "JPEG"
        ),
        os.fsdecode(b"train/NC/trNC002_S_0002_\xff82.jpeg"): jpeg,
        "test/AD/teAD000_S_0000_80.png": encoded(
            Image.fromarray(np.stack([gray[:64, :64], gray[:64, :64]], -1)), "PNG"
        ),
    }
    unreadable = {
        "train/AD/trAD000_S_0000_90.jpeg": b"",
        "train/AD/trAD001_S_0001_91.jpeg": jpeg[: len(jpeg) // 2],
        os.fsdecode(b"train/AD/trAD003_S_0003_\xfe92.jpeg"): b"",
        "train/NC/trNC000_S_0000_90.png": b"not an image\n",
        "train/NC/trNC001_S_0001_91.png": png[: len(png) // 3],
        "test/NC/teNC000_S_0000_90.jpeg": encoded(Image.fromarray(gray), "TIFF"),
    }
    ignored = {
        "train/AD/.DS_Store": b"\0\0\0\1Bud1",
        "train/AD/._trAD000_S_0000_70.jpeg": b"\0\5\26\7AppleDouble",
        "train/NC/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "train/AD/notes.txt": b"scanner notes\n",
        "train/AD/extra/trAD000_S_0000_99.jpeg": jpeg,
    }
    for name, data in {**readable, **unreadable, **ignored}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train" / "NC" / "trNC003_S_0003_95.jpeg").mkdir()  # a folder named like a slice
    return {"readable": sorted(readable), "unreadable": sorted(unreadable)}


@pytest.fixture(scope="session")
def odd_adni(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """`tiny_adni`'s layout plus `add_odd_files`: (root, names of the odd files added)."""
    root = make_adni_folder(tmp_path_factory.mktemp("odd_adni"))
    return root, add_odd_files(root)


@pytest.fixture(scope="module")
def time_limit():
    """Bound a whole test module in time: should anything hang (a training run, a decoder), the
    test process exits after 20 minutes with every thread's traceback instead of waiting forever.
    (Subprocesses have their own timeouts.)"""
    faulthandler.dump_traceback_later(20 * 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


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


@pytest.fixture(scope="module")
def quick_prior(quick_run):
    """The prior `vqpix train --config quick` trained (8x8 code maps, K = 16; it reads the
    previous slice, as the `patients` preset's)."""
    from keras_vqpix.run_folder import load_prior

    return load_prior(quick_run)[0]


# -- Priors with random weights (test_pixelcnn_steps, test_fast_sampling) --------------------------
def random_prior(shape=(4, 5), **kwargs):
    """A built `PixelCNN` whose biases and label embeddings are random too (not zeros)."""
    import keras
    import tensorflow as tf

    from keras_vqpix.models.pixelcnn import PixelCNN

    keras.utils.set_random_seed(1)
    prior = PixelCNN(code_shape=shape, **kwargs)
    prior(tf.zeros((1, *shape), tf.int32), tf.zeros((1,), tf.int32))
    for variable in prior.weights:
        if any(part in variable.path for part in ("bias", "label", "position", "previous")):
            variable.assign(tf.random.normal(variable.shape, stddev=0.5, seed=2))
    return prior


def placed_prior(shape=(4, 5), num_positions: int = 4):
    """A small `random_prior` that reads slice positions (no previous slice) and whose position
    weights are large enough that the position changes what it draws (at init it barely does)."""
    prior = random_prior(
        shape,
        num_embeddings=16,
        num_layers=2,
        filters=8,
        embedding_dim=4,
        slice_positions=num_positions,
    )
    for weight in prior.slice_context.weights:
        weight.assign(weight * 50.0)
    return prior


ARCHITECTURES = {
    # The default prior (PriorConfig) with K = 256.
    "default": dict(
        num_embeddings=256,
        num_layers=9,
        filters=48,
        embedding_dim=32,
        position_embedding=True,
        dilation_cycle=4,
        slice_positions=20,
        dropout=0.1,
    ),
    "quick": dict(
        num_embeddings=16,
        num_layers=2,
        filters=16,
        embedding_dim=8,
        position_embedding=True,
        previous_slice=True,
        slice_positions=4,
    ),
    "kernel5_unconditional": dict(
        num_embeddings=8, num_layers=2, filters=8, kernel_size=5, embedding_dim=3, conditional=False
    ),
    # Vertical stacks dilated 1, 2, 4, 1: reaches beyond the 4-row map, as on a real map.
    "dilated": dict(
        num_embeddings=16,
        num_layers=3,
        filters=8,
        embedding_dim=4,
        dilation_cycle=3,
        position_embedding=True,
    ),
    # Causal self-attention after blocks 1 and 3 (PixelSNAIL), with slice positions.
    "attention": dict(
        num_embeddings=16,
        num_layers=3,
        filters=8,
        embedding_dim=4,
        dilation_cycle=2,
        position_embedding=True,
        slice_positions=4,
        attention_every=2,
        attention_dim=8,
        attention_heads=2,
    ),
}
# The `patients` preset's prior: the default's with slice context, narrower.
ARCHITECTURES["patients"] = {
    **ARCHITECTURES["default"],
    "filters": PATIENTS_FILTERS,
    "previous_slice": True,
    "slice_positions": 20,
    "dropout": 0.0,
}


# -- get_config round trips that fail when an argument is lost ---------------------------------------
def assert_config_round_trip(cls, arguments: dict, *, optional_kept: tuple[str, ...] = ()):
    """`cls(**arguments)` and its `from_config` clone both report every argument given.

    Every constructor argument of `cls` must be given (`optional_kept`: those left out on
    purpose) with a value other than its default, so an argument dropped from `get_config`, or
    from `from_config`, shows up as the default in its place. Compared with the arguments given,
    not with the first `get_config`: a field dropped from both would otherwise pass.
    """
    import inspect

    import keras

    parameters = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    missing = sorted(set(parameters) - set(arguments) - set(optional_kept))
    assert not missing, f"{cls.__name__}: give every argument a value; missing {missing}"
    for name, value in arguments.items():
        assert parameters[name].default != value, f"{name}={value!r} is the default"

    def expected(name, value):
        if name.endswith("_initializer"):
            return keras.initializers.serialize(keras.initializers.get(value))
        return list(value) if isinstance(value, tuple) else value

    original = cls(**arguments)
    clone = cls.from_config(original.get_config())
    for which, instance in (("get_config", original), ("from_config clone", clone)):
        config = instance.get_config()
        for name, value in arguments.items():
            got = config[name]
            got = list(got) if isinstance(got, tuple) else got
            assert got == expected(name, value), f"{cls.__name__} {which}: {name}={got!r}"
    return clone
