"""Render a synthetic patient's axial T1 slices from the MNI152 (ICBM 2009a) template.

Each patient is the template seen through its own head size, in-plane rotation and small
out-of-plane tilt, smooth deformation and slab position, with its own tissue contrast, bias
field and Rician noise. Atrophy, milder with age in everyone and stronger with Alzheimer's
disease, enlarges the ventricles, widens the sulci and thins the cortex, and shrinks the
hippocampi while widening the temporal horns beside them.

The pixels of the patient's slab of consecutive slices are mapped to template coordinates
(affine, smooth deformation, atrophy flows) and the tissue maps are sampled trilinearly there,
which is far cheaper than warping the whole volume. NumPy only: no scipy at run time.
"""

from __future__ import annotations

import functools
import io
import lzma
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_vqpix.data.lesions import Lesion, lesion_effect, plan_slice_lesions

__all__ = [
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
    "PatientParams",
    "random_patient",
    "render_patient",
    "render_patient_with_lesions",
]

TEMPLATE_PATH = Path(__file__).with_name("template") / "mni152_demo_template.npz.xz"
IMAGE_WIDTH, IMAGE_HEIGHT = 256, 240
_COARSE_STEP = 4  # pixels between the points where the warp is evaluated exactly
_CHUNK = 32768  # points per tissue lookup: small temporaries stay in cache
_BRAIN_CENTRE_Y_MM = -18.0  # MNI y halfway between the frontal and occipital poles


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


def random_patient(patient: str, label: int, seed: int) -> PatientParams:
    """A synthetic patient of class `label` (0 NC, 1 AD); the same seed gives the same one.

    Everyone gets age-related atrophy, `age_atrophy` ~ Beta(2, 4) (ADNI's controls are
    elderly); AD patients get disease atrophy on top, `disease` = 0.2 + 0.8 Beta(2, 2), so
    severities spread from mild to severe and mild AD overlaps with old NC. Both drive the
    ventricle enlargement (mm), hippocampal shrinkage (mm) and the sulcal and medial
    temporal tissue loss; the template's young-adult ventricles get a per-patient spread.
    """
    rng = np.random.default_rng(seed)
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
    """Template (MNI) points of every `_COARSE_STEP`-th pixel, and the cells holding brain.

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
    centre = np.array(
        [0.0, _BRAIN_CENTRE_Y_MM, params.first_slice_mm + params.slice_mm * (slices - 1) / 2]
    )
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
    return _render(params, slices)[0]


def render_patient_with_lesions(
    params: PatientParams, slices: int = 20
) -> tuple[np.ndarray, np.ndarray, list[list[Lesion]]]:
    """`render_patient`'s slices with synthetic lesions (`keras_vqpix.data.lesions`) in about
    half of them: `(uint8 [slices, 240, 256], bool masks [slices, 240, 256], lesions per slice)`.

    The lesions come from their own random stream (seeded by the patient's seed), so a slice
    without lesions is byte for byte `render_patient`'s.
    """
    return _render(params, slices, np.random.default_rng([params.seed, 4]))


def _render(params: PatientParams, slices: int, lesion_rng: np.random.Generator | None = None):
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
    masks = np.zeros((slices, IMAGE_HEIGHT * IMAGE_WIDTH), bool)
    lesions: list[list[Lesion]] = []
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
        values = csf_i * csf + gm_i * gm_left + wm_i * wm_left
        if lesion_rng is not None:
            rows, cols = np.divmod(pixels, IMAGE_WIDTH)
            lesions.append(plan_slice_lesions(lesion_rng, rows, cols, gm_left, wm_left))
            if lesions[-1]:
                change, inside = lesion_effect(lesions[-1], rows, cols, gm_left + wm_left)
                values = values + change
                masks[k, pixels[inside]] = True
        values = values * np.exp(log_bias)
        # Rician noise: the magnitude of complex Gaussian noise added to the signal.
        noise = rng.standard_normal((2, len(pixels)), dtype=np.float32) * sigma
        magnitude = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
        magnitude *= 0.25 + 0.75 * np.clip(brain * 4.0, 0.0, 1.0)
        images[k, pixels] = np.clip(np.round(magnitude * 255.0), 0, 255).astype(np.uint8)
    shape = (slices, IMAGE_HEIGHT, IMAGE_WIDTH)
    return images.reshape(shape), masks.reshape(shape), lesions
