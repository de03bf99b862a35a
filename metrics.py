"""Ranking and threshold metrics, defined exactly as the ISIC/Kaggle scoring does."""
from __future__ import annotations

import numpy as np
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
