"""Data discovery, the patient-level split and the tf.data pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from keras_vqpix.data import (
    DatasetLayoutError,
    SliceRecord,
    discover_folder,
    discover_splits,
    patient_and_slice,
    split_by_patient,
)


def synthetic_records(patients_per_class: int, slices: int = 20) -> list[SliceRecord]:
    return [
        SliceRecord(f"{label}_{p:03d}_S_{p}", s, f"/x/{label}_{p}_{s}.jpeg", label)
        for label in (0, 1)
        for p in range(patients_per_class)
        for s in range(slices)
    ]


def test_patient_id_is_everything_before_the_last_underscore():
    assert patient_and_slice("941_S_1311_78.jpeg") == ("941_S_1311", 78)
    assert patient_and_slice("/a/b/1182968_94.jpeg") == ("1182968", 94)
    assert patient_and_slice("lonely.png") == ("lonely", 0)


@pytest.mark.parametrize("patients", [5, 12, 40, 101])
@pytest.mark.parametrize("seed", [0, 7])
def test_split_by_patient_has_no_leak_is_stratified_and_about_80_20(patients, seed):
    records = synthetic_records(patients)
    train, validation = split_by_patient(records, 0.2, seed)
    train_patients = {r.patient for r in train}
    validation_patients = {r.patient for r in validation}
    assert not train_patients & validation_patients
    assert len(train) + len(validation) == len(records)
    for label in (0, 1):
        class_val = {r.patient for r in validation if r.label == label}
        class_all = {r.patient for r in records if r.label == label}
        assert len(class_val) >= 1
        assert abs(len(class_val) / len(class_all) - 0.2) <= 0.5 / len(class_all) + 1e-9
    # Every slice of a validation patient is in validation.
    assert all(r.patient in validation_patients for r in records if r.patient not in train_patients)


def test_split_is_deterministic_and_seed_dependent():
    records = synthetic_records(40)
    a = split_by_patient(records, 0.2, 3)
    b = split_by_patient(list(reversed(records)), 0.2, 3)
    assert {r.patient for r in a[1]} == {r.patient for r in b[1]}
    c = split_by_patient(records, 0.2, 4)
    assert {r.patient for r in a[1]} != {r.patient for r in c[1]}


def test_discover_splits_on_disk(tiny_adni: Path):
    splits = discover_splits(tiny_adni, 0.2, seed=0)
    assert len(splits.test) == 2 * 2 * 4
    assert len(splits.train) + len(splits.validation) == 2 * 5 * 4
    assert not {r.patient for r in splits.train} & {r.patient for r in splits.validation}
    assert not {r.patient for r in splits.train} & {r.patient for r in splits.test}
    assert {r.label for r in splits.validation} == {0, 1}
    assert splits.summary()["test"]["patients"] == 4


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetLayoutError, match=r"does not exist.*expected ROOT/\{train,test\}"):
        discover_folder(tmp_path / "nope", "train")


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train" / "AD").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="holds no .jpeg"):
        discover_folder(tmp_path, "train")


def test_wrong_layout_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "images" / "a_1.jpeg").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="no AD or NC subfolder"):
        discover_folder(tmp_path, "train")
    with pytest.raises(DatasetLayoutError, match="test is missing"):
        discover_folder(tmp_path, "test")


def test_pipeline_shapes_dtype_range_and_determinism(tiny_adni: Path):
    import tensorflow as tf

    from keras_vqpix.data.pipeline import make_dataset, steps_per_epoch

    splits = discover_splits(tiny_adni, 0.2, seed=0)
    steps = steps_per_epoch(len(splits.train), 8)

    def epoch(seed, first_epoch=0, skip=0):
        dataset = make_dataset(
            splits.train, 32, 8, shuffle=True, seed=seed, first_epoch=first_epoch
        )
        return [
            (images.numpy(), labels.numpy()) for images, labels in dataset.skip(skip).take(steps)
        ]

    batches = epoch(1)
    images, labels = batches[0]
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels) <= {0, 1}
    all_images = np.concatenate([b[0] for b in batches])
    assert all_images.shape[0] == len(splits.train)
    assert all_images.min() >= 0.0 and all_images.max() <= 1.0 and all_images.max() > 0.4
    again = epoch(1)
    for (a, la), (b, lb) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    other = epoch(2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))
    # Epoch 1 of a run has the same order as the first epoch of a run resumed at epoch 1,
    # and differs from epoch 0.
    second = epoch(1, skip=steps)
    resumed = epoch(1, first_epoch=1)
    for (a, _), (b, _) in zip(second, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, second, strict=True))
    # Each epoch holds every image exactly once (batches never straddle epochs).
    assert sorted(np.concatenate([b[0] for b in second]).sum(axis=(1, 2, 3)).round(3)) == sorted(
        all_images.sum(axis=(1, 2, 3)).round(3)
    )
    # Unshuffled: file order, the whole set exactly once.
    plain = make_dataset(splits.train, 32, 64)
    assert sum(int(tf.shape(x)[0]) for x, _ in plain) == len(splits.train)


@pytest.mark.parametrize(
    ("records", "batch", "min_batch", "sizes"),
    [
        (10, 4, 1, [4, 4, 2]),  # one device: plain batching
        (32, 31, 2, [30, 2]),  # a last batch of 1 for 2 replicas: split anew
        (33, 16, 2, [16, 15, 2]),
        (9, 4, 4, [4, 5]),  # 4 + 1 cannot be split into two of >= 4: merged
        (10, 4, 2, [4, 4, 2]),  # nothing to change
        (3, 8, 2, [3]),
    ],
)
def test_batch_sizes_give_no_batch_fewer_examples_than_replicas(records, batch, min_batch, sizes):
    from keras_vqpix.data.pipeline import batch_sizes, steps_per_epoch

    assert batch_sizes(records, batch, min_batch) == sizes
    assert steps_per_epoch(records, batch, min_batch=min_batch) == len(sizes)


@pytest.mark.parametrize(
    ("records", "batch", "min_batch", "message"),
    [(1, 4, 2, "cannot give each of 2 replicas"), (8, 1, 2, "smaller than the 2 replicas")],
)
def test_batch_sizes_refuse_what_would_leave_a_replica_empty(records, batch, min_batch, message):
    from keras_vqpix.data.pipeline import batch_sizes

    with pytest.raises(ValueError, match=message):
        batch_sizes(records, batch, min_batch)


def test_the_pipeline_batches_by_the_plan_and_keeps_every_slice(tiny_adni: Path):
    from keras_vqpix.data.pipeline import make_dataset

    records = discover_splits(tiny_adni, 0.2, seed=0).train[:9]
    for shuffle in (False, True):
        dataset = make_dataset(records, 16, 4, shuffle=shuffle, min_batch=4).take(2)
        batches = [images.numpy() for images, _ in dataset]
        assert [len(b) for b in batches] == [4, 5]
        sums = np.concatenate(batches).sum(axis=(1, 2, 3))
        assert len(np.unique(sums.round(4))) == 9  # each of the 9 slices once


def test_decode_keeps_aspect_ratio_with_black_padding(tmp_path: Path):
    from PIL import Image

    from keras_vqpix.data import load_image

    path = tmp_path / "p_1.png"
    Image.fromarray(np.full((240, 256), 200, np.uint8), mode="L").save(path)
    image = load_image(str(path), 64).numpy()[..., 0]
    # 256 wide x 240 high -> 64 x 60 plus two black rows above and below.
    assert image.shape == (64, 64)
    assert image[:2].max() == 0 and image[-2:].max() == 0
    np.testing.assert_allclose(image[3:-3], 200 / 255, atol=1e-3)


def test_rgb_and_16_bit_files_become_grayscale_in_unit_range(tmp_path: Path):
    from PIL import Image

    from keras_vqpix.data import load_image

    rgb = tmp_path / "rgb_1.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8), mode="RGB").save(rgb)
    deep = tmp_path / "deep_1.png"
    Image.fromarray(np.full((40, 40), 65535 // 2, np.uint16)).save(deep)
    for path in (rgb, deep):
        image = load_image(str(path), 16).numpy()
        assert image.shape == (16, 16, 1)
        np.testing.assert_allclose(image, 0.5, atol=0.01)
