"""Ranking and threshold metrics, defined exactly as the ISIC/Kaggle scoring does."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def auroc(y, p) -> float:
    y = np.asarray(y)
    return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def partial_auc(y, p, min_tpr: float = 0.8) -> float:
    """Kaggle/ISIC 2024 partial AUC above `min_tpr` (0.8): in [0, 0.2]; random ~0.02, perfect 0.2.

    Flip the problem (negatives become positives, scores negated) so that the TPR band [min_tpr, 1] becomes the
    FPR band [0, 1 - min_tpr]; scikit-learn's max_fpr gives the McClish-standardised area, which is undone here.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if len(np.unique(y)) != 2:
        return float("nan")
    m = 1.0 - min_tpr
    standardised = skm.roc_auc_score(1 - y, -p, max_fpr=m)
    return float(0.5 * m**2 + (m - 0.5 * m**2) / 0.5 * (standardised - 0.5))


def youden_threshold(y, p) -> float:
    """Probability threshold that maximises sensitivity + specificity - 1 (Youden's J)."""
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf


def threshold_metrics(y, p, threshold: float) -> dict:
    """Everything that depends on the decision threshold; predictions are `p >= threshold`."""
    y = np.asarray(y).astype(int).ravel()
    pred = (np.asarray(p).ravel() >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(y)),
        "balanced_accuracy": 0.5 * (ratio(tp, tp + fn) + ratio(tn, tn + fp)),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def all_metrics(y, p, threshold: float) -> dict:
    y = np.asarray(y).astype(int)
    return {
        "auroc": auroc(y, p),
        "pauc": partial_auc(y, p),
        **threshold_metrics(y, p, threshold),
        "n": int(len(y)),
        "n_positive": int(y.sum()),
    }


def classification_report(y, p, threshold: float) -> str:
    pred = (np.asarray(p) >= threshold).astype(int)
    report = skm.classification_report(y, pred, labels=[0, 1], target_names=["benign", "malignant"],
                                       digits=4, zero_division=0)
    return f"decision threshold {threshold:.4f} (Youden's J on the validation split)\n\n{report}"


# ---------------------------------------------------------------- bootstrap confidence intervals

def roc_areas(y, p, weights, max_fpr: float = 1.0) -> np.ndarray:
    """Area under the ROC curve up to `max_fpr`, once per row of `weights` (how often each image was drawn).

    One sort serves every resample: the curve of a resample is the cumulative sum of its weights in score order.
    Tied scores form one diagonal step, as in roc_curve; the cut at max_fpr interpolates the last segment.
    """
    y, p, weights = np.asarray(y), np.asarray(p, dtype=float), np.atleast_2d(weights)
    order = np.argsort(-p, kind="stable")
    y, w = y[order], weights[:, order]
    last = np.r_[np.flatnonzero(np.diff(p[order])), len(p) - 1]  # last image of each run of tied scores
    tp = np.cumsum(w * y, axis=1)[:, last]
    fp = np.cumsum(w * (1 - y), axis=1)[:, last]
    zero = np.zeros((len(w), 1))
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without one of the classes has no curve: NaN
        tpr, fpr = np.hstack([zero, tp / tp[:, -1:]]), np.hstack([zero, fp / fp[:, -1:]])
    x0, x1 = np.minimum(fpr[:, :-1], max_fpr), np.minimum(fpr[:, 1:], max_fpr)
    dx = np.diff(fpr, axis=1)
    slope = np.diff(tpr, axis=1) / np.where(dx > 0, dx, 1.0)
    t0 = tpr[:, :-1]
    t1 = t0 + slope * (x1 - fpr[:, :-1])  # TPR where the (cut) segment ends; unused when the segment is cut away
    return np.sum((x1 - x0) * (t0 + t1) / 2, axis=1)


def bootstrap_weights(y, groups, resamples: int, rng) -> np.ndarray:
    """(resamples, N) draw counts of a stratified bootstrap. The unit drawn is the patient (images without a
    patient id are their own unit); units with any malignant image and units without are drawn separately, so
    every resample keeps both classes and the number of malignant patients fixed."""
    y = np.asarray(y).astype(int)
    if groups is None:
        units = np.arange(len(y))
    else:
        units, _ = pd.factorize(pd.Series(groups).astype("string"))
        missing = units < 0
        units[missing] = units.max() + 1 + np.arange(missing.sum())
    n_units = units.max() + 1
    malignant = np.bincount(units, weights=y, minlength=n_units) > 0
    counts = np.zeros((resamples, n_units))
    for stratum in (np.flatnonzero(malignant), np.flatnonzero(~malignant)):
        draws = stratum[rng.integers(0, len(stratum), size=(resamples, len(stratum)))]
        flat = draws + n_units * np.arange(resamples)[:, None]
        counts += np.bincount(flat.ravel(), minlength=resamples * n_units).reshape(resamples, n_units)
    return counts[:, units]


MIN_PER_CLASS = 5  # fewer units (patients or images) of a class: a bootstrap interval redraws the same few


def class_units(y, groups=None) -> tuple[int, int]:
    """(malignant, benign) units as bootstrap_weights draws them: patients (images without one, and every image
    when `groups` is None, are units of their own) with a malignant image, and the others."""
    y = np.asarray(y).astype(int)
    groups = [None] * len(y) if groups is None else list(groups)
    units = [("image", i) if pd.isna(g) else ("patient", g) for i, g in enumerate(groups)]
    malignant = {u for u, label in zip(units, y) if label == 1}
    return len(malignant), len(set(units) - malignant)


def size_caveat(y, groups=None) -> str:
    """'' for a set large enough for its AUROC, pAUC and intervals; otherwise one sentence saying what it cannot
    support."""
    unit = "image" if groups is None or pd.Series(groups).isna().all() else "patient"
    for count, kind in zip(class_units(y, groups), ("with a melanoma", "without one")):
        units = f"{count} {unit}{'' if count == 1 else 's'} {kind}"
        if count == 0:
            return f"no {unit} {kind}: no AUROC, pAUC or interval"
        if count < MIN_PER_CLASS:
            return (f"only {units}: AUROC and pAUC rest on so few, and their 95% intervals, which resample the same "
                    f"{count}, understate the uncertainty (at least {MIN_PER_CLASS} of each are needed)")
    return ""


def bootstrap_ci(y, scores: dict, groups=None, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 chunk: int = 100) -> dict:
    """Percentile intervals of AUROC and pAUC for each named score, all from the same resamples (so they pair)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) != 2 or resamples < 1:
        return {name: {"auroc": [float("nan")] * 2, "pauc": [float("nan")] * 2} for name in scores}
    rng = np.random.default_rng(seed)
    values = {name: {"auroc": [], "pauc": []} for name in scores}
    for start in range(0, resamples, chunk):  # chunks bound the memory: (chunk, N) weights at a time
        w = bootstrap_weights(y, groups, min(chunk, resamples - start), rng)
        for name, p in scores.items():
            values[name]["auroc"].append(roc_areas(y, p, w))
            values[name]["pauc"].append(roc_areas(1 - y, -np.asarray(p, dtype=float), w, max_fpr=0.2))
    tail = 100 * (1 - level) / 2

    def interval(areas: np.ndarray) -> list[float]:
        # Resamples left without an image of a class (possible when a patient has both) have no area: left out.
        areas = areas[np.isfinite(areas)]
        return [float(v) for v in np.percentile(areas, [tail, 100 - tail])] if len(areas) else [float("nan")] * 2
    return {name: {metric: interval(np.concatenate(v)) for metric, v in by_metric.items()}
            for name, by_metric in values.items()}


# ---------------------------------------------------------------- calibration

def prior_corrected_logits(logits, prevalence: float, trained_prevalence: float = 0.5) -> np.ndarray:
    """Move logits from the prior the model was trained at (balanced batches: 0.5) to the data's real prevalence.

    Bayes' rule in log-odds: only the prior odds change, so a constant is added and every ranking metric is unchanged.
    """
    odds = lambda q: np.log(q / (1 - q))  # noqa: E731
    return np.asarray(logits, dtype=float) + odds(prevalence) - odds(trained_prevalence)


def sigmoid(x) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


def expected_calibration_error(y, p, bins: int = 10) -> float:
    """Σ_b (n_b / N) |observed malignant rate - mean probability| over `bins` equal-width probability bins."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    gap = np.bincount(which, weights=y, minlength=bins) - np.bincount(which, weights=p, minlength=bins)
    return float(np.abs(gap).sum() / len(y))  # n_b/N * |sum_y/n_b - sum_p/n_b| = |sum_y - sum_p| / N


def calibration_metrics(y, p, p_corrected, prevalence: float) -> dict:
    return {"brier": float(skm.brier_score_loss(y, p)), "ece": expected_calibration_error(y, p),
            "brier_prior_corrected": float(skm.brier_score_loss(y, p_corrected)),
            "ece_prior_corrected": expected_calibration_error(y, p_corrected),
            "train_prevalence": float(prevalence), "ece_bins": 10}
