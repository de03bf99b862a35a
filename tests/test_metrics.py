import numpy as np
import pytest

from scoring.metrics import all_metrics, auroc, partial_auc, threshold_metrics, youden_threshold


def pauc_by_cutting_the_curve(y, p, min_tpr=0.8):
    """Independent definition: area under the flipped ROC curve up to FPR 1 - min_tpr, interpolating the cut."""
    y, p = 1 - np.asarray(y), -np.asarray(p, float)
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    tpr = np.r_[0, np.cumsum(y)[distinct] / y.sum()]
    fpr = np.r_[0, np.cumsum(1 - y)[distinct] / (1 - y).sum()]
    limit = 1 - min_tpr
    cut = np.searchsorted(fpr, limit, side="right")
    x = np.r_[fpr[:cut], limit]
    t = np.r_[tpr[:cut], np.interp(limit, fpr, tpr)]
    return float(np.sum(np.diff(x) * (t[1:] + t[:-1]) / 2))


def test_pauc_perfect_and_inverted_scores():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert partial_auc(y, p) == pytest.approx(0.2)
    assert partial_auc(y, 1 - p) == pytest.approx(0.0)


def test_pauc_small_case_worked_by_hand():
    # Flipped problem: scores -p, "positives" are the benign images. Sorted: -0.1 (B), -0.35 (M), -0.4 (B), -0.8 (M).
    # The flipped ROC climbs to TPR 0.5 at FPR 0 and stays there until FPR 0.5: area up to FPR 0.2 = 0.5 * 0.2 = 0.1.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert partial_auc(y, p) == pytest.approx(0.1)
    assert auroc(y, p) == pytest.approx(0.75)


def test_pauc_random_scores_near_002():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    assert partial_auc(y, rng.random(20000)) == pytest.approx(0.02, abs=0.003)


@pytest.mark.parametrize("seed", range(5))
def test_pauc_matches_curve_cutting_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + y * 0.3, 2)  # informative, with ties
    assert partial_auc(y, p) == pytest.approx(pauc_by_cutting_the_curve(y, p), abs=1e-9)


def test_single_class_gives_nan_not_crash():
    assert np.isnan(partial_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert np.isnan(auroc([0, 0], [0.1, 0.5]))


def test_threshold_metrics_known_confusion_matrix():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.65, 0.9])
    m = threshold_metrics(y, p, 0.5)
    assert m["confusion_matrix"] == [[2, 2], [0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    assert m["precision"] == 0.5 and m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == 0.75


def test_accuracy_is_not_fooled_by_column_vectors():
    # The broadcasting trap: (N, 1) predictions against (N,) labels must not average an N x N matrix.
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([[0.2], [0.9], [0.4], [0.1], [0.8]])
    assert threshold_metrics(y, p, 0.5)["accuracy"] == pytest.approx(0.8)


def test_youden_threshold_separates_separable_scores():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.01, 0.02, 0.03, 0.05, 0.07])  # a 0.5 threshold would call everything benign
    t = youden_threshold(y, p)
    assert 0.03 < t <= 0.05
    m = all_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0 and m["n"] == 5 and m["n_positive"] == 2
