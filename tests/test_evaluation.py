"""Evaluation extras on small cases with known answers: bootstrap CIs, embedding scorers, calibration, TTA, figures."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import predict
from scoring.metrics import (auroc, bootstrap_ci, bootstrap_weights, expected_calibration_error, partial_auc,
                             prior_corrected_logits, roc_areas, sigmoid)
from engine.augment import DihedralTTA
from modules import SiameseNet
from scoring.retrieval import knn_scores, prototype_scores



def scored(n, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, rng.normal(size=n) + 1.2 * y


# ---------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("seed", range(3))
def test_weighted_areas_equal_sklearn_on_the_resampled_rows(seed):
    rng = np.random.default_rng(seed)
    y, p = scored(200, seed)
    p = np.round(p, 1)  # ties
    counts = rng.integers(0, 3, size=(4, 200))
    for c in counts:
        rows = np.repeat(np.arange(200), c)
        assert roc_areas(y, p, c)[0] == pytest.approx(auroc(y[rows], p[rows]), abs=1e-12)
        assert roc_areas(1 - y, -p, c, max_fpr=0.2)[0] == pytest.approx(partial_auc(y[rows], p[rows]), abs=1e-12)


def test_bootstrap_keeps_classes_and_patients_together():
    y = np.array([1, 0, 0, 0, 0, 0, 1, 0])
    patients = np.array(["a", "a", "b", "b", "c", "c", None, None])  # no id: each image is its own unit
    w = bootstrap_weights(y, patients, 500, np.random.default_rng(0))
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all()  # a patient's images travel together
    assert (w @ y > 0).all() and (w @ (1 - y) > 0).all()                # both classes in every resample
    assert (w[:, [0, 6]].sum(1) == 2).all()  # stratified: the two malignant units are always drawn twice in all


def test_bootstrap_ci_leaves_out_resamples_that_lost_a_class(recwarn):
    """Every benign image belongs to a patient who also has a melanoma: a resample that draws only the patients with
    melanomas alone has no benign image and no ROC curve. The interval comes from the other resamples."""
    y = np.array([1, 0, 1, 1, 1])
    p = np.array([0.9, 0.2, 0.8, 0.4, 0.6])
    patients = np.array(["a", "a", "b", "c", "d"])
    w = bootstrap_weights(y, patients, 200, np.random.default_rng(0))
    assert ((w @ (1 - y)) == 0).any()  # some resamples lost the benign class
    ci = bootstrap_ci(y, {"s": p}, patients, resamples=200)["s"]
    assert all(np.isfinite(ci["auroc"])) and ci["auroc"][0] <= auroc(y, p) <= ci["auroc"][1], ci
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (100, 2000):
        y, p = scored(n)
        ci = bootstrap_ci(y, {"s": p}, resamples=400, seed=1)["s"]
        assert ci["auroc"][0] < auroc(y, p) < ci["auroc"][1]
        assert ci["pauc"][0] < partial_auc(y, p) < ci["pauc"][1]
        widths.append(ci["auroc"][1] - ci["auroc"][0])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 20x the data, about 4.5x narrower
    assert bootstrap_ci(y, {"s": p}, resamples=50, seed=3) == bootstrap_ci(y, {"s": p}, resamples=50, seed=3)


# ---------------------------------------------------------------- embedding scorers

def separated_embeddings(rng, n):
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    return y, rng.normal(size=(2 * n, 4)) * 0.1 + y[:, None] * np.array([3.0, 0, 0, 0])


def test_knn_and_prototype_give_auroc_1_on_separated_embeddings():
    rng = np.random.default_rng(0)
    train_y, train = separated_embeddings(rng, 30)
    y, query = separated_embeddings(rng, 10)
    for k, scores in knn_scores(train, train_y, query, [1, 5, 15, 29]).items():
        assert auroc(y, scores) == 1.0 and partial_auc(y, scores) == pytest.approx(0.2), k
    assert list(knn_scores(train, train_y, query, [1000])) == [60]  # k is capped at the training set size
    assert auroc(y, prototype_scores(train, train_y, query)) == 1.0


def test_knn_score_is_the_malignant_fraction_of_neighbours():
    train = np.array([[0.0], [1.0], [2.0], [10.0]])
    scores = knn_scores(train, np.array([0, 1, 1, 0]), np.array([[0.9]]), [1, 3])
    assert scores[1][0] == 1.0 and scores[3][0] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- calibration

def test_prior_correction_matches_hand_computation():
    # logit 0 (p = 0.5 under the 50/50 training prior) at 2% prevalence: odds 0.02/0.98 → p = 0.02
    assert sigmoid(prior_corrected_logits([0.0], 0.02))[0] == pytest.approx(0.02)
    # logit 2: posterior odds e^2 * (0.1/0.9) → p = e^2/9 / (1 + e^2/9)
    odds = np.exp(2) / 9
    assert sigmoid(prior_corrected_logits([2.0], 0.1))[0] == pytest.approx(odds / (1 + odds))
    y, p = scored(300)
    shifted = prior_corrected_logits(p, 0.018)
    assert auroc(y, shifted) == auroc(y, p) and partial_auc(y, shifted) == partial_auc(y, p)


def test_ece_perfect_and_known_miscalibration():
    # bins of 0.2 (1 in 5 malignant) and 0.9 (9 in 10): calibrated
    assert expected_calibration_error(np.r_[1, 0, 0, 0, 0, [1] * 9, 0], np.r_[[0.2] * 5, [0.9] * 10]) == pytest.approx(0, abs=1e-12)
    # half the images at 0.3 with rate 0.5 (gap 0.2), half at 0.9 with rate 1 (gap 0.1): 0.5*0.2 + 0.5*0.1
    assert expected_calibration_error([1, 1, 0, 0, 1, 1, 1, 1], [0.3] * 4 + [0.9] * 4) == pytest.approx(0.15)
    assert expected_calibration_error([0, 1], [1.0, 1.0]) == pytest.approx(0.5)  # p = 1 falls in the last bin


# ---------------------------------------------------------------- test-time augmentation

def test_tta_of_a_flip_and_rotation_invariant_image_equals_the_plain_prediction():
    torch.manual_seed(0)
    model = SiameseNet("resnet18", embedding_dim=8).eval()
    x = torch.rand(2, 3, 32, 32)
    x = sum(torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)) / 8  # dihedral-invariant
    with torch.no_grad():
        plain, tta = model(x), DihedralTTA(model)(x)
        assert torch.allclose(plain[0], tta[0], atol=1e-5) and torch.allclose(plain[1], tta[1], atol=1e-5)
        y = torch.rand(2, 3, 32, 32)  # a generic image: TTA is the mean over the 8 views
        views = [model(torch.rot90(v, k, dims=(2, 3)))[1] for v in (y, y.flip(3)) for k in range(4)]
        assert torch.allclose(DihedralTTA(model)(y)[1], torch.stack(views).mean(0), atol=1e-5)


# ---------------------------------------------------------------- a tiny run writes every new output

@pytest.mark.slow
def test_tiny_run_writes_calibration_pr_gallery_and_tta(finished_run, run_copy, capsys):
    result, out = finished_run[1], run_copy
    assert "kNN (k=" in result.stdout and "prototype" in result.stdout and "head, TTA" in result.stdout
    for name in ("calibration.png", "pr.png", "gallery.png", "roc.png"):
        assert (out / "test" / name).stat().st_size > 1000, name
    written = (out / "test" / "metrics.json").read_text()
    assert predict.main(["--run", str(out), "--workers", "0"]) == 0  # in-process: faster; TTA from the run's config
    assert "head, TTA" in capsys.readouterr().out
    assert (out / "test" / "metrics.json").read_text() == written
    m = json.loads((out / "test" / "metrics.json").read_text())
    for view in (m, m["tta"]):
        assert set(view["scorers"]) == {"head", "knn", "prototype"}
        for r in view["scorers"].values():
            assert r["auroc_ci95"][0] - 1e-9 <= r["auroc"] <= r["auroc_ci95"][1] + 1e-9
            assert r["pauc_ci95"][0] - 1e-9 <= r["pauc"] <= r["pauc_ci95"][1] + 1e-9  # a tied scorer: all 0.02
    assert m["scorers"]["knn"]["k"] == json.loads((out / "val" / "metrics.json").read_text())["scorers"]["knn"]["k"]
    assert m["bootstrap"]["resamples"] == 1000 and m["bootstrap"]["unit"] == "patient"
    p = pd.read_csv(out / "test" / "predictions.csv")
    y, prob = p["target"].to_numpy(), p["probability"].to_numpy()
    assert m["calibration"]["brier"] == pytest.approx(np.mean((prob - y) ** 2), abs=1e-9)
    bins = [(prob >= lo) & ((prob < lo + 0.1) if lo < 0.85 else (prob <= 1)) for lo in np.arange(10) / 10]
    ece = sum(b.sum() / len(y) * abs(y[b].mean() - prob[b].mean()) for b in bins if b.any())
    assert m["calibration"]["ece"] == pytest.approx(ece, abs=1e-9)
    prevalence = m["calibration"]["train_prevalence"]
    logit = np.log(p["probability"] / (1 - p["probability"]))
    expected = sigmoid(logit + np.log(prevalence / (1 - prevalence)))
    assert np.allclose(p["probability_prior_corrected"], expected, atol=1e-6)
    assert {"knn_score", "prototype_score", "probability_tta", "probability_prior_corrected_tta"} <= set(p.columns)
