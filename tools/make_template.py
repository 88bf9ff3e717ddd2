"""Derive the demo data set's compact brain template from the MNI152 (ICBM 2009a) template.

Run once, offline, with the `dev` extra installed (nilearn ships the template files):

    python tools/make_template.py

Writes `keras_vqpix/data/template/mni152_demo_template.npz.xz` (about 1.5 MB) next to
`LICENSE-MNI152.txt`. `keras_vqpix.data.demo` reads only this file, with NumPy, at run time;
neither nilearn nor scipy is needed there.

What the file holds (MNI millimetre coordinates map to voxel indices through `origin_mm` and
`voxel_mm`; axes are x = left to right, y = posterior to anterior, z = inferior to superior):

- `tissue`: uint8 [nx, ny, nz, 4], channels grey matter, white matter, brain mask and a
  medial-temporal (hippocampal) weight, each 0..255. CSF is what is left inside the mask.
- `ventricle_field`, `hippocampus_field`: int8 [3, cx, cy, cz] unit displacement fields on a
  coarser grid (`field_origin_mm`, `field_voxel_mm`, `field_scale`). Sampling the template at
  `x + s * ventricle_field(x)` enlarges the ventricles by about `s` mm; `hippocampus_field`
  likewise shrinks the hippocampi and widens the temporal horns beside them. They are the gradients of smoothed structure masks, so the
  warps are smooth and fold-free for the strengths the generator uses.
"""

from __future__ import annotations

import argparse
import io
import lzma
from pathlib import Path

import numpy as np
from nilearn import datasets
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "keras_vqpix" / "data" / "template" / "mni152_demo_template.npz.xz"

# Hippocampal long axis in the symmetric ICBM 2009a template (right hemisphere, mm), head to
# tail, read off the template's sagittal and coronal slices; mirrored for the left side.
HIPPOCAMPUS_AXIS_MM = np.array(
    [
        [26.0, -6.0, -22.0],
        [29.0, -14.0, -17.0],
        [29.0, -24.0, -11.0],
        [26.0, -34.0, -5.0],
        [20.0, -40.0, 0.0],
    ]
)
HIPPOCAMPUS_RADIUS_MM = 7.0


def load_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM and WM in [0, 1] at 1 mm, and the 4x4 voxel-to-MNI affine."""
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    affine = np.asarray(t1.affine)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"expected a 1 mm axis-aligned template. Received: affine={affine}")
    data = [np.asarray(img.get_fdata(), dtype=np.float32) for img in (t1, gm, wm)]
    return (*[d / max(float(d.max()), 1e-6) for d in data], affine)


def ventricle_mask(
    csf: np.ndarray, brain: np.ndarray, mni: list[np.ndarray], origin_mm: np.ndarray
) -> np.ndarray:
    """Lateral and third ventricles: the central CSF components reached from ventricle seeds."""
    x, y, z = mni
    central = (np.abs(x) < 32) & (y > -50) & (y < 40) & (z > -8) & (z < 36)
    candidate = (csf > 0.5) & (brain > 0.5) & central
    labels, _ = ndimage.label(candidate)
    # Seeds inside the lateral ventricle bodies and the third ventricle.
    seeds_mm = [(16, -10, 22), (-16, -10, 22), (12, 8, 16), (-12, 8, 16), (0, -12, 4)]
    keep = set()
    for seed in seeds_mm:
        index = tuple(int(round(v)) for v in np.asarray(seed) - origin_mm)
        ball = labels[tuple(slice(i - 3, i + 4) for i in index)]
        keep.update(int(v) for v in np.unique(ball) if v)
    if not keep:
        raise ValueError("no ventricle found at the seed points")
    return np.isin(labels, sorted(keep))


def distance_to_hippocampal_axes(mni: list[np.ndarray]) -> np.ndarray:
    """Distance (mm) of every voxel to the nearer hippocampal long axis."""
    points = np.stack(mni, axis=-1)
    best = np.full(points.shape[:-1], np.inf, dtype=np.float32)
    for side in (1.0, -1.0):
        axis = HIPPOCAMPUS_AXIS_MM * np.array([side, 1.0, 1.0])
        for a, b in zip(axis[:-1], axis[1:], strict=True):
            ab = b - a
            t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
            distance = np.linalg.norm(points - (a + t[..., None] * ab), axis=-1)
            best = np.minimum(best, distance)
    return best


def hippocampus_weight(gm: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Grey matter within a tube around each hippocampal long axis, feathered at its edge."""
    tube = np.clip((HIPPOCAMPUS_RADIUS_MM - distance) / 2.0, 0.0, 1.0)
    return tube * np.clip((gm - 0.2) / 0.5, 0.0, 1.0)


def temporal_horn_mask(csf: np.ndarray, distance: np.ndarray, x: np.ndarray) -> np.ndarray:
    """CSF hugging the hippocampus on its lateral side: the temporal horns (thin here)."""
    return (csf > 0.3) & (distance < 10.0) & (np.abs(x) > 22.0)


def unit_field(mask: np.ndarray, sigma_mm: float, sign: float) -> np.ndarray:
    """`sign` times the gradient of the smoothed mask, scaled so its largest length is 1."""
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma_mm)
    field = sign * np.stack(np.gradient(smooth), axis=0)
    return field / np.linalg.norm(field, axis=0).max()


def resample(volume: np.ndarray, factor: float, order: int = 1) -> np.ndarray:
    """Resample a 1 mm volume onto a grid `factor` mm apart (anti-aliased for factor > 1)."""
    if factor > 1:
        volume = ndimage.gaussian_filter(volume, 0.4 * (factor - 1.0) + 1e-6)
    shape = [int(np.floor((n - 1) / factor)) + 1 for n in volume.shape]
    grid = np.meshgrid(*[np.arange(n) * factor for n in shape], indexing="ij")
    return ndimage.map_coordinates(volume, grid, order=order, mode="constant")


def to_uint8(volume: np.ndarray) -> np.ndarray:
    return np.clip(np.round(volume * 255.0), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0, help="Tissue grid spacing, mm.")
    parser.add_argument(
        "--field-resolution", type=float, default=3.0, help="Displacement grid spacing, mm."
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    t1, gm, wm, affine = load_volumes()
    origin_mm = affine[:3, 3]
    mni = np.meshgrid(
        *[np.arange(n) + o for n, o in zip(t1.shape, origin_mm, strict=True)], indexing="ij"
    )
    brain = (t1 > 0).astype(np.float32)
    tissue = np.clip(gm + wm, 0.0, 1.0)
    csf = brain * (1.0 - tissue)
    ventricles = ventricle_mask(csf, brain, mni, origin_mm)
    distance = distance_to_hippocampal_axes(mni)
    hippocampus = hippocampus_weight(gm, distance)
    horns = temporal_horn_mask(csf, distance, mni[0])
    print(
        f"ventricles {ventricles.sum()} mm^3, temporal horns {horns.sum()} mm^3, "
        f"hippocampal weight {hippocampus.sum():.0f} mm^3"
    )

    # Crop to the brain with a margin of empty voxels, so clamped lookups fall on background.
    inside = np.nonzero(brain)
    margin = 4
    lo = [max(int(i.min()) - margin, 0) for i in inside]
    hi = [min(int(i.max()) + margin + 1, n) for i, n in zip(inside, brain.shape, strict=True)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    origin = origin_mm + np.array(lo, dtype=np.float64)

    channels = [resample(v[crop], args.resolution) for v in (gm, wm, brain, hippocampus)]
    tissue_u8 = np.stack([to_uint8(c) for c in channels], axis=-1)

    # Medial temporal atrophy: the hippocampi shrink and the temporal horns beside them widen.
    medial_temporal = unit_field(hippocampus, 3.0, -1.0) + unit_field(horns, 3.0, 1.0)
    medial_temporal /= np.linalg.norm(medial_temporal, axis=0).max()
    fields = {}
    for name, field in (
        ("ventricle_field", unit_field(ventricles, 4.0, 1.0)),
        ("hippocampus_field", medial_temporal),
    ):
        coarse = np.stack([resample(f[crop], args.field_resolution) for f in field])
        fields[name] = np.clip(np.round(coarse * 127.0), -127, 127).astype(np.int8)

    # An .npz inside xz: LZMA packs the smooth tissue maps about 2.5x tighter than zip.
    buffer = io.BytesIO()
    np.savez(
        buffer,
        tissue=tissue_u8,
        origin_mm=origin.astype(np.float32),
        voxel_mm=np.float32(args.resolution),
        field_origin_mm=origin.astype(np.float32),
        field_voxel_mm=np.float32(args.field_resolution),
        field_scale=np.float32(1.0 / 127.0),
        source=np.array("MNI152 ICBM 2009a nonlinear symmetric (nilearn), see LICENSE-MNI152.txt"),
        **fields,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {args.out}: tissue {tissue_u8.shape}, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
