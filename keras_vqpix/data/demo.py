"""Synthetic ADNI-like axial T1 brain slices (AD and NC) derived from the MNI152 template.

Real ADNI data cannot be shipped, so every command can fall back on this demo set. It is made
of plausible, different brains, not copies of one picture: each synthetic patient is the
ICBM 2009a template (`template/mni152_demo_template.npz.xz`, made by `tools/make_template.py`)
seen through its own head size, tilt and smooth deformation, with its own contrast, bias field,
noise and slab position. AD patients differ from NC the way the disease shows on MRI: enlarged
ventricles, widened sulci with a thinner cortex, and smaller hippocampi with wider temporal
horns, each with a severity that varies per patient; NC patients get milder age-related
atrophy of the same kinds, so the classes overlap like real ones do.

Each patient is rendered in template space: the output pixels of its slab of consecutive
slices are mapped to template coordinates (affine, smooth deformation, atrophy flows) and the
tissue maps are sampled trilinearly, which is far cheaper than warping the whole volume.
Output layout: `OUT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg`, 256x240 8-bit grayscale.

NumPy and Pillow only: no TensorFlow and no scipy at run time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import lzma
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from keras_vqpix.io import atomic_directory

__all__ = [
    "FORMAT_VERSION",
    "PatientParams",
    "cache_root",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "render_patient",
]

# Bump when the generator changes what it writes: cached sets of another version are not reused.
FORMAT_VERSION = 1
TEMPLATE_PATH = Path(__file__).with_name("template") / "mni152_demo_template.npz.xz"
IMAGE_WIDTH, IMAGE_HEIGHT = 256, 240
JPEG_QUALITY = 92
CLASS_FOLDERS = {0: "NC", 1: "AD"}
# ADNI-like site numbers for patient ids "SSS_S_PPPP".
_SITES = (2, 5, 6, 7, 10, 11, 12, 13, 14, 16, 18, 20, 21, 22, 23, 24, 27, 29, 31, 32, 33, 35)
_SITES += (36, 37, 41, 52, 53, 57, 62, 67, 68, 70, 73, 82, 94, 98, 99, 100, 109, 114, 116)
_SITES += (123, 126, 127, 128, 130, 131, 133, 135, 136, 137, 141, 153, 941)
_COARSE_STEP = 4  # pixels between the points where the warp is evaluated exactly
_CHUNK = 32768  # points per tissue lookup: small temporaries stay in cache


# --------------------------------------------------------------------------------------------
# Template


@dataclass(frozen=True)
class _Template:
    """The tissue maps packed for fast lookups, plus the atrophy flows."""

    # uint64 [nx * ny * nz]: the 4 uint8 channels (GM, WM, brain mask, hippocampal weight) of
    # a voxel and of its neighbour along z, so one gather fetches both z corners.
    packed: np.ndarray
    shape: tuple[int, int, int]
    origin_mm: np.ndarray
    voxel_mm: float
    ventricle_field: np.ndarray  # float32 [cx, cy, cz, 3], unit length at most
    hippocampus_field: np.ndarray
    field_origin_mm: np.ndarray
    field_voxel_mm: float


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(
            f"{TEMPLATE_PATH} is missing; regenerate it with `python tools/make_template.py`"
        )
    with np.load(io.BytesIO(lzma.decompress(TEMPLATE_PATH.read_bytes()))) as data:
        tissue = np.ascontiguousarray(data["tissue"])
        scale = float(data["field_scale"])
        fields = [
            np.ascontiguousarray(np.moveaxis(data[name], 0, -1), dtype=np.float32) * scale
            for name in ("ventricle_field", "hippocampus_field")
        ]
        pairs = np.zeros((tissue[..., 0].size, 8), dtype=np.uint8)
        pairs[:, :4] = tissue.reshape(-1, 4)
        pairs[:-1, 4:] = pairs[1:, :4]
        return _Template(
            packed=pairs.view(np.uint64).reshape(-1),
            shape=tissue.shape[:3],
            origin_mm=data["origin_mm"].astype(np.float64),
            voxel_mm=float(data["voxel_mm"]),
            ventricle_field=fields[0],
            hippocampus_field=fields[1],
            field_origin_mm=data["field_origin_mm"].astype(np.float64),
            field_voxel_mm=float(data["field_voxel_mm"]),
        )


def _trilinear_weights(
    origin: np.ndarray, step: float, shape: tuple[int, int, int], x, y, z
) -> tuple[np.ndarray, np.ndarray]:
    """Flat index of each point's lower corner, and its 8 corner weights [N, 8].

    Corner k is (dx, dy, dz) = the bits of k (`np.ndindex(2, 2, 2)` order). Coordinates are
    clamped into the volume; the template's border voxels are empty, so points outside the
    brain read background.
    """
    corner, frac = [], []
    for axis, values in enumerate((x, y, z)):
        voxel = (values.astype(np.float32) - np.float32(origin[axis])) * np.float32(1.0 / step)
        voxel = np.clip(voxel, np.float32(0.0), np.float32(shape[axis] - 1.001))
        lower = voxel.astype(np.int32)
        corner.append(lower)
        frac.append(voxel - lower)
    index = (corner[0] * shape[1] + corner[1]) * shape[2] + corner[2]
    weights = np.empty((8, len(index)), dtype=np.float32)
    for k, (dx, dy, dz) in enumerate(np.ndindex(2, 2, 2)):
        wx = frac[0] if dx else 1 - frac[0]
        wy = frac[1] if dy else 1 - frac[1]
        np.multiply(wx * wy, frac[2] if dz else 1 - frac[2], out=weights[k])
    return index, np.ascontiguousarray(weights.T)


def _sample_field(field: np.ndarray, origin: np.ndarray, step: float, points: np.ndarray):
    """Trilinear samples of a float field [cx, cy, cz, C] at MNI points [N, 3] -> [N, C]."""
    shape = field.shape[:3]
    index, weights = _trilinear_weights(origin, step, shape, *points.T)
    offsets = np.array([(dx * shape[1] + dy) * shape[2] + dz for dx, dy, dz in np.ndindex(2, 2, 2)])
    values = field.reshape(-1, field.shape[-1])[index[:, None] + offsets]  # [N, 8, C]
    return (weights[:, None, :] @ values)[:, 0, :]


def _sample_tissue(template: _Template, x: np.ndarray, y: np.ndarray, z: np.ndarray):
    """Trilinear samples of the 4 tissue channels at MNI points -> float32 [4, N] in [0, 1].

    One uint64 gather fetches all four channels of two corners (along z) at once, and one
    small matrix product per point weighs the eight corners. Points go in chunks so the
    temporaries stay in cache.
    """
    shape = template.shape
    offsets = np.array([(dx * shape[1] + dy) * shape[2] for dx, dy in np.ndindex(2, 2)])
    out = np.empty((4, len(x)), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        part = slice(start, start + _CHUNK)
        index, weights = _trilinear_weights(
            template.origin_mm, template.voxel_mm, shape, x[part], y[part], z[part]
        )
        values = template.packed.take(index[:, None] + offsets).view(np.uint8)
        values = values.reshape(-1, 8, 4).astype(np.float32)  # [N, corner, channel]
        weighted = (weights * np.float32(1.0 / 255.0))[:, None, :] @ values
        out[:, part] = weighted[:, 0, :].T
    return out


# --------------------------------------------------------------------------------------------
# Patients


@dataclass(frozen=True)
class PatientParams:
    """Everything that makes one synthetic patient; severities are in [0, 1]."""

    patient: str
    label: int  # 0 NC, 1 AD
    seed: int
    age_atrophy: float
    disease: float
    ventricle_mm: float  # how far the ventricle walls move out
    hippocampus_mm: float  # how far the hippocampal surface moves in
    sulcal_widening: float  # exponent of partial-volume tissue loss at CSF borders
    temporal_loss: float  # extra tissue loss in the medial temporal lobe
    head_scale: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]  # in-plane, pitch (about x), roll (about y)
    shift_px: tuple[float, float]
    first_slice_mm: float  # MNI z of the lowest slice before tilt
    slice_mm: float
    first_slice: int
    intensities: tuple[float, float, float]  # CSF, GM, WM in [0, 1]
    noise: float
    deformation_mm: float
    bias: float


def _sample_params(patient: str, label: int, seed: int) -> PatientParams:
    rng = np.random.default_rng(seed)
    # Age-related atrophy in everyone (ADNI's NC are elderly); disease on top of it in AD.
    age = float(rng.beta(2.0, 4.0))
    disease = float(0.2 + 0.8 * rng.beta(2.0, 2.0)) if label == 1 else 0.0
    spread = float(rng.lognormal(0.0, 0.25))  # ventricle size varies a lot between people
    ventricle = spread * (0.5 + 2.0 * age) + 4.0 * disease
    hippocampus = 0.3 + 1.0 * age + 2.8 * disease
    sulcal = 0.3 + 1.2 * age + 2.2 * disease
    temporal = 0.5 * age + 3.0 * disease
    scale = rng.normal(0.93, 0.04)
    head_scale = (scale * rng.normal(1, 0.025), scale * rng.normal(1, 0.025), scale)
    rotation = (rng.normal(0, 4.0), rng.normal(0, 4.0), rng.normal(0, 2.0))
    first_mm = float(rng.uniform(-14.0, -4.0))
    csf = rng.uniform(0.06, 0.14)
    gm = rng.uniform(0.47, 0.57)
    wm = rng.uniform(0.78, 0.88)
    return PatientParams(
        patient=patient,
        label=label,
        seed=seed,
        age_atrophy=age,
        disease=disease,
        ventricle_mm=float(ventricle),
        hippocampus_mm=float(hippocampus),
        sulcal_widening=float(sulcal),
        temporal_loss=float(temporal),
        head_scale=tuple(float(np.clip(s, 0.82, 1.06)) for s in head_scale),
        rotation_deg=tuple(
            float(np.clip(r, -c, c)) for r, c in zip(rotation, (10, 10, 6), strict=True)
        ),
        shift_px=(float(rng.normal(0, 3.0)), float(rng.normal(0, 3.0))),
        first_slice_mm=first_mm,
        slice_mm=float(rng.uniform(0.95, 1.1)),
        first_slice=int(round(first_mm)) + 80,
        intensities=(float(csf), float(gm), float(wm)),
        noise=float(rng.uniform(0.008, 0.02)),
        deformation_mm=float(rng.uniform(1.0, 2.0)),
        bias=float(rng.uniform(0.03, 0.1)),
    )


def _rotation(in_plane_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    a, b, c = (math.radians(v) for v in (in_plane_deg, pitch_deg, roll_deg))
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    about_y = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return about_y @ about_x @ about_z


class _FourierField:
    """A smooth random field: a sum of random plane waves (long wavelengths only)."""

    def __init__(
        self, rng: np.random.Generator, channels: int, amplitude: float, wavelengths_mm, modes=12
    ):
        directions = rng.normal(size=(channels, modes, 3))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        lengths = rng.uniform(*wavelengths_mm, size=(channels, modes, 1))
        self.k = (2 * np.pi / lengths * directions).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(channels, modes)).astype(np.float32)
        # Amplitudes so each channel's RMS is `amplitude`.
        self.amp = np.float32(amplitude * math.sqrt(2.0 / modes))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """[N, 3] -> [N, channels]."""
        x, y, z = (np.ascontiguousarray(points[:, i], dtype=np.float32) for i in range(3))
        out = np.zeros((self.k.shape[0], len(x)), dtype=np.float32)
        for channel, (ks, phases) in enumerate(zip(self.k, self.phase, strict=True)):
            for k, phase in zip(ks, phases, strict=True):
                out[channel] += np.sin(x * k[0] + y * k[1] + (z * k[2] + phase))
        return out.T * self.amp


def _upsample(coarse: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along `axis` from points `_COARSE_STEP` pixels apart.

    `coarse` has n + 1 points along `axis` (the last one past the image); the result has
    n * `_COARSE_STEP`. Broadcasting, not a matrix product: BLAS threads would fight the
    worker threads.
    """
    low = np.expand_dims(coarse[(slice(None),) * axis + (slice(None, -1),)], axis + 1)
    high = np.expand_dims(coarse[(slice(None),) * axis + (slice(1, None),)], axis + 1)
    frac = np.arange(_COARSE_STEP, dtype=np.float32) / _COARSE_STEP
    frac = frac.reshape((1,) * (axis + 1) + (-1,) + (1,) * (coarse.ndim - axis - 1))
    shape = list(low.shape)
    shape[axis + 1] = _COARSE_STEP
    fine = np.empty(shape, dtype=np.float32)
    np.multiply(frac, high - low, out=fine)
    fine += low
    shape[axis : axis + 2] = [shape[axis] * _COARSE_STEP]
    return fine.reshape(shape)


def _coarse_pixels() -> tuple[np.ndarray, np.ndarray]:
    """Row and column pixel positions of the coarse grid (one past the last pixel included)."""
    rows = np.arange(IMAGE_HEIGHT // _COARSE_STEP + 1, dtype=np.float64) * _COARSE_STEP
    cols = np.arange(IMAGE_WIDTH // _COARSE_STEP + 1, dtype=np.float64) * _COARSE_STEP
    return rows, cols


def _coarse_points(params: PatientParams, slices: int, template: _Template):
    """Template (MNI) points of every `_COARSE_STEP`-th pixel, and which of them are in the head.

    Returns float64 [slices, R + 1, C + 1, 3] points and a bool [slices, R, C] mask of the
    coarse cells that may hold brain (brain at one of their corners).
    """
    rng = np.random.default_rng([params.seed, 1])
    row_px, col_px = _coarse_pixels()
    # Patient space, mm: image x to the patient's left (radiological view), image up anterior.
    x = -(col_px - (IMAGE_WIDTH - 1) / 2 - params.shift_px[0])
    y = (IMAGE_HEIGHT - 1) / 2 - row_px + params.shift_px[1]
    z = params.slice_mm * (np.arange(slices) - (slices - 1) / 2)
    grid = np.stack(np.meshgrid(z, y, x, indexing="ij")[::-1], axis=-1)
    # Scale by the head size, rotate about the slab's centre, then deform smoothly.
    centre = np.array([0.0, -18.0, params.first_slice_mm + params.slice_mm * (slices - 1) / 2])
    rotation = _rotation(*params.rotation_deg)
    grid = grid / np.asarray(params.head_scale)
    points = sum(grid[..., j, None] * rotation[:, j] for j in range(3)) + centre
    deformation = _FourierField(rng, 3, params.deformation_mm, (70.0, 160.0), modes=8)
    points = points + deformation(points.reshape(-1, 3)).reshape(points.shape)
    flat = points.reshape(-1, 3)
    brain = _sample_tissue(template, *flat.T)[2].reshape(points.shape[:3]) > 0
    # Cells (between four coarse points) with brain at a corner; the points around them.
    cells = brain[:, :-1, :-1] | brain[:, 1:, :-1] | brain[:, :-1, 1:] | brain[:, 1:, 1:]
    grown = np.zeros_like(brain)
    for dr, dc in np.ndindex(2, 2):
        grown[:, dr : dr + cells.shape[1], dc : dc + cells.shape[2]] |= cells
    # Atrophy as flows along the template's unit fields, in steps short enough not to fold.
    # A point where a field is zero never moves, so only the others are followed.
    inside = points[grown]
    for field, distance in (
        (template.ventricle_field, params.ventricle_mm),
        (template.hippocampus_field, params.hippocampus_mm),
    ):
        steps = max(1, math.ceil(distance / 1.5))
        sample = functools.partial(
            _sample_field, field, template.field_origin_mm, template.field_voxel_mm
        )
        velocity = sample(inside)
        moving = np.flatnonzero(np.any(velocity != 0, axis=1))
        flowing = inside[moving] + (distance / steps) * velocity[moving]
        for _ in range(steps - 1):
            flowing = flowing + (distance / steps) * sample(flowing)
        inside[moving] = flowing
    points[grown] = inside
    return points, cells


def render_patient(params: PatientParams, slices: int = 20) -> np.ndarray:
    """The patient's consecutive axial slices: uint8 [slices, 240, 256]."""
    template = _load_template()
    points, active = _coarse_points(params, slices, template)
    rng = np.random.default_rng([params.seed, 2])
    bias_field = _FourierField(rng, 1, params.bias, (180.0, 400.0), modes=6)
    log_bias = bias_field(points.reshape(-1, 3)).reshape(*points.shape[:3], 1)
    # Channels first: x, y, z, log bias of every coarse point.
    coarse = np.ascontiguousarray(np.moveaxis(np.concatenate([points, log_bias], axis=-1), -1, 0))
    coarse = coarse.astype(np.float32)
    cells = active.repeat(_COARSE_STEP, axis=1).repeat(_COARSE_STEP, axis=2)
    # Skull stripping leaves the background with only faint noise: the Rician of a zero
    # signal (Rayleigh) at a quarter of the level, drawn by inverse CDF from random bytes.
    sigma = np.float32(params.noise)
    quantiles = (np.arange(256) + 0.5) / 256
    levels = np.sqrt(-2.0 * np.log1p(-quantiles)) * (0.25 * sigma * 255.0)
    lookup = np.clip(np.round(levels), 0, 255).astype(np.uint8)
    images = lookup[rng.integers(0, 256, (slices, IMAGE_HEIGHT * IMAGE_WIDTH), dtype=np.uint8)]
    for k in range(slices):  # one slice at a time keeps the temporaries in cache
        # The warp and the bias are smooth, so bilinear upsampling of the coarse grid is
        # exact enough; only the pixels of cells that may hold brain are sampled.
        fine = _upsample(_upsample(coarse[:, k], 1), 2).reshape(4, -1)
        pixels = np.flatnonzero(cells[k])
        x, y, z, log_bias = fine[:, pixels]
        gm, wm, brain, temporal = _sample_tissue(template, x, y, z)
        # Atrophy as partial-volume tissue loss at CSF borders: tissue fraction t becomes
        # t ** (1 + k), so sulci and fissures widen and the cortex thins where it meets CSF,
        # while pure tissue stays; the medial temporal lobe loses more. Grey matter goes first.
        tissue = np.clip(gm + wm, 0.0, 1.0)
        exponent = 1.0 + params.sulcal_widening + params.temporal_loss * temporal
        loss = tissue - np.power(tissue, exponent)
        gm_left = np.maximum(gm - loss, 0.0)
        wm_left = np.maximum(wm - np.maximum(loss - gm, 0.0), 0.0)
        csf = np.maximum(brain - gm_left - wm_left, 0.0)
        csf_i, gm_i, wm_i = params.intensities
        values = (csf_i * csf + gm_i * gm_left + wm_i * wm_left) * np.exp(log_bias)
        # Rician noise: the magnitude of complex Gaussian noise added to the signal.
        noise = rng.standard_normal((2, len(pixels)), dtype=np.float32) * sigma
        magnitude = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
        magnitude *= 0.25 + 0.75 * np.clip(brain * 4.0, 0.0, 1.0)
        images[k, pixels] = np.clip(np.round(magnitude * 255.0), 0, 255).astype(np.uint8)
    return images.reshape(slices, IMAGE_HEIGHT, IMAGE_WIDTH)


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
                plan.append((split, _sample_params(next(ids), label, int(next(seeds)))))
    return plan


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_dataset(
    folder: Path, seed: int, train_per_class: int, test_per_class: int, slices: int
) -> dict:
    plan = _plan(seed, train_per_class, test_per_class)
    for split in ("train", "test"):
        for name in CLASS_FOLDERS.values():
            (folder / split / name).mkdir(parents=True, exist_ok=True)

    def write(item: tuple[str, PatientParams]) -> None:
        split, params = item
        images = render_patient(params, slices)
        class_dir = folder / split / CLASS_FOLDERS[params.label]
        for k, image in enumerate(images):
            path = class_dir / f"{params.patient}_{params.first_slice + k}.jpeg"
            path.write_bytes(_encode_jpeg(image))

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
    info = {**summary, "patient_params": [{"split": s, **asdict(p)} for s, p in plan]}
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

    Returns:
        A summary dict: `images`, `patients`, `seed`, `format_version`, `slices_per_patient`
        and `splits[split][class]` = `{"patients": n, "images": n}`.

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
            tmp, seed, train_patients_per_class, test_patients_per_class, slices_per_patient
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
