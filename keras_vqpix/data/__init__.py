"""Data: discover ADNI-style slices, split by patient, build `tf.data` pipelines, make demo data.

`discover` needs only NumPy; `pipeline` and `screen` (which files cannot be read) import
TensorFlow and `adni` (NIfTI volumes -> slice layout) imports nibabel; they are loaded on first
use, so tools that only list files start fast.
"""

from keras_vqpix.data.discover import (
    CLASS_NAMES,
    LABELS,
    DatasetLayoutError,
    DataSplits,
    SliceRecord,
    discover_folder,
    discover_records,
    discover_splits,
    patient_and_slice,
    split_by_patient,
)

__all__ = [
    "CLASS_NAMES",
    "LABELS",
    "DataSplits",
    "DatasetLayoutError",
    "PrepareSummary",
    "SliceRecord",
    "decode_and_resize",
    "discover_folder",
    "discover_records",
    "discover_splits",
    "make_dataset",
    "patient_and_slice",
    "prepare_adni",
    "split_by_patient",
]


def __getattr__(name: str):
    if name in ("make_dataset", "decode_and_resize", "load_image"):
        from keras_vqpix.data import pipeline

        return getattr(pipeline, name)
    if name in ("prepare_adni", "PrepareSummary"):
        from keras_vqpix.data import adni

        return getattr(adni, name)
    raise AttributeError(f"module 'keras_vqpix.data' has no attribute {name!r}")
