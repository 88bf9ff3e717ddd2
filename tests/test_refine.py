"""Discriminator resampling (`keras_vqpix.refine`, `vqpix generate --refine F`): known answers."""

from __future__ import annotations

import numpy as np
import pytest

from keras_vqpix.compare import area_downsampled
from keras_vqpix.config import RefineConfig
from keras_vqpix.metrics import roc_auc
from keras_vqpix.refine import class_log_density_ratio, log_density_ratio, resample, view_factor


def test_area_downsampled_is_the_block_mean():
    images = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6, 1)
    small = area_downsampled(images, 2)
    assert small.shape == (2, 2, 3, 1)
    assert small[0, 0, 0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert small[1, 1, 2, 0] == pytest.approx(images[1, 2:4, 4:6].mean())
    assert area_downsampled(images, 1).shape == images.shape


def test_view_factor_keeps_the_classifier_input_large_enough():
    config = RefineConfig(downsample=4)
    assert view_factor(128, config) == 4  # 32 px
    assert view_factor(32, config) == 2  # 16 px, the classifier's smallest input
    assert view_factor(16, config) == 1


def test_resample_draws_in_proportion_without_replacement():
    groups = np.array([0, 0, 0, 1, 1, 1, 1])
    log_weights = np.array([0.0, -np.inf, 0.0, 1.0, 2.0, -np.inf, 0.5])
    for seed in range(20):
        kept = resample(log_weights, groups, {0: 2, 1: 3}, seed)
        # Exact counts, no repeats, sorted, and a zero weight only when nothing else is left.
        assert kept.tolist() == sorted(set(kept.tolist()))
        assert kept.tolist() == [0, 2, 3, 4, 6]
    # One draw of two with weights 3 : 1 takes the first 3/4 of the time (Gumbel max).
    first = np.mean(
        [resample(np.log([3.0, 1.0]), np.zeros(2), {0: 1}, seed)[0] == 0 for seed in range(4000)]
    )
    assert first == pytest.approx(0.75, abs=0.03)
    # Equal weights: every candidate kept equally often (5 of 10: one half).
    counts = np.zeros(10)
    for seed in range(2000):
        counts[resample(np.zeros(10), np.zeros(10), {0: 5}, seed)] += 1
    assert np.allclose(counts / 2000, 0.5, atol=0.05)
    # Any int32 seed: negative and the largest too.
    for seed in (-(2**31), -1, 2**31 - 1):
        assert len(resample(log_weights, groups, {0: 2}, seed)) == 2
    with pytest.raises(ValueError, match="group 1 has 4 candidates; 5"):
        resample(log_weights, groups, {1: 5}, 0)


def _discs(count: int, rng: np.random.Generator, flawed: np.ndarray) -> np.ndarray:
    """16x16 bright discs of random radius and place; `flawed` ones with a dark hole at the centre."""
    y, x = np.mgrid[:16, :16]
    images = np.zeros((count, 16, 16, 1), np.float32)
    for i in range(count):
        cy, cx = rng.uniform(6.5, 8.5, 2)
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= rng.uniform(4.5, 6.0) ** 2
        images[i, ..., 0] = 0.8 * inside + rng.normal(0.0, 0.03, (16, 16))
        if flawed[i]:
            images[i, int(cy) - 1 : int(cy) + 2, int(cx) - 1 : int(cx) + 2, 0] = 0.1
    return np.clip(images, 0.0, 1.0)


def test_resampling_by_the_learnt_ratio_drops_the_flawed_candidates():
    rng = np.random.default_rng(0)
    real = _discs(240, rng, np.zeros(240, bool))
    flawed = rng.random(320) < 0.5
    candidates = _discs(320, rng, flawed)
    log_weights = log_density_ratio(real, candidates, RefineConfig(ensemble=1), seed=1)
    # Cross-fitted weights rank the flawed candidates below the good ones.
    assert roc_auc(flawed.astype(int), -log_weights) > 0.9
    kept = resample(log_weights, np.zeros(320), {0: 100}, seed=0)
    assert flawed[kept].mean() < 0.3  # half of the candidates are flawed
    # Same arrays, same seed: the same weights.
    again = log_density_ratio(real, candidates, RefineConfig(ensemble=1), seed=1)
    assert np.allclose(again, log_weights, atol=1e-5)
    for seed in (-(2**31), 2**31 - 1):  # any int32 seed seeds the classifiers
        tiny = log_density_ratio(real[:4], candidates[:4], RefineConfig(ensemble=1), seed=seed)
        assert tiny.shape == (4,) and np.isfinite(tiny).all()
    with pytest.raises(ValueError, match="at least 2 candidates"):
        log_density_ratio(real, candidates[:1])


def test_the_ratio_within_each_class_drops_candidates_of_the_other_class():
    # Real NC slices are whole discs, real AD discs with a hole. Half the candidates drawn for
    # each class look like the other class. Pooled, both sides hold half of each kind, so the
    # pooled ratio cannot see which are wrong; within each class it can.
    rng = np.random.default_rng(2)
    real_labels = np.repeat([0, 1], 240)
    real = _discs(480, rng, real_labels == 1)
    labels = np.repeat([0, 1], 320)
    wrong = rng.random(640) < 0.5
    candidates = _discs(640, rng, (labels == 1) != wrong)
    config = RefineConfig(ensemble=1)
    by_class = class_log_density_ratio(real, real_labels, candidates, labels, config, seed=1)
    pooled = log_density_ratio(real, candidates, config, seed=1)
    assert roc_auc(wrong.astype(int), -by_class) > 0.9
    assert roc_auc(wrong.astype(int), -pooled) < 0.7
    kept = resample(by_class, labels, {0: 100, 1: 100}, seed=0)
    assert wrong[kept].mean() < 0.3 and (labels[kept] == 1).sum() == 100
    with pytest.raises(ValueError, match="no real slices of class 1"):
        class_log_density_ratio(real[:240], real_labels[:240], candidates, labels, config)


def test_refine_config_refuses_bad_values_in_one_line():
    for field, value in (("folds", 1), ("downsample", 0), ("ensemble", 0), ("real_slices", 0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            RefineConfig(**{field: value})
