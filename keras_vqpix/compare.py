"""Judge any data set in the ADNI layout against a real one: `vqpix compare SYNTHETIC --real DATA`.

Every classifier is a `SliceClassifier` trained from scratch with the fixed budget of a
`CompareConfig`, once per seed, and tested on the real **test** patients only (never trained
on them): the figures are the mean and spread over the seeds.

- `c2st_auc`: a classifier two-sample test (Lopez-Paz & Oquab 2017,
  https://arxiv.org/abs/1610.06545): trained to tell the real train slices from the
  synthetic train slices, tested on the real test slices vs the synthetic test slices
  (never seen); 0.5 means the two cannot be told apart, 1.0 at once. `c2st_auc_nc`,
  `c2st_auc_ad`: the same classifier's AUC on the test slices of one class (real NC vs
  synthetic NC, real AD vs synthetic AD): which class's synthetic slices give themselves away.
- `trtr_auc`: AD vs NC, trained on real train, tested on real test: the reference figure.
- `fidelity_auc`: that real-trained classifier on every synthetic slice, labelled by the class
  it was generated for: do synthetic slices carry the real AD/NC difference?
- `tstr_auc`: trained on the synthetic train slices only, tested on the real test patients
  (the classification accuracy score of Ravuri & Vinyals 2019, https://arxiv.org/abs/1905.10887).
- `augmented_auc`: trained on real train + synthetic train slices, tested on real test patients.

No classifier ever trains on a synthetic *test* slice: for a set of reconstructions
(`vqpix generate --reconstruct`) those are the real test patients' slices.
- Each AUC per slice and per patient (`*_patient`: the mean of a patient's slice scores; a
  synthetic slice without siblings is its own patient).
- `fd`, `kid`: Frechet distance and the kernel distance of KID (unbiased polynomial-kernel
  MMD^2, Binkowski et al. 2018, https://arxiv.org/abs/1801.01401) between the real train
  slices and the held-apart synthetic (test) slices, in the pooled features of the
  real-trained AD/NC classifier; `fd_real`, `kid_real` the same between real train and real
  test slices (two real sets), both from the same number of slices.
- `diversity` (mean pairwise `1 - SSIM`, `1 - MS-SSIM` from 161 px) of up to
  `diversity_images` synthetic slices, beside `diversity_real` of as many real test slices.
- `memorisation`: the share of synthetic slices whose SSIM to their nearest real train slice
  is above the 95th percentile of that figure for real test slices (about 0.05: no closer
  than real unseen slices; near 1: copies), beside `nn_ssim` / `nn_ssim_real` (the means).
- `adjacent_ssim`: stack consistency of synthetic *patients* (stacks of consecutive slices of
  one brain): the brain SSIM of slices `s` and `s + 1` of one patient, averaged over each
  patient's pairs, then over patients; `adjacent_ssim_real` the same for the real test
  patients. `adjacent_ssim_profile` (and `_real`) along the stack: entry p the mean of the
  pairs at position p (slices `first + p`, `first + p + 1`); `adjacent_ssim_max_gap` the
  largest difference of the two profiles over the positions both have. A set of single-slice
  patients (slices drawn on their own) has no stacks: its figures are None.

Every key has a `_down4` twin computed after a 4x area downsampling of both sets, which judges
anatomy rather than the decoder's texture; `<key>_std` is the spread (standard deviation)
over seeds and `per_seed` lists the values.

Time: one classifier fit costs about `epochs * images * 20 us` at 128 px on 2 CPU cores; four
fits per seed and scale (see the README section "Is the synthetic data set any good?").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keras_vqpix.config import CompareConfig
from keras_vqpix.data.discover import (
    DatasetLayoutError,
    SliceRecord,
    discover_folder,
    label_name,
    spread_records,
)
from keras_vqpix.metrics import roc_auc, roc_curve

SCALES = {"": 1, "_down4": 4}
CLASS_NAMES = ("nc", "ad")  # label 0, label 1: the `c2st_auc_<class>` keys
AUC_NAMES = (
    "c2st_auc",
    *(f"c2st_auc_{name}" for name in CLASS_NAMES),
    "trtr_auc",
    "fidelity_auc",
    "tstr_auc",
    "augmented_auc",
)
SEEDED_NAMES = (
    *AUC_NAMES,
    *(f"{name}_patient" for name in AUC_NAMES),
    "fd",
    "kid",
    "fd_real",
    "kid_real",
)
SET_NAMES = ("diversity", "diversity_real", "memorisation", "nn_ssim", "nn_ssim_real")
STACK_NAMES = (
    "adjacent_ssim",
    "adjacent_ssim_real",
    "adjacent_ssim_profile",
    "adjacent_ssim_profile_real",
    "adjacent_ssim_max_gap",
    "adjacent_ssim_patients",
    "adjacent_ssim_patients_real",
    "adjacent_ssim_profile_patients",
    "adjacent_ssim_profile_patients_real",
)
_PREDICT_BATCH = 256
STACK_COLUMNS = 20  # slices per patient shown by `plot_stacks`
# Issue 18's goal: synthetic patients' adjacent-slice SSIM within this of real ones' at every
# position of the stack (the table names it, the figure shades it around the real profile).
ADJACENT_SSIM_GOAL = 0.03


# -- Figures ---------------------------------------------------------------------------------------
def per_patient(
    patients: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`(labels, scores)` per patient: the mean of each patient's slice scores."""
    names, index = np.unique(np.asarray(patients), return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    mean_scores = np.bincount(index, weights=scores, minlength=len(names)) / counts
    patient_labels = np.zeros(len(names), np.int64)
    patient_labels[index] = labels
    return patient_labels, mean_scores


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `[N, D]` and `[M, D]`.

    `|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`, the trace of the square root taken
    from the eigenvalues of `S_a^(1/2) S_b S_a^(1/2)` (symmetric, so no complex round-off).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean = np.sum((a.mean(0) - b.mean(0)) ** 2)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(
        mean + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(np.clip(cross, 0, None)))
    )


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID's unbiased MMD^2 with the kernel `(x . y / D + 1)^3` between `[N, D]` and `[M, D]`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dim = a.shape[1]
    k_aa = (a @ a.T / dim + 1) ** 3
    k_bb = (b @ b.T / dim + 1) ** 3
    k_ab = (a @ b.T / dim + 1) ** 3
    n, m = len(a), len(b)
    return float(
        (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
        + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        - 2 * k_ab.mean()
    )


def area_downsampled(images: np.ndarray, factor: int) -> np.ndarray:
    """`[N, H // factor, W // factor, C]` float32: a `factor`x area downsampling (the mean of
    each `factor` x `factor` block; rows and columns past the last whole block are dropped)."""
    if factor == 1:
        return np.asarray(images, np.float32)
    import tensorflow as tf

    return tf.nn.avg_pool2d(np.asarray(images, np.float32), factor, factor, "VALID").numpy()


# -- Data ------------------------------------------------------------------------------------------
@dataclass
class SliceSet:
    """Images `[N, S, S, 1]` in [0, 1] with their labels (0 NC, 1 AD), patient ids and slice
    numbers (None when unknown: then the set has no stacks)."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    slices: np.ndarray | None = None

    @classmethod
    def load(cls, records: list[SliceRecord], image_size: int) -> SliceSet:
        from keras_vqpix.data.pipeline import load_images

        return cls(
            load_images(records, image_size),
            np.array([r.label for r in records], np.int64),
            np.array([r.patient for r in records]),
            np.array([r.slice_index for r in records], np.int64),
        )

    def __len__(self) -> int:
        return len(self.images)

    def downsampled(self, factor: int) -> SliceSet:
        """The set after a `factor`x area (average-pool) downsampling (`area_downsampled`)."""
        if factor == 1:
            return self
        images = area_downsampled(self.images, factor)
        return SliceSet(images, self.labels, self.patients, self.slices)

    def subset(self, index: np.ndarray) -> SliceSet:
        slices = None if self.slices is None else self.slices[index]
        return SliceSet(self.images[index], self.labels[index], self.patients[index], slices)


def _join(*sets: SliceSet) -> SliceSet:
    known = all(s.slices is not None for s in sets)
    return SliceSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.patients for s in sets]),
        np.concatenate([s.slices for s in sets]) if known else None,
    )


def _discover(root: Path, what: str) -> tuple[list[SliceRecord], list[SliceRecord]]:
    try:
        return discover_folder(root, "train"), discover_folder(root, "test")
    except DatasetLayoutError as error:
        raise DatasetLayoutError(f"{what}: {error}") from error


def _check_disjoint(synthetic_root, real_root, synthetic, real) -> None:
    """Refuse sets that share patients: a real test patient on the synthetic side leaks."""
    real_train = {r.patient for r in real[0]}
    real_test = {r.patient for r in real[1]}
    if real_train & real_test:
        raise DatasetLayoutError(
            f"patient {sorted(real_train & real_test)[0]!r} is in both {real_root}/train and "
            f"{real_root}/test; the test set must hold different patients"
        )
    shared = {r.patient for r in synthetic[0] + synthetic[1]} & (real_train | real_test)
    if shared:
        raise DatasetLayoutError(
            f"{synthetic_root} and {real_root} share patient {sorted(shared)[0]!r}: the synthetic "
            "set must hold no real patient (a real-vs-real check needs disjoint patient sets)"
        )


def _spread_index(records: list[SliceRecord], count: int) -> np.ndarray:
    position = {id(r): i for i, r in enumerate(records)}
    return np.array([position[id(r)] for r in spread_records(records, count)], np.int64)


# -- Classifiers -----------------------------------------------------------------------------------
def train_slice_classifier(
    images: np.ndarray, labels: np.ndarray, config: CompareConfig, seed: int
):
    """A `SliceClassifier` fit to `labels` (0/1) with the budget of `config`, classes weighted equally."""
    import keras

    from keras_vqpix.models.slice_classifier import SliceClassifier

    keras.utils.set_random_seed(seed)
    labels = np.asarray(labels, np.float32)
    positives = max(1.0, float(labels.sum()))
    negatives = max(1.0, float(len(labels) - labels.sum()))
    weights = np.where(labels > 0, len(labels) / (2 * positives), len(labels) / (2 * negatives))
    model = SliceClassifier(widths=config.widths)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        jit_compile=False,
    )
    model.fit(
        images,
        labels,
        sample_weight=weights.astype(np.float32),
        batch_size=config.batch_size,
        epochs=config.epochs,
        shuffle=True,
        verbose=0,
    )
    return model


def slice_scores(model, images: np.ndarray) -> np.ndarray:
    """`[N]` float32 logits of a `train_slice_classifier` model for `images` `[N, H, W, 1]`."""
    if not len(images):
        return np.zeros(0, np.float32)  # never call a model on zero images (oneDNN)
    return np.asarray(model.predict(images, batch_size=_PREDICT_BATCH, verbose=0), np.float32)


def _features(model, images: np.ndarray) -> np.ndarray:
    # Eager calls: a few batches, not worth a traced function per model.
    return np.concatenate(
        [
            np.asarray(model.features(images[i : i + _PREDICT_BATCH]))
            for i in range(0, len(images), _PREDICT_BATCH)
        ]
    )


def _aucs(name: str, figures: dict, labels, scores, patients) -> None:
    figures[name] = roc_auc(labels, scores)
    figures[f"{name}_patient"] = roc_auc(*per_patient(patients, labels, scores))


def judge_once(
    real_train: SliceSet,
    real_test: SliceSet,
    synthetic_train: SliceSet,
    synthetic_test: SliceSet,
    config: CompareConfig,
    seed: int,
    curves: dict | None = None,
) -> dict[str, float | None]:
    """The seeded figures (`SEEDED_NAMES`) of one seed at one scale; `curves` collects ROC inputs."""
    synthetic_all = _join(synthetic_train, synthetic_test)
    figures: dict[str, float | None] = {}
    curves = {} if curves is None else curves

    def record(name, labels, scores, patients):
        _aucs(name, figures, labels, scores, patients)
        curves[name] = (np.asarray(labels), np.asarray(scores))

    trtr = train_slice_classifier(real_train.images, real_train.labels, config, seed)
    record("trtr_auc", real_test.labels, slice_scores(trtr, real_test.images), real_test.patients)
    record(
        "fidelity_auc",
        synthetic_all.labels,
        slice_scores(trtr, synthetic_all.images),
        synthetic_all.patients,
    )
    # Distances from the held-apart synthetic slices and from the real test slices, with as
    # many slices on both sides (both estimates carry the same small-sample bias).
    count = min(len(real_test), len(synthetic_test))
    rng = np.random.default_rng(seed)
    train_features = _features(trtr, real_train.images)
    synthetic_features = _features(trtr, synthetic_test.images)[
        np.sort(rng.permutation(len(synthetic_test))[:count])
    ]
    test_features = _features(trtr, real_test.images)[
        np.sort(rng.permutation(len(real_test))[:count])
    ]
    figures["fd"] = frechet_distance(train_features, synthetic_features)
    figures["fd_real"] = frechet_distance(train_features, test_features)
    figures["kid"] = kernel_distance(train_features, synthetic_features)
    figures["kid_real"] = kernel_distance(train_features, test_features)
    del trtr

    # Classifiers train on the synthetic train split only: the test split stays held apart
    # (for reconstructions it holds the real test patients' slices).
    tstr = train_slice_classifier(synthetic_train.images, synthetic_train.labels, config, seed)
    record("tstr_auc", real_test.labels, slice_scores(tstr, real_test.images), real_test.patients)
    del tstr

    augmented = _join(real_train, synthetic_train)
    model = train_slice_classifier(augmented.images, augmented.labels, config, seed)
    record(
        "augmented_auc", real_test.labels, slice_scores(model, real_test.images), real_test.patients
    )
    del model

    # Real vs synthetic: label 1 = synthetic; tested on slices neither side was trained on.
    c2st_images = np.concatenate([real_train.images, synthetic_train.images])
    c2st_labels = np.concatenate([np.zeros(len(real_train)), np.ones(len(synthetic_train))])
    model = train_slice_classifier(c2st_images, c2st_labels, config, seed)
    test = _join(real_test, synthetic_test)
    test_labels = np.concatenate([np.zeros(len(real_test)), np.ones(len(synthetic_test))])
    scores = slice_scores(model, test.images)
    record("c2st_auc", test_labels, scores, test.patients)
    # The same classifier's AUC within each class: whose synthetic slices give themselves away.
    for label, name in enumerate(CLASS_NAMES):
        rows = test.labels == label
        _aucs(f"c2st_auc_{name}", figures, test_labels[rows], scores[rows], test.patients[rows])
    return figures


def set_figures(
    real_train: SliceSet,
    real_test: SliceSet,
    synthetic: SliceSet,
    config: CompareConfig,
    synthetic_spread: np.ndarray,
    real_spread: np.ndarray,
) -> dict[str, float | None]:
    """Diversity and memorisation (`SET_NAMES`): no classifier, so no seed."""
    from keras_vqpix.similarity import memorisation_share, nearest_ssim, pairwise_diversity

    synthetic_nn = nearest_ssim(synthetic.images, real_train.images)
    real_nn = nearest_ssim(real_test.images, real_train.images)
    return {
        "diversity": pairwise_diversity(synthetic.images[synthetic_spread])[0],
        "diversity_real": pairwise_diversity(real_test.images[real_spread])[0],
        "memorisation": memorisation_share(synthetic_nn, real_nn, config.memorisation_percentile),
        "nn_ssim": float(np.mean(synthetic_nn)),
        "nn_ssim_real": float(np.mean(real_nn)),
    }


def stack_figures(real_test: SliceSet, synthetic: SliceSet) -> dict:
    """Stack consistency (`STACK_NAMES`) of the synthetic patients and of the real test patients.

    The real reference is the real **test** patients, the ones every classifier is tested on:
    patients the generator never saw, so a generator that copied training stacks gains nothing.
    """
    from keras_vqpix.similarity import StackConsistency, profile_gap, stack_consistency

    def consistency(images: SliceSet) -> StackConsistency:
        if images.slices is None:
            return StackConsistency(None, [], [], 0, 0)
        return stack_consistency(images.images, images.patients, images.slices)

    synthetic_stacks, real_stacks = consistency(synthetic), consistency(real_test)
    return {
        "adjacent_ssim": synthetic_stacks.mean,
        "adjacent_ssim_real": real_stacks.mean,
        "adjacent_ssim_profile": synthetic_stacks.profile,
        "adjacent_ssim_profile_real": real_stacks.profile,
        "adjacent_ssim_max_gap": profile_gap(synthetic_stacks.profile, real_stacks.profile),
        "adjacent_ssim_patients": synthetic_stacks.patients,
        "adjacent_ssim_patients_real": real_stacks.patients,
        "adjacent_ssim_profile_patients": synthetic_stacks.profile_patients,
        "adjacent_ssim_profile_patients_real": real_stacks.profile_patients,
    }


# -- The comparison --------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What `compare_datasets` found.

    Attributes:
        metrics: the `--json` figures (see the module docstring).
        curves: scale suffix -> figure name -> `(labels, scores)` of the first seed, for ROC plots.
        examples: `(row label, images [n, S, S, 1])` rows of synthetic slices beside real ones.
        stacks: `(row label, images [n, S, S, 1], slice numbers)` rows of whole patients, two
            synthetic above two real test ones (`plot_stacks`).
    """

    metrics: dict
    curves: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    stacks: list = field(default_factory=list)


def _summarise(per_seed: dict[str, list]) -> dict:
    out = {}
    for key, values in per_seed.items():
        known = [v for v in values if v is not None]
        out[key] = float(np.mean(known)) if known else None
        out[f"{key}_std"] = float(np.std(known)) if known else None
    return out


def compare_datasets(
    synthetic_root: str | os.PathLike,
    real_root: str | os.PathLike,
    config: CompareConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Judge the data set `synthetic_root` against the real data set `real_root`.

    Both in the ADNI layout (`{train,test}/{AD,NC}/<patient>_<slice>.jpeg`) with no patient in
    common. See the module docstring for the figures.

    Args:
        synthetic_root: the data set judged (generated, reconstructed, or real for a check).
        real_root: the real data set; its train folder trains, its test folder tests.
        config: the classifiers' budget and the statistics' sizes (default `CompareConfig()`).
        log: progress messages (one line per classifier round).

    Raises:
        DatasetLayoutError: a folder is not in the layout, or the sets share patients.
    """
    config = config or CompareConfig()
    log = log or (lambda message: None)
    started = time.time()
    synthetic_root, real_root = Path(synthetic_root), Path(real_root)
    synthetic_records = _discover(synthetic_root, "the synthetic set")
    real_records = _discover(real_root, "--real")
    _check_disjoint(synthetic_root, real_root, synthetic_records, real_records)
    noise = {
        "synthetic_noise": carries_noise(synthetic_root),
        "real_noise": carries_noise(real_root),
    }
    if noise_note(noise):
        log(noise_note(noise))
    size = config.image_size
    real_train, real_test = (SliceSet.load(r, size) for r in real_records)
    synthetic_train, synthetic_test = (SliceSet.load(r, size) for r in synthetic_records)
    synthetic_spread = _spread_index(
        synthetic_records[0] + synthetic_records[1], config.diversity_images
    )
    real_spread = _spread_index(real_records[1], config.diversity_images)
    log(
        f"Loaded {len(real_train)} real train, {len(real_test)} real test, "
        f"{len(synthetic_train)} synthetic train and {len(synthetic_test)} synthetic test slices "
        f"at {size} px ({time.time() - started:.0f} s)"
    )

    metrics: dict = {}
    per_seed_all: dict[str, list] = {}
    curves: dict = {}
    for suffix, factor in SCALES.items():
        sets = [
            s.downsampled(factor) for s in (real_train, real_test, synthetic_train, synthetic_test)
        ]
        per_seed: dict[str, list] = {name: [] for name in SEEDED_NAMES}
        for number, seed in enumerate(config.seeds):
            seed_curves: dict = {}
            figures = judge_once(*sets, config, seed, seed_curves)
            if number == 0:
                curves[suffix] = seed_curves
            for name in SEEDED_NAMES:
                per_seed[name].append(figures[name])
            log(
                f"scale {size // factor} px, seed {seed}: c2st {_fmt(figures['c2st_auc'])}, "
                f"trtr {_fmt(figures['trtr_auc'])}, fidelity {_fmt(figures['fidelity_auc'])}, "
                f"tstr {_fmt(figures['tstr_auc'])} ({time.time() - started:.0f} s)"
            )
        for key, value in _summarise(per_seed).items():
            metrics[key + suffix] = value
        per_seed_all.update({name + suffix: values for name, values in per_seed.items()})
        synthetic_all = _join(sets[2], sets[3])
        for key, value in set_figures(
            sets[0], sets[1], synthetic_all, config, synthetic_spread, real_spread
        ).items():
            metrics[key + suffix] = value
        stacks_started = time.time()
        stacks = stack_figures(sets[1], synthetic_all)
        metrics.update({key + suffix: value for key, value in stacks.items()})
        log(
            f"scale {size // factor} px, adjacent-slice SSIM: synthetic "
            f"{_stack_fmt(stacks['adjacent_ssim'])} ({stacks['adjacent_ssim_patients']} patients "
            f"with stacks), real test {_stack_fmt(stacks['adjacent_ssim_real'])}, largest profile "
            f"gap {_stack_fmt(stacks['adjacent_ssim_max_gap'])} ({time.time() - stacks_started:.1f} s)"
        )

    metrics.update(
        {
            "per_seed": per_seed_all,
            "synthetic": str(synthetic_root.resolve()),
            "real": str(real_root.resolve()),
            "num_real_train": len(real_train),
            "num_real_test": len(real_test),
            "num_synthetic_train": len(synthetic_train),
            "num_synthetic_test": len(synthetic_test),
            "real_test_patients": int(len(np.unique(real_test.patients))),
            "diversity_metric": "1 - MS-SSIM" if size >= 161 else "1 - SSIM",
            **noise,
            "config": config.to_dict(),
            "seconds": round(time.time() - started, 1),
        }
    )
    synthetic_all = _join(synthetic_train, synthetic_test)
    return Comparison(
        metrics,
        curves,
        _examples(real_test, synthetic_all),
        _stack_rows(real_test, synthetic_all),
    )


def _examples(real: SliceSet, synthetic: SliceSet, per_row: int = 8) -> list:
    rows = []
    for label, name in ((0, "NC"), (1, "AD")):
        rows.append((f"{name} synthetic", synthetic.images[synthetic.labels == label][:per_row]))
        rows.append((f"{name} real test", real.images[real.labels == label][:per_row]))
    return [row for row in rows if len(row[1])]


def _longest_stacks(images: SliceSet, count: int) -> list[str]:
    """`count` patients with the most slices (ties: by id), the longest NC and AD ones first."""
    names, first, counts = np.unique(images.patients, return_index=True, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
    chosen = []
    for label in (0, 1):
        chosen += [i for i in order if images.labels[first[i]] == label][:1]
    chosen += [i for i in order if i not in chosen]
    return [str(names[i]) for i in chosen[:count]]


def _stack_rows(
    real: SliceSet, synthetic: SliceSet, per_side: int = 2, columns: int = STACK_COLUMNS
) -> list:
    """Two synthetic patients above two real test ones, slice by slice (the middle `columns`)."""
    rows = []
    for side, images in (("synthetic", synthetic), ("real test", real)):
        for patient in _longest_stacks(images, per_side):
            index = np.flatnonzero(images.patients == patient)
            if images.slices is not None:
                index = index[np.argsort(images.slices[index], kind="stable")]
            start = max(0, (len(index) - columns) // 2)
            index = index[start : start + columns]
            numbers = [int(v) for v in images.slices[index]] if images.slices is not None else []
            label = label_name(int(images.labels[index[0]]))
            rows.append((f"{side} {label}\n{patient}", images.images[index], numbers))
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _stack_fmt(value: float | None) -> str:
    """A stack figure: None means the set has no consecutive slices of one patient."""
    return "no stacks" if value is None else f"{value:.3f}"


# -- Reports ---------------------------------------------------------------------------------------
_TABLE = (
    ("c2st_auc", "real vs synthetic AUC (0.5 = indistinguishable)", None),
    ("c2st_auc_nc", "  within NC slices", None),
    ("c2st_auc_ad", "  within AD slices", None),
    ("trtr_auc", "AD/NC: train real, test real (reference)", None),
    ("fidelity_auc", "AD/NC: real-trained classifier on synthetic", "trtr_auc"),
    ("tstr_auc", "AD/NC: train synthetic, test real", "trtr_auc"),
    ("augmented_auc", "AD/NC: train real + synthetic, test real", "trtr_auc"),
    ("fd", "Frechet distance to real train features", "fd_real"),
    ("kid", "kernel distance (KID) to real train features", "kid_real"),
    ("diversity", "diversity, mean pairwise 1 - SSIM", "diversity_real"),
    ("memorisation", "share nearer to a train slice than 95% of real test", None),
)
_STACK_TABLE = (
    ("adjacent_ssim", "stacks: brain SSIM of consecutive slices, mean of patients"),
    ("adjacent_ssim_real", "  real test patients"),
    (
        "adjacent_ssim_max_gap",
        f"stacks: largest gap of the profiles (goal <= {ADJACENT_SSIM_GOAL})",
    ),
)


# A synthetic train split this much smaller than the real one gets the size note.
_SIZE_TOLERANCE = 0.9


def size_note(metrics: dict) -> str | None:
    """A warning when the classifiers saw fewer synthetic train slices than real ones, else None.

    The c2st classifier learns "synthetic" from the synthetic train slices and the tstr
    classifier learns AD/NC from them only, with the same epochs as on the real side: with
    fewer slices both are weaker tests (measured in docs/synthetic.md, "The size of the
    synthetic set matters").
    """
    synthetic, real = metrics.get("num_synthetic_train"), metrics.get("num_real_train")
    if not synthetic or not real or synthetic >= _SIZE_TOLERANCE * real:
        return None
    return (
        f"note: {synthetic} synthetic train slices against {real} real: c2st and tstr are weaker "
        "tests than with a synthetic train split as large as the real one (vqpix generate "
        "--per-class)"
    )


def carries_noise(root: str | os.PathLike) -> bool:
    """Whether the slices of the data set `root` carry acquisition noise: a set `vqpix
    generate` wrote says so in its `generator.json` (`options.noise`; sets written before the
    option are noise-free); any other set holds scans, which do."""
    try:
        record = json.loads((Path(root) / "generator.json").read_text())
    except (OSError, ValueError):  # no record (or not one we wrote): scans
        return True
    return bool(record.get("options", {}).get("noise", False))


def noise_note(metrics: dict) -> str | None:
    """A warning when one side carries acquisition noise and the other does not, else None.

    The noise alone can then tell the sets apart, whatever the anatomy: noise-free samples of
    the default run against its noisy reconstructions gave c2st 1.0 at 32 px (0.54 against
    noise-free ones).
    """
    synthetic, real = metrics.get("synthetic_noise"), metrics.get("real_noise")
    if synthetic is None or real is None or synthetic == real:
        return None
    noisy, clean = ("--real", "the synthetic set") if real else ("the synthetic set", "--real")
    return (
        f"note: {noisy} carries acquisition noise and {clean} does not, so a classifier can tell "
        "them apart by the noise alone; judge like with like (vqpix generate --no-noise, or "
        "--reconstruct DATA --no-noise for noise-free reconstructions)"
    )


def format_comparison(metrics: dict) -> str:
    """A plain-text table: each figure at both scales, mean +- spread over seeds, beside its reference."""
    seeds = len(metrics.get("config", {}).get("seeds", ())) or 1
    size = metrics.get("config", {}).get("image_size", "?")
    down = size // 4 if isinstance(size, int) else "?"
    header = f"{'figure':<22}{'':<64}{f'{size} px':>22}{f'{down} px (down4)':>22}"
    lines = [
        f"{metrics.get('synthetic')} judged against {metrics.get('real')}: "
        f"{metrics.get('num_synthetic_train', 0) + metrics.get('num_synthetic_test', 0)} synthetic slices, "
        f"{metrics.get('num_real_test')} real test slices of {metrics.get('real_test_patients')} patients; "
        f"mean +- spread over {seeds} classifier seeds ({metrics.get('seconds')} s)",
    ]
    lines += [note for note in (noise_note(metrics), size_note(metrics)) if note]
    lines.append(header)

    def cell(key: str, suffix: str) -> str:
        value = metrics.get(key + suffix)
        std = metrics.get(f"{key}_std{suffix}")
        text = _fmt(value, 4 if key.startswith("kid") else 3)
        return text + (
            f" +- {_fmt(std, 4 if key.startswith('kid') else 3)}" if std is not None else ""
        )

    for key, text, reference in _TABLE:
        keys = [key, f"{key}_patient"] if key.endswith("_auc") else [key]
        for name in keys:
            label = text + (" (per patient)" if name.endswith("_patient") else "")
            lines.append(f"{name:<22}{label:<64}{cell(name, ''):>22}{cell(name, '_down4'):>22}")
        if reference is not None and not reference.startswith("trtr"):
            lines.append(
                f"{reference:<22}{'  real reference':<64}{cell(reference, ''):>22}{cell(reference, '_down4'):>22}"
            )
    if "adjacent_ssim" in metrics:  # absent from reports written before stacks were judged
        for key, text in _STACK_TABLE:
            lines.append(
                f"{key:<22}{text:<64}{_stack_fmt(metrics.get(key)):>22}{_stack_fmt(metrics.get(key + '_down4')):>22}"
            )
        for key, text in (
            ("adjacent_ssim_profile", "synthetic"),
            ("adjacent_ssim_profile_real", "real test"),
        ):
            profile = metrics.get(key) or []
            values = " ".join(_fmt(v) for v in profile) if profile else "no stacks"
            lines.append(f"{key:<28}{text} by pair position ({size} px): {values}")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: str | os.PathLike, title: str) -> Path:
    """ROC curves of every classifier (first seed; both scales) above synthetic and real slices."""
    from keras_vqpix import plots

    panels = []
    for suffix, curves in comparison.curves.items():
        lines = []
        for name in AUC_NAMES:
            if name in curves:
                labels, scores = curves[name]
                auc = roc_auc(labels, scores)
                if auc is not None:
                    fpr, tpr, _ = roc_curve(labels, scores)
                    lines.append((f"{name} {auc:.3f}", fpr, tpr))
        scale = "full scale" if not suffix else "4x downsampled"
        panels.append((scale, lines))
    return plots.plot_roc_panels(panels, comparison.examples, Path(path), title)


def plot_stacks(comparison: Comparison, path: str | os.PathLike, title: str) -> Path:
    """Two synthetic patients above two real test ones, slice by slice, below the adjacent-slice
    SSIM profiles of both sets (full scale)."""
    from keras_vqpix import plots

    metrics = comparison.metrics
    profiles = [
        ("synthetic", metrics.get("adjacent_ssim_profile") or []),
        ("real test", metrics.get("adjacent_ssim_profile_real") or []),
    ]
    gap = metrics.get("adjacent_ssim_max_gap")
    if gap is not None:
        title = f"{title}; largest profile gap {gap:.3f}"
    return plots.plot_patient_stacks(
        comparison.stacks, profiles, Path(path), title, tolerance=ADJACENT_SSIM_GOAL
    )
