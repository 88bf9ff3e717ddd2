"""MRI acquisition noise on decoded slices: its level fitted to real slices, drawn Rician.

A VQ-VAE decoder returns the mean of a slice given its codes, smooth and free of the scanner's
noise, and a classifier spots that at once, even after a 4x downsampling: a magnitude MR
image's noise is Rician (Gudbjartsson & Patz 1995, "The Rician distribution of noisy MRI
data"), `|signal + n|` with complex Gaussian `n` of spread sigma, which lifts the dark tissue
and the background as well as roughening the bright tissue. This module draws that noise onto
decoded slices, so that `vqpix generate` writes slices with the noise of the data:

- `fit_noise_level(real, mean)`: one real slice and its decoded mean (the VQ-VAE round trip)
  give a `(brain, background)` sigma pair. Brain: the sigma that gives the mean, once noise is
  drawn on it and the slice is stored as JPEG, the real slice's high-frequency spread in the
  brain (`highpass_spread`: a robust spread, so the decoder's missed edges count little),
  found by bisection on the stored slice (storage swallows part of faint noise).
  Background: the sigma that gives the stored slice's dark surround the real one's mean
  level (JPEG keeps a region's mean, not the spread of its noise), found the same way.
- `NoiseLevels`: the pairs of a run's training slices with their classes (`RUN/noise.json`);
  `NoiseLevels.draw` picks one pair per synthetic patient from the training slices of its
  class, so the levels keep the data's spread (scanners, patients).
- `add_noise`: Rician noise of a per-pixel sigma, the brain's inside the brain, the
  background's outside, blended over the first `BRAIN_LEVEL` of intensity.

Everything is seeded (numpy `SeedSequence`); the same seed gives the same noise.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Bumped whenever the fit changes, so that levels cached by an older fit are refitted.
FIT_VERSION = 2
# Intensities in [0, 1]: pixels of the decoded mean above BRAIN_LEVEL are brain for the fit
# and get the brain's sigma; below BACKGROUND_LEVEL, surround; sigma blends in between.
BRAIN_LEVEL = 0.1
BACKGROUND_LEVEL = 0.01
# A 5-point Laplacian residual of white noise of spread s has spread s * sqrt(1 + 4/16).
_LAPLACIAN_GAIN = float(np.sqrt(1.25))
_RAYLEIGH_MEAN = float(np.sqrt(np.pi / 2))  # a Rayleigh variable's mean per sigma
# The spread is the mean absolute residual of the quietest _KEPT of the pixels (edges and
# missed structure are in the rest); for Gaussian noise of standard deviation s that mean is
# s * _KEPT_MEAN. A mean, not a median: 8-bit residuals take few values, and a median of them
# moves in steps of a fifth at faint noise.
_KEPT = 0.8
_KEPT_EDGE = 1.2815516  # the standard normal's 90th percentile: |z| below it holds 80%
_KEPT_MEAN = float(np.sqrt(2 / np.pi) * -np.expm1(-(_KEPT_EDGE**2) / 2) / _KEPT)
# The brain's sigma is found to within 2 ** -_BISECTION_STEPS of its bracket.
_BRACKET_STEPS = 6
_BISECTION_STEPS = 7


def highpass_spread(image: np.ndarray, mask: np.ndarray) -> float:
    """Robust spread of the 5-point Laplacian residual of `image` `[H, W]` inside `mask`.

    Scaled so that white Gaussian noise of standard deviation s gives s; a trimmed mean (the
    quietest 80%), so edges and missed structure count little. 0 when the mask has no
    interior pixel.
    """
    image = np.asarray(image, np.float32)
    inner = np.asarray(mask, bool)[1:-1, 1:-1]
    if not inner.any():
        return 0.0
    neighbours = image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:]
    residual = np.sort(np.abs(image[1:-1, 1:-1] - 0.25 * neighbours)[inner])
    kept = residual[: max(1, int(round(_KEPT * len(residual))))]
    return float(kept.mean() / _KEPT_MEAN / _LAPLACIAN_GAIN)


def _sigma_map(mean: np.ndarray, brain: np.ndarray, background: np.ndarray) -> np.ndarray:
    share = np.clip(mean / BRAIN_LEVEL, 0.0, 1.0)
    brain = np.asarray(brain, np.float32).reshape((-1,) + (1,) * (mean.ndim - 1))
    background = np.asarray(background, np.float32).reshape(brain.shape)
    return background + (brain - background) * share


def add_noise(mean: np.ndarray, brain: np.ndarray, background: np.ndarray, seed: int) -> np.ndarray:
    """Rician noise on decoded slices `mean` `[N, H, W]` in [0, 1], clipped to [0, 1].

    Args:
        mean: the decoded slices (float).
        brain, background: `[N]` sigmas of each slice inside the brain and in its surround.
        seed: the noise's seed; the same seed and inputs give the same slices.
    """
    mean = np.asarray(mean, np.float32)
    sigma = _sigma_map(mean, brain, background)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, 7])))
    real, imaginary = rng.standard_normal((2,) + mean.shape, dtype=np.float32) * sigma
    return np.clip(np.sqrt((mean + real) ** 2 + imaginary**2), 0.0, 1.0)


def stored_as_jpeg(quality: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """A slice `[H, W]` in [0, 1] -> the slice as written (8 bits, JPEG at `quality` unless
    None) and read back by Pillow: `fit_noise_level`'s default `store`."""

    def store(image: np.ndarray) -> np.ndarray:
        pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        if quality is not None:
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
            pixels = np.asarray(Image.open(buffer))
        return pixels.astype(np.float32) / 255.0

    return store


def fit_noise_level(
    real: np.ndarray,
    mean: np.ndarray,
    *,
    store: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """`(brain, background)` sigmas that make `mean` `[H, W]` look as noisy as `real` `[H, W]`.

    Both in [0, 1], the same frame, `real` as read from its file. See the module docstring.
    `store` maps a noisy slice to the slice as it will be written and read back (default
    `stored_as_jpeg(None)`: 8 bits); read it back as `real` was read (JPEG decoders differ by
    a few levels, as much as the faint noise of a background).
    """
    store = store or stored_as_jpeg(None)
    real = np.asarray(real, np.float32)
    mean = np.asarray(mean, np.float32)
    if real.shape != mean.shape or real.ndim != 2:
        raise ValueError(
            f"real and mean must be [H, W] of one shape. Received: {real.shape} and {mean.shape}"
        )
    surround, brain_mask = mean < BACKGROUND_LEVEL, mean > BRAIN_LEVEL
    stored_mean = store(mean)
    target = highpass_spread(real, brain_mask) ** 2
    base = highpass_spread(stored_mean, brain_mask) ** 2
    brain_guess = float(np.sqrt(max(target - base, 0.0)))

    def stored(brain: float, background: float) -> np.ndarray:
        # The same noise draw at every level: the measures below grow monotonically with it.
        return store(add_noise(mean[None], [brain], [background], seed)[0])

    background = 0.0
    if surround.any():
        # The surround's mean, which JPEG keeps (its square it does not: it smooths the noise).
        level = float(real[surround].mean())
        if level > float(stored_mean[surround].mean()):
            background = _solve(
                lambda sigma: float(stored(brain_guess, sigma)[surround].mean()),
                level,
                level / _RAYLEIGH_MEAN,
            )
    if target <= base:
        return 0.0, background
    brain = _solve(
        lambda sigma: highpass_spread(stored(sigma, background), brain_mask) ** 2,
        target,
        brain_guess,
    )
    return brain, background


def _solve(measure: Callable[[float], float], target: float, guess: float) -> float:
    """The level at which `measure`, increasing in it, reaches `target`: bracket, then bisect.

    Storage (JPEG, 8 bits) swallows part of faint noise, so no measure is linear in the level
    near the quantisation step.
    """
    low, high = 0.0, max(2.0 * guess, 1e-4)
    for _ in range(_BRACKET_STEPS):
        if measure(high) >= target:
            break
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if measure(middle) < target else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class NoiseLevels:
    """Fitted `(brain, background)` sigmas of real training slices, with their labels.

    Attributes:
        brain, background: sigma of each slice inside the brain and in its surround.
        labels: each slice's class (0 NC, 1 AD).
    """

    brain: tuple[float, ...]
    background: tuple[float, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.brain) == len(self.background) == len(self.labels) > 0:
            raise ValueError(
                "NoiseLevels needs one brain sigma, background sigma and label per slice, and at "
                f"least one slice. Received: {len(self.brain)}, {len(self.background)}, "
                f"{len(self.labels)}"
            )

    def draw(self, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`(brain, background)` `[n]` sigmas, each a training slice's of the class in `labels`.

        A class with no fitted slice draws from all of them (`pool`).
        """
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, 11])))
        picks = np.empty(len(labels), np.int64)
        for index, label in enumerate(np.asarray(labels)):
            pool = self.pool(label)
            picks[index] = pool[rng.integers(len(pool))]
        return (
            np.asarray(self.brain, np.float32)[picks],
            np.asarray(self.background, np.float32)[picks],
        )

    def pool(self, label: int) -> np.ndarray:
        """Indices of the slices a sample of class `label` draws its level from: that class's,
        or all of them for -1 (any class) or a class with no fitted slice."""
        own = np.flatnonzero(np.asarray(self.labels) == label)
        return own if len(own) else np.arange(len(self.labels))

    def summary(self) -> dict:
        """Median sigmas of each class, for records and logs."""
        own = np.asarray(self.labels)
        return {
            str(label): {
                "slices": int((own == label).sum()),
                "brain_median": float(np.median(np.asarray(self.brain)[own == label])),
                "background_median": float(np.median(np.asarray(self.background)[own == label])),
            }
            for label in sorted(set(self.labels))
        }

    def to_json(self) -> str:
        return json.dumps(
            {"brain": self.brain, "background": self.background, "labels": self.labels}
        )

    @classmethod
    def from_json(cls, text: str) -> NoiseLevels:
        values = json.loads(text)
        return cls(
            tuple(float(v) for v in values["brain"]),
            tuple(float(v) for v in values["background"]),
            tuple(int(v) for v in values["labels"]),
        )
