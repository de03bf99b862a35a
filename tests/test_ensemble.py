"""ensemble.py and predict.py with several runs: probabilities combined by mean or rank, reported like one run."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import predict
from conftest import ROOT, tiny
from demo import make_dataset
from ensemble import combine


def test_mean_and_rank_on_hand_computed_scores():
    p = np.array([[0.1, 0.4, 0.9, 0.6], [0.3, 0.2, 0.8, 0.7]])
    mean, threshold = combine(p, np.array([0.5, 0.5]), "mean")
    np.testing.assert_allclose(mean, [0.2, 0.3, 0.85, 0.65])
    assert threshold == 0.5
    ranks, threshold = combine(p, np.array([0.5, 0.5]), "rank")
    np.testing.assert_allclose(ranks, [(1 + 2) / 8, (2 + 1) / 8, (4 + 4) / 8, (3 + 3) / 8])
    assert ((ranks >= threshold).sum()) == 2  # each member calls 2 of 4 images malignant at its own threshold


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs on one dataset and split: one at 32 px, one at 40 px (a run copied to make a twin)."""
    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=40, seed=5)
    runs = []
    for size in ("32", "40"):
        out = root / f"run{size}"
        flags = [*tiny(1), "--img-size", size]
        result = subprocess.run([sys.executable, str(ROOT / "driver.py"), "--data-dir", str(data), "--out", str(out),
                                 "--cache-dir", str(root / "cache"), "--seed", "3", *flags],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(out)
    twin = root / "twin"
    shutil.copytree(runs[0], twin)
    return data, runs, twin


@pytest.mark.slow
def test_an_ensemble_of_two_identical_runs_equals_one_run(two_runs, tmp_path):
    _, (run, _), twin = two_runs
    assert predict.main(["--run", str(run), str(twin), "--out", str(tmp_path / "e"), "--workers", "0"]) == 0
    one, both = (json.loads((d / "metrics.json").read_text()) for d in (run / "test", tmp_path / "e"))
    for key in ("auroc", "pauc", "threshold", "sensitivity", "specificity", "auroc_ci95"):
        assert both[key] == pytest.approx(one[key], abs=1e-12), key
    assert [m["auroc"] for m in both["ensemble"]["members"]] == pytest.approx([one["auroc"]] * 2)


@pytest.mark.slow
def test_runs_of_different_image_sizes_average_on_new_images(two_runs, tmp_path):
    data, runs, _ = two_runs
    images = data / "train-image" / "image"
    assert predict.main(["--run", *map(str, runs), "--images", str(images), "--out", str(tmp_path / "e"),
                         "--workers", "0"]) == 0
    ensemble = pd.read_csv(tmp_path / "e" / "predictions.csv")
    members = [pd.read_csv(tmp_path / "e" / "members" / f"{i}-{r.name}" / "predictions.csv")
               for i, r in enumerate(runs, 1)]
    expected = (members[0]["probability"].to_numpy() + members[1]["probability"].to_numpy()) / 2
    np.testing.assert_allclose(ensemble["probability"], expected, rtol=1e-12)
    assert len(ensemble) == 80 and {"probability_run32", "probability_run40"} <= set(ensemble.columns)


@pytest.mark.slow
def test_runs_with_different_splits_cannot_ensemble_their_own_test_split(two_runs, tmp_path, capsys):
    _, (run, _), twin = two_runs
    other = tmp_path / "other"
    shutil.copytree(twin, other)
    splits = pd.read_csv(other / "splits.csv")
    splits["split"] = splits["split"].replace({"test": "val", "val": "test"})
    splits.to_csv(other / "splits.csv", index=False)
    assert predict.main(["--run", str(run), str(other), "--out", str(tmp_path / "e"), "--workers", "0"]) == 2
    assert "holds other images" in capsys.readouterr().err


@pytest.mark.slow
def test_fold_ensemble_members_share_one_unseen_test_split(tmp_path):
    from experiments import fold_ensemble
    data = make_dataset(tmp_path / "data", n_images=100, malignant_rate=0.3, size=32, seed=6)
    out = tmp_path / "fe"
    assert fold_ensemble.main(["--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), "--folds", "2",
                               "--out", str(out), *tiny(1)]) == 0
    splits = [pd.read_csv(out / f"member{k}" / "splits.csv") for k in (1, 2)]
    test = [set(s.loc[s["split"] == "test", "isic_id"]) for s in splits]
    assert test[0] == test[1] and test[0] == set(pd.read_csv(out / "split" / "splits.csv").query("split == 'test'")
                                                 ["isic_id"])
    val = [set(s.loc[s["split"] == "val", "isic_id"]) for s in splits]
    assert not val[0] & val[1] and not (val[0] | val[1]) & test[0]  # each fold of the rest validates once
    table = (out / "fold_ensemble.md").read_text()
    assert "| member 2 |" in table and "| ensemble (mean) |" in table and "| ensemble (rank) |" in table
    assert json.loads((out / "ensemble-mean" / "metrics.json").read_text())["n"] == len(test[0])
