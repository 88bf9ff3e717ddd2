"""Likelihood uses of the conditional prior: an AD/NC classifier and an anomaly detector.

The PixelCNN gives the exact log-likelihood of a code map, `log p(codes | label) = sum_ij
log p(c_ij | c_<ij, label)`, in one forward pass per label (van den Oord et al. 2016,
https://arxiv.org/abs/1606.05328). Two questions follow.

**Classification** (`classify_run`, `vqpix classify`): Bayes' rule with the prior as the
class-conditional model. Per slice, the log-likelihood ratio `log p(codes | AD) - log p(codes |
NC)` (nats) plus the log prior odds of the run's training split is the posterior log-odds of
AD; per patient, the slices' ratios add up (the slices are treated as independent given the
class, which makes the patient's probability overconfident but ranks patients sensibly, so
the balanced accuracy at the log-ratio threshold best on the validation split is reported
too). Beside it, any other slice classifier (`classify_run(baseline=...)`; the CLI uses
`cnn_slice_probabilities`, the small CNN of `vqpix compare`) on the same training split.

**Anomaly detection** (`detect_anomalies`, `anomaly_run`, `vqpix anomaly`), after Pinaya et
al., "Unsupervised brain anomaly detection and segmentation with transformers" (MIDL 2021,
https://arxiv.org/abs/2102.11650; MedIA 2022): the surprise of each code, `-log p(c_ij |
c_<ij, label)` under the healthy (NC) or unconditional prior, flags codes the prior did not
expect; the codes above a surprise threshold are redrawn from the prior
(`keras_vqpix.sampling.resample_codes`) and the healed map decoded; the residual `|image -
healed|` is the pixel-level anomaly map. Its baseline needs no prior: the VQ-VAE's own residual
`|image - reconstruction|`. Scored against lesion masks (`keras_vqpix.data.lesions`) by pixel
AUROC, AUPRC and best achievable Dice inside the head, and by slice AUROC.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vqpix.data.discover import CLASS_NAMES, LABELS, DataSplits, SliceRecord
from keras_vqpix.metrics import (
    average_precision,
    balanced_accuracy,
    best_dice,
    head_mask,
    roc_auc,
    roc_curve,
)
from keras_vqpix.sampling import UNCONDITIONAL, decode_codes, resample_codes

NC, AD = LABELS["NC"], LABELS["AD"]
# Pinaya et al. 2022 redraw the tokens whose probability under the prior is below 0.005.
DEFAULT_SURPRISE_THRESHOLD = -math.log(0.005)  # 5.30 nats
# `anomaly_run` calibrates instead, when it can: the threshold that redraws this share of the
# codes of healthy (NC) validation slices. A fixed probability means something else for every
# prior (a prior of 2.5 bits per code finds many healthy codes below p = 0.005 in textured
# tissue); a quantile of healthy codes redraws the same share whatever the prior's fit.
DEFAULT_HEALTHY_QUANTILE = 0.99
_LOG_LIKELIHOODS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- Per-code log-likelihoods --------------------------------------------------------------------------
def _log_likelihood_function(prior):
    """A traced-once `tf.function(codes [n, h, w], label, positions [n]) -> log p of each code
    [n, h, w]` (`positions`: read by a prior with slice positions only; -1: unknown)."""
    cached = _LOG_LIKELIHOODS.get(prior)
    if cached is not None:
        return cached
    prior_ref = weakref.ref(prior)  # the cache must not keep the prior alive
    reads_positions = getattr(prior, "slice_positions", 0) > 0

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int32),
        ]
    )
    def log_likelihoods(codes, label, positions):
        labels = tf.fill(tf.shape(codes)[:1], label)
        context = {"positions": positions} if reads_positions else {}
        logits = prior_ref()(codes, labels, training=False, **context)
        log_probabilities = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
        return tf.gather(log_probabilities, codes, batch_dims=3)

    _LOG_LIKELIHOODS[prior] = log_likelihoods
    return log_likelihoods


def code_log_likelihoods(
    prior, codes, label: int, batch_size: int = 64, positions=None
) -> np.ndarray:
    """`log p(c_ij | c_<ij, label)` of every code, float32 `[n, h, w]` in nats (<= 0).

    One forward pass of the prior per batch (`label` -1: unconditional; ignored by an
    unconditional prior). Summed over a map this is the map's exact log-likelihood; its mean
    over all codes is `-ln 2` times the prior's bits per code. A prior with slice positions
    reads each map's position bin from `positions [n]` (`slice_positions`; -1 or None:
    unknown, which such a prior learns only from the share `label_dropout` of its training
    maps whose position it drops).
    """
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [n, h, w]. Received: shape {codes.shape}")
    if len(codes) == 0:  # never run a model on zero maps (oneDNN's empty-batch shape bug)
        return np.zeros(codes.shape, np.float32)
    positions = (
        np.full(len(codes), -1, np.int32) if positions is None else np.asarray(positions, np.int32)
    )
    if positions.shape != (len(codes),):
        raise ValueError(
            f"positions must be [n] for {len(codes)} maps. Received: shape {positions.shape}"
        )
    log_likelihoods = _log_likelihood_function(prior)
    label = tf.constant(label, tf.int32)
    return np.concatenate(
        [
            log_likelihoods(
                tf.constant(codes[i : i + batch_size]),
                label,
                tf.constant(positions[i : i + batch_size]),
            ).numpy()
            for i in range(0, len(codes), batch_size)
        ]
    )


def slice_positions(prior, records) -> np.ndarray | None:
    """The position bin of each record in its patient's stack, as a prior with slice positions
    trained on them (`keras_vqpix.data.stacks.stack_context`); None for any other prior."""
    from keras_vqpix.data.stacks import stack_context

    bins = getattr(prior, "slice_positions", 0)
    return stack_context(records, bins)[1] if bins > 0 else None


def log_likelihood_ratios(prior, codes, batch_size: int = 64, positions=None) -> np.ndarray:
    """`log p(codes | AD) - log p(codes | NC)` of each map, float64 `[n]` in nats.

    Exact: one forward pass of the prior per label, the per-code log-likelihoods summed per
    map (`positions`: as `code_log_likelihoods`). Positive: the map is likelier under AD.
    """
    if not getattr(prior, "conditional", False):
        raise ValueError(
            "the prior is unconditional (trained without labels): it has no p(codes | AD) or "
            "p(codes | NC) to compare"
        )
    totals = [
        code_log_likelihoods(prior, codes, label, batch_size, positions)
        .astype(np.float64)
        .sum(axis=(1, 2))
        for label in (AD, NC)
    ]
    return totals[0] - totals[1]


# -- Which slices an evaluation reads ------------------------------------------------------------------
def evaluation_split(run_dir: str | os.PathLike, data_root: str | os.PathLike, split: str = "test"):
    """`(splits, chosen)`: the run's own data splits and the slices of `data_root` to evaluate.

    `chosen` is the `keras_vqpix.evaluation.EvaluationData` (records, split, external) of `keras_vqpix.evaluation.evaluation_records`: a split of the run's
    own data, or, when `data_root` holds other patients, its `test/` folder (`split="test"`) or
    every slice (`"all"`) as external data. `splits` are always the run's own (its training and
    validation slices give the class prior, the CNN and the anomaly threshold): for external
    data they are read from the data folder the run recorded in `split.json`.

    Raises:
        RunFolderError: external data, and the run's own data folder is not at hand.
    """
    from keras_vqpix.evaluation import evaluation_records
    from keras_vqpix.run_folder import RunPaths, read_config

    paths = RunPaths(Path(run_dir))
    config = read_config(paths)
    chosen = evaluation_records(paths.root, data_root, split, config)
    if not chosen.external:
        return chosen.splits, chosen
    return recorded_splits(paths, config), chosen


def recorded_splits(paths, config) -> DataSplits:
    """The run's data splits, of the data folder its `split.json` names (checked unchanged)."""
    from keras_vqpix.run_folder import RunFolderError, load_splits, read_json

    recorded = read_json(paths.split).get("data") if paths.split.is_file() else None
    if not recorded or not Path(recorded).is_dir():
        raise RunFolderError(
            f"the data {paths.root} was trained on ({recorded or 'not recorded'}) is not at hand: "
            "its training and validation slices are needed beside external data"
        )
    return load_splits(recorded, config, paths)


# -- Classification ------------------------------------------------------------------------------------
def prior_log_odds(labels) -> float:
    """`log(#AD / #NC)` of training labels: the class prior of Bayes' rule."""
    labels = np.asarray(labels)
    ad, nc = int((labels == AD).sum()), int((labels == NC).sum())
    if ad == 0 or nc == 0:
        raise ValueError(
            f"the class prior needs training slices of both classes. Received: {ad} AD, {nc} NC"
        )
    return math.log(ad / nc)


def per_patient(
    patients: Sequence[str], labels, slice_log_ratios
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`(patient ids, their labels, summed log-likelihood ratios)`, patients in sorted order."""
    patients = np.asarray(patients)
    labels = np.asarray(labels)
    ratios = np.asarray(slice_log_ratios, np.float64)
    ids = sorted(set(patients.tolist()))
    patient_labels, totals = [], []
    for patient in ids:
        rows = patients == patient
        patient_labels.append(int(labels[rows][0]))
        totals.append(float(ratios[rows].sum()))
    return ids, np.asarray(patient_labels, np.int32), np.asarray(totals)


def _sigmoid(log_odds):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(log_odds, np.float64), -700, 700)))


def classification_scores(
    labels, patients: Sequence[str], slice_log_ratios, slice_prior: float, patient_prior: float
) -> tuple[dict, dict]:
    """Figures and per-item tables of a classifier given its per-slice log-likelihood ratios.

    Per slice, `P(AD) = sigmoid(ratio + slice_prior)`; per patient, `sigmoid(sum of its ratios
    + patient_prior)`; predicted AD when `P(AD) > 0.5`. Returns `(figures, tables)`: figures
    `slice_auc`, `slice_balanced_accuracy`, `patient_auc`, `patient_balanced_accuracy`; tables
    `slice_p_ad`, `patients`, `patient_labels`, `patient_log_ratios`, `patient_p_ad` and the
    ROC curves `slice_roc`, `patient_roc` (`(fpr, tpr)`).
    """
    labels = np.asarray(labels, np.int32)
    ratios = np.asarray(slice_log_ratios, np.float64)
    slice_p = _sigmoid(ratios + slice_prior)
    ids, patient_labels, patient_ratios = per_patient(patients, labels, ratios)
    patient_p = _sigmoid(patient_ratios + patient_prior)
    figures = {
        "slice_auc": roc_auc(labels == AD, ratios),
        "slice_balanced_accuracy": balanced_accuracy(labels == AD, slice_p > 0.5),
        "patient_auc": roc_auc(patient_labels == AD, patient_ratios),
        "patient_balanced_accuracy": balanced_accuracy(patient_labels == AD, patient_p > 0.5),
    }
    tables = {
        "slice_p_ad": slice_p,
        "patients": ids,
        "patient_labels": patient_labels,
        "patient_log_ratios": patient_ratios,
        "patient_p_ad": patient_p,
        "slice_roc": roc_curve(labels == AD, ratios)[:2],
        "patient_roc": roc_curve(patient_labels == AD, patient_ratios)[:2],
    }
    return figures, tables


def balanced_threshold(labels, scores) -> float | None:
    """The score threshold (predict AD when `score > threshold`) with the best balanced
    accuracy on these items: the midpoint of the best gap between sorted scores, the middle
    one when several tie. None when a class is absent."""
    labels = np.asarray(labels) == AD
    scores = np.asarray(scores, np.float64)
    if labels.all() or not labels.any():
        return None
    values = np.unique(scores)
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2, values[-1] + 1.0]
    accuracy = [balanced_accuracy(labels, scores > t) for t in candidates]
    best = np.flatnonzero(np.isclose(accuracy, max(accuracy)))
    return float(candidates[best[len(best) // 2]])


# A second classifier to report beside the prior: called with (splits, evaluated records,
# run config, seed), it returns each evaluated slice's P(AD) (e.g. the small CNN of
# `vqpix compare`, `cnn_slice_probabilities`, trained on `splits.train`).
SlicePredictor = Callable[[DataSplits, Sequence[SliceRecord], object, int], np.ndarray]


def cnn_slice_probabilities(
    splits: DataSplits, records: Sequence[SliceRecord], config, seed: int = 0
) -> np.ndarray:
    """P(AD) of each of `records` by the small CNN of `vqpix compare`, trained on `splits.train`.

    The `SliceClassifier` of `keras_vqpix.compare.train_slice_classifier` with the budget of
    a default `CompareConfig` (its epochs, batch size, learning rate, widths; classes weighted
    equally) at the run's image size, trained from scratch with `seed` on the same training
    slices as the prior: the discriminative reference a reader weighs the prior against. A
    `SlicePredictor` for `classify_run(baseline=...)`.
    """
    from keras_vqpix.compare import train_slice_classifier
    from keras_vqpix.config import CompareConfig
    from keras_vqpix.data.pipeline import load_images

    size = config.data.image_size
    compare_config = CompareConfig(image_size=size)
    train_labels = np.asarray([r.label for r in splits.train], np.int32)
    model = train_slice_classifier(
        load_images(splits.train, size), train_labels, compare_config, seed
    )
    images = load_images(records, size)
    logits = np.concatenate(
        [np.asarray(model(images[i : i + 64], training=False)) for i in range(0, len(images), 64)]
    )
    return _sigmoid(logits)


def classify_run(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    split: str = "test",
    baseline: SlicePredictor | None = None,
    baseline_name: str = "cnn",
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """The run's conditional prior as an AD/NC classifier on `split` of `data_root`.

    Returns a JSON-ready dict: `split`, `num_slices`, `num_patients`, `prior_log_odds_slice`
    and `prior_log_odds_patient` (log AD/NC odds of the run's training slices and patients),
    `slice_auc`, `slice_balanced_accuracy`, `patient_auc`, `patient_balanced_accuracy`,
    `mean_log_ratio_AD`, `mean_log_ratio_NC` (nats per slice), `seconds`; for a split other
    than validation also `slice_balanced_accuracy_validation_threshold` and
    `patient_balanced_accuracy_validation_threshold`, at the log-ratio thresholds
    (`*_threshold_validation`) with the best balanced accuracy on the validation split
    (`balanced_threshold`); with `baseline`, the
    same four figures prefixed `<baseline_name>_` (its slice probabilities turned into log
    likelihood ratios by removing the training prior, then summed per patient alike);
    `slices` and `patients`: one row each (file, label, log ratio, P(AD)); `roc`: the curves.
    """
    from keras_vqpix.codes import encode_records
    from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae

    started = time.time()
    paths = RunPaths(Path(run_dir))
    vqvae, config, vqvae_meta = load_vqvae(paths.root)
    prior, prior_meta = load_prior(paths.root, vqvae_meta)
    if not prior.conditional:
        raise ValueError(
            f"{paths.root}: its prior is unconditional (trained without labels), so it cannot classify"
        )
    splits, chosen = evaluation_split(paths.root, data_root, split)
    records = chosen.records
    train_labels = np.asarray([r.label for r in splits.train])
    train_patient_labels = np.asarray(
        [r.label for r in {r.patient: r for r in splits.train}.values()]
    )
    slice_prior, patient_prior = prior_log_odds(train_labels), prior_log_odds(train_patient_labels)
    codes, labels = encode_records(vqvae, records, config)
    ratios = log_likelihood_ratios(prior, codes, batch_size, slice_positions(prior, records))
    patients = [r.patient for r in records]
    figures, tables = classification_scores(labels, patients, ratios, slice_prior, patient_prior)
    result = {
        "split": chosen.split,
        "external": chosen.external,
        "data": str(Path(data_root).resolve()),
        "num_slices": len(records),
        "num_patients": len(tables["patients"]),
        "prior_log_odds_slice": slice_prior,
        "prior_log_odds_patient": patient_prior,
        **figures,
        "mean_log_ratio_AD": float(ratios[labels == AD].mean()) if (labels == AD).any() else None,
        "mean_log_ratio_NC": float(ratios[labels == NC].mean()) if (labels == NC).any() else None,
        "prior_epoch": prior_meta.get("epoch"),
        "prior_fingerprint": prior_meta.get("fingerprint"),
    }
    if chosen.split != "validation":
        # Summing slices as if independent makes patients' P(AD) overconfident and shifts
        # them by any bias of the ratio; a threshold chosen on the validation patients shows
        # what the ranking is worth as a decision (reported beside, never instead).
        val_codes, val_labels = encode_records(vqvae, splits.validation, config)
        val_ratios = log_likelihood_ratios(
            prior, val_codes, batch_size, slice_positions(prior, splits.validation)
        )
        val_patients = [r.patient for r in splits.validation]
        _, val_patient_labels, val_patient_ratios = per_patient(
            val_patients, val_labels, val_ratios
        )
        for level, (fit_labels, fit_scores, test_labels, test_scores) in {
            "slice": (val_labels, val_ratios, labels, ratios),
            "patient": (
                val_patient_labels,
                val_patient_ratios,
                tables["patient_labels"],
                tables["patient_log_ratios"],
            ),
        }.items():
            threshold = balanced_threshold(fit_labels, fit_scores)
            result[f"{level}_threshold_validation"] = threshold
            result[f"{level}_balanced_accuracy_validation_threshold"] = (
                None
                if threshold is None
                else balanced_accuracy(np.asarray(test_labels) == AD, test_scores > threshold)
            )
    roc = {"prior": {"slice": tables["slice_roc"], "patient": tables["patient_roc"]}}
    baseline_p = None
    if baseline is not None:
        baseline_p = np.clip(
            np.asarray(baseline(splits, records, config, seed), np.float64), 1e-7, 1 - 1e-7
        )
        baseline_ratios = np.log(baseline_p) - np.log1p(-baseline_p) - slice_prior
        baseline_figures, baseline_tables = classification_scores(
            labels, patients, baseline_ratios, slice_prior, patient_prior
        )
        result.update({f"{baseline_name}_{k}": v for k, v in baseline_figures.items()})
        roc[baseline_name] = {
            "slice": baseline_tables["slice_roc"],
            "patient": baseline_tables["patient_roc"],
        }
    result["slices"] = [
        {
            "file": record.path,
            "patient": record.patient,
            "label": CLASS_NAMES[record.label],
            "log_likelihood_ratio": float(ratio),
            "p_ad": float(p),
            **({f"{baseline_name}_p_ad": float(baseline_p[i])} if baseline_p is not None else {}),
        }
        for i, (record, ratio, p) in enumerate(
            zip(records, ratios, tables["slice_p_ad"], strict=True)
        )
    ]
    result["patients"] = [
        {
            "patient": patient,
            "label": CLASS_NAMES[int(label)],
            "log_likelihood_ratio": float(ratio),
            "p_ad": float(p),
        }
        for patient, label, ratio, p in zip(
            tables["patients"],
            tables["patient_labels"],
            tables["patient_log_ratios"],
            tables["patient_p_ad"],
            strict=True,
        )
    ]
    result["roc"] = {
        name: {
            level: {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
            for level, (fpr, tpr) in curves.items()
        }
        for name, curves in roc.items()
    }
    result["seconds"] = time.time() - started
    return result


_CLASSIFIER_NAMES = {"prior": "conditional prior (LLR)", "cnn": "small CNN (vqpix compare)"}


def plot_classification(result: dict, path: str | os.PathLike) -> Path:
    """ROC curves per slice and per patient of every classifier in a `classify_run` result."""
    from keras_vqpix import plots

    panels = []
    for level in ("slice", "patient"):
        curves = []
        for name, by_level in result["roc"].items():
            prefix = "" if name == "prior" else f"{name}_"
            auc = result.get(f"{prefix}{level}_auc")
            label = (
                f"{_CLASSIFIER_NAMES.get(name, name)} AUC {auc:.3f}" if auc is not None else name
            )
            curves.append(
                (label, np.asarray(by_level[level]["fpr"]), np.asarray(by_level[level]["tpr"]))
            )
        count = result["num_slices"] if level == "slice" else result["num_patients"]
        panels.append((f"per {level} ({count}), AD positive", curves))
    return plots.plot_roc_panels(panels, [], Path(path), f"AD vs NC on the {result['split']} split")


def format_classification(result: dict) -> str:
    """A small table of a `classify_run` result."""

    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    names = [("prior", "")] + [
        (key[: -len("_slice_auc")], key[: -len("slice_auc")])
        for key in result
        if key.endswith("_slice_auc")
    ]
    lines = [
        (
            f"external data {result['data']} ({'every slice' if result['split'] == 'all' else 'test/'})"
            if result.get("external")
            else f"{result['split']} split"
        )
        + f": {result['num_slices']} slices of {result['num_patients']} patients",
        f"{'classifier':<14}{'slice AUC':>11}{'slice bal.acc':>15}{'patient AUC':>13}{'patient bal.acc':>17}",
    ]
    for name, prefix in names:
        lines.append(
            f"{name:<14}{show(result.get(prefix + 'slice_auc')):>11}"
            f"{show(result.get(prefix + 'slice_balanced_accuracy')):>15}"
            f"{show(result.get(prefix + 'patient_auc')):>13}"
            f"{show(result.get(prefix + 'patient_balanced_accuracy')):>17}"
        )
    if result.get("slice_balanced_accuracy_validation_threshold") is not None:
        lines.append(
            f"{'prior @ val. threshold':<25}"
            f"{show(result.get('slice_balanced_accuracy_validation_threshold')):>15}"
            f"{show(result.get('patient_balanced_accuracy_validation_threshold')):>30}"
        )
    lines.append(
        "prior: log p(codes | AD) - log p(codes | NC) per slice, summed per patient; "
        "P(AD) with the training split's class prior; bal.acc: at P(AD) > 0.5, or at the "
        "log-ratio threshold best on the validation split"
    )
    return "\n".join(lines)


# -- Anomaly detection ---------------------------------------------------------------------------------
@dataclass
class AnomalyMaps:
    """What `detect_anomalies` computes for n slices of `H x W` with `h x w` code maps.

    Attributes:
        images, reconstructions, healed: float32 `[n, H, W]` in [0, 1]: the input, its VQ-VAE
            reconstruction (decoded codes) and the decoded healed codes.
        codes, healed_codes: int32 `[n, h, w]`; they differ only where `redrawn`.
        surprise: float32 `[n, h, w]`, `-log p(code | codes before it, label)` in nats.
        redrawn: bool `[n, h, w]`, `surprise > threshold`.
        threshold: the surprise threshold in nats; label: the prior's label (0 NC, -1 none).
    """

    images: np.ndarray
    reconstructions: np.ndarray
    healed: np.ndarray
    codes: np.ndarray
    healed_codes: np.ndarray
    surprise: np.ndarray
    redrawn: np.ndarray
    threshold: float
    label: int

    @property
    def residual(self) -> np.ndarray:
        """The pixel anomaly map `|image - healed|`, float32 `[n, H, W]`."""
        return np.abs(self.images - self.healed)

    @property
    def baseline_residual(self) -> np.ndarray:
        """The prior-free baseline `|image - reconstruction|`, float32 `[n, H, W]`."""
        return np.abs(self.images - self.reconstructions)

    @property
    def surprise_image(self) -> np.ndarray:
        """`surprise` upsampled to the image (each code's value over its `f x f` pixels)."""
        factor_h = self.images.shape[1] // self.surprise.shape[1]
        factor_w = self.images.shape[2] // self.surprise.shape[2]
        return np.repeat(np.repeat(self.surprise, factor_h, axis=1), factor_w, axis=2)

    @property
    def slice_scores(self) -> np.ndarray:
        """Slice-level anomaly score: the surprise in excess of the threshold, summed over the
        codes (nats; 0 when nothing is redrawn)."""
        return np.maximum(self.surprise - self.threshold, 0.0).sum(axis=(1, 2))


def detect_anomalies(
    vqvae,
    prior,
    images,
    *,
    label: int = NC,
    threshold: float = DEFAULT_SURPRISE_THRESHOLD,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
    positions=None,
) -> AnomalyMaps:
    """Surprise maps, healed images and residuals of `images [n, H, W, 1]` in [0, 1].

    The codes (`vqvae.encode`) are scored under the prior with `label` (0 NC, the healthy
    class, by default; -1 unconditional), those with `surprise > threshold` (nats) are redrawn
    in raster order conditioned on the kept ones (`resample_codes` with `seed`), and both the
    original and the healed codes are decoded with the same batches, so a slice where nothing
    was redrawn has `healed` equal to `reconstructions` bit for bit. `positions`: each slice's
    position bin for a prior with slice positions (`slice_positions`; None: unknown).
    """
    if np.isnan(threshold):
        raise ValueError(f"threshold must be a number of nats. Received: threshold={threshold}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 1 or len(images) == 0:
        raise ValueError(f"images must be [n, H, W, 1] with n >= 1. Received: shape {images.shape}")
    encode = tf.function(vqvae.encode)
    codes = np.concatenate(
        [
            encode(tf.constant(images[i : i + batch_size])).numpy()
            for i in range(0, len(images), batch_size)
        ]
    ).astype(np.int32)
    surprise = -code_log_likelihoods(prior, codes, label, positions=positions)
    redrawn = surprise > threshold
    healed_codes = resample_codes(prior, codes, redrawn, seed, label, temperature, positions)
    return AnomalyMaps(
        images=images[..., 0],
        reconstructions=decode_codes(vqvae, codes, batch_size)[..., 0],
        healed=decode_codes(vqvae, healed_codes, batch_size)[..., 0],
        codes=codes,
        healed_codes=healed_codes,
        surprise=surprise,
        redrawn=redrawn,
        threshold=float(threshold),
        label=int(label),
    )


def calibrate_threshold(
    prior,
    healthy_codes,
    label: int = NC,
    quantile: float = DEFAULT_HEALTHY_QUANTILE,
    positions=None,
) -> float:
    """The surprise (nats) that the share `quantile` of the codes of healthy maps stays below
    (`positions`: as `code_log_likelihoods`)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1). Received: quantile={quantile}")
    surprise = -code_log_likelihoods(prior, healthy_codes, label, positions=positions)
    return float(np.quantile(surprise, quantile))


def _healthy_reference(paths, splits: DataSplits | None):
    """NC slices of the run's validation split: of `splits` (the run's own, as
    `evaluation_split` gave them), else of the data the run recorded in `split.json`; None when
    that data is not at hand either."""
    from keras_vqpix.run_folder import RunFolderError, read_config

    if splits is None:
        try:
            splits = recorded_splits(paths, read_config(paths))
        except RunFolderError:
            return None
    healthy = [r for r in splits.validation if r.label == NC]
    return healthy or None


def resize_masks(masks: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """Lesion masks of the original slices -> bool `[n, S, S]` as the pipeline resizes slices
    (aspect ratio kept, padded; `keras_vqpix.data.pipeline.resize_with_pad`), cut at 0.5."""
    from keras_vqpix.data.pipeline import resize_with_pad

    return np.stack(
        [
            resize_with_pad(
                tf.constant(np.asarray(mask, np.float32)[..., None]), image_size
            ).numpy()[..., 0]
            >= 0.5
            for mask in masks
        ]
    )


def lesion_scores(maps: AnomalyMaps, masks: np.ndarray) -> dict:
    """Detection figures of the anomaly maps against lesion masks `bool [n, H, W]`.

    Pixel level, over the pixels inside each slice's head mask (`keras_vqpix.metrics.head_mask`
    of the input: the background would make every map look good): `pixel_auroc`,
    `pixel_auprc` (average precision) and `pixel_best_dice` (the best Dice over global
    thresholds) of three maps: `residual` (|image - healed|, the prior's), `surprise` (the
    code surprise upsampled) and `baseline` (|image - reconstruction|, no prior). Slice level,
    lesion vs none: `slice_auroc` of `slice_scores` (excess surprise), of the mean `residual`
    and of the mean `baseline` over the head. Keys `<level>_<figure>_<map>`.
    """
    masks = np.asarray(masks, bool)
    heads = head_mask(maps.images[..., None]).numpy()
    lesioned = masks.any(axis=(1, 2))
    pixel_maps = {
        "residual": maps.residual,
        "surprise": maps.surprise_image,
        "baseline": maps.baseline_residual,
    }
    out = {
        "num_slices": int(len(masks)),
        "slices_with_lesions": int(lesioned.sum()),
        "lesion_pixel_fraction": float(masks[heads].mean()),
    }
    truth = masks[heads]
    for name, values in pixel_maps.items():
        scores = values[heads]
        out[f"pixel_auroc_{name}"] = roc_auc(truth, scores)
        out[f"pixel_auprc_{name}"] = average_precision(truth, scores)
        out[f"pixel_best_dice_{name}"] = best_dice(truth, scores)[0]
    area = np.maximum(heads.sum(axis=(1, 2)), 1)
    slice_scores = {
        "excess_surprise": maps.slice_scores,
        "residual": (maps.residual * heads).sum(axis=(1, 2)) / area,
        "baseline": (maps.baseline_residual * heads).sum(axis=(1, 2)) / area,
    }
    for name, scores in slice_scores.items():
        out[f"slice_auroc_{name}"] = roc_auc(lesioned, scores)
    return out


def anomaly_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    image_paths: Sequence[str | os.PathLike] = (),
    split: str = "test",
    label: str | int = "NC",
    threshold: float | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    log=print,
) -> dict:
    """Anomaly maps of the slices of `split` of `data_root`, or of `image_paths`, into `out_dir`.

    Writes (into a temporary folder renamed to `out_dir` at the end; a non-empty `out_dir` is
    refused) per slice `<stem>_overlay.png` (input | healed | residual | code surprise, the
    maps in colour over the input), `<stem>_healed.png`, `<stem>_residual.npy` (float32 `[S,
    S]`, the pixel anomaly map) and `<stem>_surprise.npy` (float32 `[S, S]`, nats, each code's
    surprise over its pixels); `scores.csv` (one row per slice: file, patient, label,
    `slice_score`, redrawn codes, mean residual and baseline over the head, lesion pixels);
    `anomaly.json` (the options, the models, and when every slice has a lesion mask beside it
    (`<slice>.mask.npy`) the `lesion_scores` figures); and `examples.png`.

    Args:
        label: "NC" / 0 (the healthy prior, default) or -1 (unconditional); an unconditional
            prior takes -1 only.
        threshold: surprise threshold in nats; default: calibrated (`calibrate_threshold`)
            to redraw 1% of the codes of the NC validation slices of the run's data
            (`data_root`, else the folder `split.json` records), or, without that data,
            `DEFAULT_SURPRISE_THRESHOLD` (probability below 0.005).
    """
    from keras_vqpix import plots
    from keras_vqpix.data.lesions import load_mask
    from keras_vqpix.data.pipeline import load_image, load_images
    from keras_vqpix.io import atomic_directory, check_output_folder
    from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae
    from keras_vqpix.sampling import check_seed, check_temperature

    started = time.time()
    seed, temperature = check_seed(seed), check_temperature(temperature)
    if threshold is not None and not float(threshold) >= 0:
        raise ValueError(f"--threshold must be >= 0 nats. Received: threshold={threshold}")
    if (data_root is None) == (not image_paths):
        raise ValueError("give either --data DIR or IMAGE files, not both and not neither")
    label_value = _anomaly_label(label)
    out_dir = check_output_folder(out_dir)
    paths = RunPaths(Path(run_dir))
    vqvae, config, vqvae_meta = load_vqvae(paths.root)
    prior, prior_meta = load_prior(paths.root, vqvae_meta)
    if label_value != UNCONDITIONAL and not prior.conditional:
        raise ValueError(
            f"--label: the prior of {paths.root} is unconditional (trained without labels); use --label -1"
        )
    size = config.data.image_size
    splits = None  # the run's own splits, when --data gives them
    positions = None  # loose images have no place in a stack: unknown
    if data_root is not None:
        splits, chosen = evaluation_split(paths.root, data_root, split)
        records = chosen.records
        positions = slice_positions(prior, records)
        images = load_images(records, size)
        files = [r.path for r in records]
        patients = [r.patient for r in records]
        labels = [CLASS_NAMES[r.label] for r in records]
    else:
        files = [str(p) for p in image_paths]
        for file in files:
            if not Path(file).is_file():
                raise FileNotFoundError(f"IMAGE {file} does not exist")
        images = np.stack([_read_image(load_image, file, size) for file in files])
        patients = [Path(f).stem for f in files]
        labels = [""] * len(files)
    if threshold is not None:
        threshold, source = float(threshold), "given"
    else:
        healthy = _healthy_reference(paths, splits)
        if healthy is None:
            threshold, source = DEFAULT_SURPRISE_THRESHOLD, "p < 0.005 (no healthy reference)"
            log("The run's data is not at hand: redrawing codes with p < 0.005")
        else:
            from keras_vqpix.codes import encode_records

            healthy_codes, _ = encode_records(vqvae, healthy, config)
            threshold = calibrate_threshold(
                prior,
                healthy_codes,
                label_value,
                positions=slice_positions(prior, healthy),
            )
            source = (
                f"{100 * DEFAULT_HEALTHY_QUANTILE:g}th percentile of the surprise of the codes of "
                f"{len(healthy)} NC validation slices"
            )
    log(
        f"Scoring {len(files)} slices under the {'NC' if label_value == NC else 'unconditional'} "
        f"prior; threshold {threshold:.2f} nats ({source})"
    )
    maps = detect_anomalies(
        vqvae,
        prior,
        images,
        label=label_value,
        threshold=threshold,
        seed=seed,
        temperature=temperature,
        positions=positions,
    )
    raw_masks = [load_mask(f) for f in files]
    masks = (
        resize_masks(raw_masks, size)
        if raw_masks and all(m is not None for m in raw_masks)
        else None
    )
    record = {
        "run": str(paths.root.resolve()),
        "data": None if data_root is None else str(Path(data_root).resolve()),
        "split": chosen.split if data_root is not None else None,
        "external": chosen.external if data_root is not None else None,
        "num_slices": len(files),
        "label": "NC" if label_value == NC else "unconditional",
        "threshold_nats": threshold,
        "threshold_source": source,
        "seed": seed,
        "temperature": temperature,
        "redrawn_code_fraction": float(maps.redrawn.mean()),
        "prior_epoch": prior_meta.get("epoch"),
        "prior_fingerprint": prior_meta.get("fingerprint"),
        "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
    }
    if masks is not None:
        record["lesions"] = lesion_scores(maps, masks)
    heads = head_mask(maps.images[..., None]).numpy()
    area = np.maximum(heads.sum(axis=(1, 2)), 1)
    stems = _unique_stems(files)
    with atomic_directory(out_dir, overwrite=out_dir.exists()) as tmp:
        rows = []
        for i, stem in enumerate(stems):
            plots.save_anomaly_overlay(
                tmp / f"{stem}_overlay.png",
                maps.images[i],
                maps.healed[i],
                maps.residual[i],
                maps.surprise_image[i],
                None if masks is None else masks[i],
            )
            plots.save_grayscale(tmp / f"{stem}_healed.png", maps.healed[i])
            np.save(tmp / f"{stem}_residual.npy", maps.residual[i].astype(np.float32))
            np.save(tmp / f"{stem}_surprise.npy", maps.surprise_image[i].astype(np.float32))
            rows.append(
                {
                    "file": files[i],
                    "patient": patients[i],
                    "label": labels[i],
                    "slice_score": float(maps.slice_scores[i]),
                    "redrawn_codes": int(maps.redrawn[i].sum()),
                    "mean_residual": float((maps.residual[i] * heads[i]).sum() / area[i]),
                    "mean_baseline_residual": float(
                        (maps.baseline_residual[i] * heads[i]).sum() / area[i]
                    ),
                    "lesion_pixels": "" if masks is None else int(masks[i].sum()),
                }
            )
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "scores.csv").write_text(buffer.getvalue())
        plots.plot_anomaly_examples(
            tmp / "examples.png",
            _example_rows(maps, masks),
            f"Anomaly maps ({record['label']} prior, codes with p < {math.exp(-threshold):.3g} redrawn: "
            f"{100 * record['redrawn_code_fraction']:.1f}%)",
        )
        record["seconds"] = time.time() - started
        (tmp / "anomaly.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def format_anomaly(record: dict) -> str:
    """The run's summary lines: codes redrawn, and the lesion figures when there are masks."""
    lines = [
        f"{100 * record['redrawn_code_fraction']:.2f}% of the codes redrawn "
        f"(threshold {record['threshold_nats']:.2f} nats, {record['label']} prior)"
    ]
    lesions = record.get("lesions")
    if lesions:

        def show(value):
            return "n/a" if value is None else f"{value:.3f}"

        lines.append(
            f"lesions in {lesions['slices_with_lesions']} of {lesions['num_slices']} slices "
            f"({100 * lesions['lesion_pixel_fraction']:.2f}% of the head's pixels)"
        )
        lines.append(f"  {'pixel map':<36}{'AUROC':>12}{'AUPRC':>8}{'best Dice':>11}")
        for name, title in (
            ("residual", "|image - healed| (prior)"),
            ("surprise", "code surprise (prior)"),
            ("baseline", "|image - reconstruction| (no prior)"),
        ):
            lines.append(
                f"  {title:<36}{show(lesions[f'pixel_auroc_{name}']):>12}"
                f"{show(lesions[f'pixel_auprc_{name}']):>8}{show(lesions[f'pixel_best_dice_{name}']):>11}"
            )
        lines.append(
            "slice AUROC: excess surprise "
            f"{show(lesions['slice_auroc_excess_surprise'])}, mean |image - healed| "
            f"{show(lesions['slice_auroc_residual'])}, mean |image - reconstruction| "
            f"{show(lesions['slice_auroc_baseline'])}"
        )
    return "\n".join(lines)


def _anomaly_label(label) -> int:
    value = str(label).strip().upper()
    if value in ("NC", str(NC)):
        return NC
    if value in ("-1", "UNCONDITIONAL"):
        return UNCONDITIONAL
    raise ValueError(
        f"--label must be NC (the healthy prior) or -1 (unconditional). Received: label={label!r}"
    )


def _read_image(load_image, file: str, size: int) -> np.ndarray:
    try:
        return load_image(file, size).numpy()
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"IMAGE {file} is not a readable JPEG/PNG/BMP/GIF image") from error


def _unique_stems(files: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for file in files:
        stem = Path(file).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _example_rows(maps: AnomalyMaps, masks: np.ndarray | None, count: int = 4) -> list[tuple]:
    """Up to `count` slices for the examples figure: with masks, those with the largest lesions;
    else the highest slice scores."""
    if masks is not None and masks.any():
        order = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")[:count]
    else:
        order = np.argsort(-maps.slice_scores, kind="stable")[:count]
    return [
        (
            maps.images[i],
            None if masks is None else masks[i],
            maps.reconstructions[i],
            maps.healed[i],
            maps.baseline_residual[i],
            maps.residual[i],
            maps.surprise_image[i],
        )
        for i in order
    ]
