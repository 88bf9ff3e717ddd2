"""Discriminator resampling: keep the sampled slices a classifier finds most like real ones.

`vqpix generate --refine F` draws F candidate slices per slice it writes and keeps the ones
an in-domain classifier finds most like the run's training slices. The prior's samples are a
draw from p_model; the VQ-VAE round trips of the run's training slices a draw from what it
was trained to give, p_data (the same decoder on both sides, so the classifier judges the
codes, not the decoder). A classifier trained to tell the two apart, classes weighted
equally, has a logit for "sampled" of about log p_model(x) / p_data(x); resampling the
candidates by the inverse odds moves the kept set toward p_data: sampling-importance
resampling with a learnt density ratio (Grover et al. 2019, "Bias Correction of Learned
Generative Models using Likelihood-Free Importance Weighting",
https://arxiv.org/abs/1906.09531; for GANs, Azadi et al. 2019, "Discriminator Rejection
Sampling", https://arxiv.org/abs/1810.06758).

- The classifier is `vqpix compare`'s `SliceClassifier` with `CompareConfig`'s budget, on a
  `RefineConfig.downsample`x area downsampling (the anatomy: at full resolution the prior
  alone is already hard to tell from the reconstructions).
- Cross-fitted: the candidates are split into `RefineConfig.folds`; each fold is scored by
  classifiers trained on the other folds, so no candidate is scored by a classifier that saw
  it (its score would be overconfident).
- The real side is the run's training split only: `vqpix compare` tests on other patients.
- Kept without replacement, in proportion to the weights, within each class: Gumbel top-k
  (Kool et al. 2019, https://arxiv.org/abs/1903.06059), seeded.
- With `RefineConfig.by_class`, the ratio is estimated within each class, real slices of
  class y against candidates drawn for y: log p_data(x | y) / p_model(x | y), the weight a
  class-conditional draw needs. A candidate drawn for AD that looks like a real NC slice is
  then dropped, where the pooled ratio (real slices of both classes against candidates of
  both) would keep it.

The kept set is no longer an exact draw of the prior: it is the prior's draw reweighted by a
classifier, which is the point (each kept slice is still reproducible from its seed and map
index). The exported generator does not refine.
"""

from __future__ import annotations

import numpy as np

from keras_vqpix.config import CompareConfig, RefineConfig


def view_factor(image_size: int, config: RefineConfig | None = None) -> int:
    """The downsampling the classifier gets: `config.downsample`, or less for small images, so
    the view keeps the `2 ** len(widths)` pixels `SliceClassifier` needs (16 by default)."""
    config = config or RefineConfig()
    smallest = 2 ** len(CompareConfig().widths)
    return max(1, min(config.downsample, image_size // smallest))


def log_density_ratio(
    real: np.ndarray,
    candidates: np.ndarray,
    config: RefineConfig | None = None,
    seed: int = 0,
) -> np.ndarray:
    """`[N]` float64: the estimated log p_data(x) / p_model(x) of each candidate, cross-fitted.

    Args:
        real: `[M, H, W, 1]` float32 in [0, 1], slices of the target distribution.
        candidates: `[N, H, W, 1]` float32 in [0, 1], the samples to weigh (N >= folds).
        config: the folds and the ensemble (default `RefineConfig()`).
        seed: seeds the classifiers (the same arrays and seed give the same weights).
    """
    from keras_vqpix.compare import slice_scores, train_slice_classifier

    config = config or RefineConfig()
    if len(real) < 1 or len(candidates) < config.folds:
        raise ValueError(
            f"need real slices and at least {config.folds} candidates (one per fold). "
            f"Received: {len(real)} real, {len(candidates)} candidates"
        )
    judge = CompareConfig()
    fold = np.arange(len(candidates)) % config.folds
    logits = np.zeros(len(candidates), np.float64)
    for f in range(config.folds):
        others = candidates[fold != f]
        images = np.concatenate([real, others])
        labels = np.r_[np.zeros(len(real)), np.ones(len(others))]
        for member in range(config.ensemble):
            model = train_slice_classifier(images, labels, judge, seed=_seed(seed, f, member))
            logits[fold == f] += slice_scores(model, candidates[fold == f]) / config.ensemble
    return -logits


def class_log_density_ratio(
    real: np.ndarray,
    real_labels: np.ndarray,
    candidates: np.ndarray,
    labels: np.ndarray,
    config: RefineConfig | None = None,
    seed: int = 0,
) -> np.ndarray:
    """`[N]` float64: the estimated log p_data(x | y) / p_model(x | y) of each candidate x drawn
    for class y = `labels`, by `log_density_ratio` within each class (`real` of the class
    `real_labels` against its candidates; classifiers seeded per class).

    Raises:
        ValueError: a class of the candidates has no real slices, or fewer candidates than folds.
    """
    real_labels, labels = np.asarray(real_labels), np.asarray(labels)
    ratio = np.zeros(len(candidates), np.float64)
    for label in np.unique(labels):
        ours = labels == label
        if not (real_labels == label).any():
            raise ValueError(f"no real slices of class {label} to weigh its candidates against")
        ratio[ours] = log_density_ratio(
            real[real_labels == label], candidates[ours], config, _seed(seed, 1000 + int(label))
        )
    return ratio


def resample(
    log_weights: np.ndarray, groups: np.ndarray, counts: dict[int, int], seed: int
) -> np.ndarray:
    """Sorted indices: `counts[g]` candidates of each group g, drawn without replacement in
    proportion to `exp(log_weights)` (Gumbel top-k; a weight of 0, `-inf`, is never drawn
    while any other is left).

    Raises:
        ValueError: a group has fewer candidates than its count.
    """
    log_weights = np.asarray(log_weights, np.float64)
    groups = np.asarray(groups)
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 17]))
    keys = log_weights + rng.gumbel(size=len(log_weights))
    kept = []
    for group, count in sorted(counts.items()):
        members = np.flatnonzero(groups == group)
        if len(members) < count:
            raise ValueError(f"group {group} has {len(members)} candidates; {count} were asked for")
        # A stable sort of -keys: ties (equal -inf keys) keep the candidates' order.
        kept.append(members[np.argsort(-keys[members], kind="stable")[:count]])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _seed(seed: int, *path: int) -> int:
    """A non-negative int31 for Keras from any int32 `seed` (negative too) and a path of ints."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *path]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF
