"""`keras_vqpix.noise`: Rician acquisition noise, its levels fitted to real slices (known answers)."""

from __future__ import annotations

import numpy as np
import pytest

from keras_vqpix.noise import (
    NoiseLevels,
    add_noise,
    fit_noise_level,
    highpass_spread,
    stored_as_jpeg,
)


def _phantom() -> np.ndarray:
    """A smooth 'brain' `[240, 256]`: an ellipse of slowly varying tissue on a black surround."""
    rows, cols = np.mgrid[:240, :256]
    inside = (rows - 120) ** 2 / 90**2 + (cols - 128) ** 2 / 100**2 < 1
    return np.where(inside, 0.5 + 0.2 * np.sin(cols / 15.0), 0.0).astype(np.float32)


def test_highpass_spread_reads_white_noise_and_ignores_smooth_structure():
    rng = np.random.default_rng(0)
    mask = np.ones((200, 200), bool)
    for sigma in (0.01, 0.05):
        noise = rng.normal(0.5, sigma, (200, 200)).astype(np.float32)
        assert highpass_spread(noise, mask) == pytest.approx(sigma, rel=0.05)
    assert highpass_spread(_phantom(), _phantom() > 0.1) < 1e-3
    assert highpass_spread(_phantom(), np.zeros((240, 256), bool)) == 0.0


def test_add_noise_is_rician_and_seeded():
    mean = np.zeros((2, 64, 64), np.float32)
    mean[1] = 0.5
    noisy = add_noise(mean, [0.02, 0.02], [0.02, 0.02], seed=3)
    # A zero signal becomes Rayleigh noise (mean sigma * sqrt(pi / 2)); a strong one keeps its
    # level, roughened by sigma.
    assert noisy[0].mean() == pytest.approx(0.02 * np.sqrt(np.pi / 2), rel=0.05)
    assert noisy[1].mean() == pytest.approx(0.5, abs=0.002)
    assert noisy[1].std() == pytest.approx(0.02, rel=0.05)
    assert np.array_equal(noisy, add_noise(mean, [0.02] * 2, [0.02] * 2, seed=3))
    assert not np.array_equal(noisy, add_noise(mean, [0.02] * 2, [0.02] * 2, seed=4))
    assert np.array_equal(add_noise(mean, [0.0, 0.0], [0.0, 0.0], seed=3), mean)
    # Brain sigma inside the brain, background sigma outside.
    split = add_noise(mean, [0.0, 0.0], [0.05, 0.05], seed=3)
    assert split[0].mean() > 0.05 and np.array_equal(split[1], mean[1])


@pytest.mark.parametrize("sigma", [0.01, 0.02, 0.04])
def test_fit_noise_level_recovers_a_known_level(sigma):
    mean = _phantom()
    real = stored_as_jpeg(None)(add_noise(mean[None], [sigma], [sigma / 4], seed=1)[0])
    brain, background = fit_noise_level(real, mean)
    assert brain == pytest.approx(sigma, rel=0.1)
    assert background == pytest.approx(sigma / 4, rel=0.15)


def test_fit_noise_level_matches_the_stored_slices_spread():
    """Whatever JPEG swallows, the fitted level gives the decoded mean the real slice's spread."""
    mean = _phantom()
    brain_mask = mean > 0.1
    for sigma in (0.01, 0.03):
        real = stored_as_jpeg(92)(add_noise(mean[None], [sigma], [sigma / 4], seed=2)[0])
        brain, background = fit_noise_level(real, mean, store=stored_as_jpeg(95), seed=5)
        again = stored_as_jpeg(95)(add_noise(mean[None], [brain], [background], seed=9)[0])
        assert highpass_spread(again, brain_mask) == pytest.approx(
            highpass_spread(real, brain_mask), rel=0.06
        )
        surround = mean == 0
        assert again[surround].mean() == pytest.approx(real[surround].mean(), rel=0.1)
    # A noise-free slice needs no noise.
    assert fit_noise_level(stored_as_jpeg(None)(mean), mean)[0] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        fit_noise_level(mean, mean[:-1])


def test_noise_levels_draw_within_the_class_and_round_trip():
    levels = NoiseLevels((0.01, 0.02, 0.03, 0.04), (0.1, 0.2, 0.3, 0.4), (0, 0, 1, 1))
    brain, background = levels.draw(np.array([0] * 50 + [1] * 50), seed=0)
    assert set(brain[:50].astype(float).round(3)) == {0.01, 0.02}
    assert set(brain[50:].astype(float).round(3)) == {0.03, 0.04}
    assert np.allclose(background, brain * 10)  # pairs stay pairs
    assert np.array_equal(brain, levels.draw(np.array([0] * 50 + [1] * 50), seed=0)[0])
    assert NoiseLevels.from_json(levels.to_json()) == levels
    assert levels.summary()["1"]["brain_median"] == pytest.approx(0.035)
    only_nc = NoiseLevels((0.01,), (0.1,), (0,))
    assert only_nc.draw(np.array([1, 1]), seed=0)[0].tolist() == pytest.approx([0.01, 0.01])
    with pytest.raises(ValueError, match="one brain sigma"):
        NoiseLevels((0.01,), (), (0,))
