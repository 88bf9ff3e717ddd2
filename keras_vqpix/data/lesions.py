"""Synthetic focal lesions with known masks, to measure anomaly detection on the demo data.

Real ADNI slices come without lesion masks, so the demo set can carry lesions of its own
(`vqpix demo-data --lesions`): bright or dark elliptical blobs of several sizes and contrasts,
centred in white or grey matter, drawn into the tissue before bias field and noise (so they
look like the rest of the slice), confined to tissue (they fade where the tissue does). About
half of the test slices get one to three; the train split never does. Each test slice gets a
mask beside it, `<slice>.mask.npy` (uint8 `[H, W]`, 1 inside a lesion; all zero for a slice
without one), so any ADNI-layout folder with such files can be scored the same way.

NumPy only; the renderer (`keras_vqpix.data.demo_render`) calls `plan_slice_lesions` and
`lesion_effect` per slice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MASK_SUFFIX = ".mask.npy"
LESION_SLICE_FRACTION = 0.5
RADII_PX = (3.0, 5.0, 8.0, 12.0)  # of a 256 x 240 slice: about 0.4 to 1.5 code cells of 8 px
MAX_LESIONS = 3
# Signed contrast ranges (image intensity, 0..1), by tissue and polarity.
CONTRASTS = {
    ("white", "bright"): (0.12, 0.3),
    ("white", "dark"): (-0.5, -0.25),
    ("grey", "bright"): (0.2, 0.4),
    ("grey", "dark"): (-0.35, -0.2),
}
_EDGE_PX = 1.5  # width of the blob's soft edge


@dataclass(frozen=True)
class Lesion:
    """One elliptical lesion in pixel coordinates of the slice (row, column)."""

    row: float
    col: float
    radius_px: float
    aspect: float  # minor / major axis
    angle_deg: float
    contrast: float  # added intensity at full tissue, signed
    tissue: str  # "white" or "grey": where its centre lies


def mask_path(slice_path: str | os.PathLike) -> Path:
    """`.../003_S_1059_81.jpeg` -> `.../003_S_1059_81.mask.npy` (the lesion mask beside a slice)."""
    path = Path(slice_path)
    return path.with_name(path.stem + MASK_SUFFIX)


def plan_slice_lesions(
    rng: np.random.Generator,
    rows: np.ndarray,
    cols: np.ndarray,
    grey: np.ndarray,
    white: np.ndarray,
) -> list[Lesion]:
    """The lesions of one slice (none for about half of the slices).

    `rows`, `cols`: pixel coordinates of the slice's brain pixels; `grey`, `white`: their
    remaining grey and white matter fractions. Centres are drawn among pixels of nearly pure
    white (> 0.7) or grey (> 0.5) matter.
    """
    if rng.random() >= LESION_SLICE_FRACTION:
        return []
    lesions = []
    for _ in range(int(rng.integers(1, MAX_LESIONS + 1))):
        tissue = "white" if rng.random() < 0.6 else "grey"
        candidates = np.flatnonzero(white > 0.7 if tissue == "white" else grey > 0.5)
        if candidates.size == 0:
            continue
        centre = int(candidates[rng.integers(candidates.size)])
        polarity = "bright" if rng.random() < 0.5 else "dark"
        low, high = CONTRASTS[(tissue, polarity)]
        lesions.append(
            Lesion(
                row=float(rows[centre]),
                col=float(cols[centre]),
                radius_px=float(RADII_PX[int(rng.integers(len(RADII_PX)))]),
                aspect=float(rng.uniform(0.6, 1.0)),
                angle_deg=float(rng.uniform(0.0, 180.0)),
                contrast=float(rng.uniform(low, high)),
                tissue=tissue,
            )
        )
    return lesions


def lesion_weight(lesion: Lesion, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Float32 weights in [0, 1] of `lesion` at the pixels: 1 inside, a soft edge of 1.5 px."""
    angle = math.radians(lesion.angle_deg)
    dy, dx = rows - lesion.row, cols - lesion.col
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / lesion.aspect
    distance = np.sqrt(along**2 + across**2)
    return np.clip((lesion.radius_px - distance) / _EDGE_PX + 0.5, 0.0, 1.0).astype(np.float32)


def lesion_effect(
    lesions: list[Lesion], rows: np.ndarray, cols: np.ndarray, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`(intensity change, mask)` of `lesions` at the pixels, before bias field and noise.

    The change is each lesion's contrast times its weight times the tissue fraction there
    (lesions do not spill into CSF or background); the mask is where some lesion's weight
    times the tissue fraction reaches 0.5.
    """
    change = np.zeros(len(rows), np.float32)
    mask = np.zeros(len(rows), bool)
    for lesion in lesions:
        weight = lesion_weight(lesion, rows, cols) * tissue
        change += np.float32(lesion.contrast) * weight
        mask |= weight >= 0.5
    return change, mask


def load_mask(slice_path: str | os.PathLike) -> np.ndarray | None:
    """The lesion mask beside a slice as bool `[H, W]`, or None when there is none."""
    path = mask_path(slice_path)
    if not path.is_file():
        return None
    mask = np.load(path)
    if mask.ndim != 2:
        raise ValueError(f"{path} must hold a 2-D mask. Received: shape {mask.shape}")
    return mask > 0
