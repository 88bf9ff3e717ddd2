"""Slices as stacks: each patient's slices in order, the previous slice and the position of each.

An ADNI slice data set is a set of patients, each a stack of consecutive axial slices
(`<patient>_<slice>.jpeg`, 20 per patient in the ADNI and demo sets). A slice-context prior
(`keras_vqpix.models.pixelcnn.PixelCNN` with `previous_slice` / `slice_positions`) learns slice z
given slice z - 1 of the same patient and z's position in the stack; this module finds both for
a list of records, and `consecutive_pairs` every pair of neighbouring slices of arrays of patient
ids and slice numbers (the stack figures of `vqpix compare`). NumPy only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from keras_vqpix.data.discover import SliceRecord

__all__ = ["consecutive_pairs", "position_bins", "stack_context"]


def position_bins(num_slices: int, num_positions: int) -> np.ndarray:
    """Position bins `[num_slices]` int32 of slices `0 .. num_slices - 1` of one stack.

    Slice z of S gets `round(z * (P - 1) / (S - 1))`: the first slice bin 0, the last bin
    P - 1, whatever S is (a 20-slice stack with P = 20 gets 0 .. 19); a single slice, whose
    place is unknown, -1. `num_positions` 0 (no position): all -1.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1. Received: num_slices={num_slices}")
    if num_positions < 1 or num_slices == 1:
        return np.full(num_slices, -1, np.int32)
    # floor(z (P - 1) / (S - 1) + 1/2) in integers: the graph twin in `keras_vqpix.sampling`
    # computes the same bins bit for bit.
    z = np.arange(num_slices, dtype=np.int64)
    return ((2 * z * (num_positions - 1) + num_slices - 1) // (2 * (num_slices - 1))).astype(
        np.int32
    )


def stack_context(
    records: Sequence[SliceRecord], num_positions: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(previous [N], positions [N])` int32 of each record in a split.

    `previous[i]`: the index in `records` of the same patient's slice `slice_index - 1`, or -1
    when the patient has no such slice (its first slice, or a gap in the numbers: a slice two
    apart is no neighbour), as `consecutive_pairs` pairs them. `positions[i]`: the slice's
    position bin in its patient's stack (`position_bins` of its rank among the patient's
    slices), -1 for a patient of one slice.
    """
    previous = np.full(len(records), -1, np.int32)
    first, second, _ = consecutive_pairs(
        np.array([r.patient for r in records]), np.array([r.slice_index for r in records])
    )
    previous[second] = first
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_patient[record.patient].append(i)
    positions = np.full(len(records), -1, np.int32)
    for indices in by_patient.values():
        ordered = sorted(indices, key=lambda i: records[i].slice_index)
        positions[ordered] = position_bins(len(ordered), num_positions)
    return previous, positions


def consecutive_pairs(
    patients: np.ndarray, slices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of slices `s`, `s + 1` of one patient: `(first index, second index, position)`.

    Indices point into `patients` / `slices` (any order); the position is `s` minus the
    patient's lowest slice number. A missing slice number skips the pairs that need it (a gap
    is no neighbour); of several files with one patient and slice number, the first counts.
    """
    patients, slices = np.asarray(patients), np.asarray(slices, np.int64)
    order = np.lexsort((np.arange(len(slices)), slices, patients))  # by patient, slice, index
    patients, slices = patients[order], slices[order]
    if not len(order):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    new_patient = np.r_[True, patients[1:] != patients[:-1]]
    first_slice = slices[np.maximum.accumulate(np.where(new_patient, np.arange(len(order)), 0))]
    unique = np.r_[True, new_patient[1:] | (slices[1:] != slices[:-1])]
    order, patients, slices = order[unique], patients[unique], slices[unique]
    first_slice = first_slice[unique]
    neighbours = np.flatnonzero((patients[1:] == patients[:-1]) & (slices[1:] == slices[:-1] + 1))
    return order[neighbours], order[neighbours + 1], slices[neighbours] - first_slice[neighbours]
