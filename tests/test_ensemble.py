"""ensemble.py and predict.py with several runs: probabilities combined by mean or rank, reported like one run."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import predict
from conftest import in_process, tiny
from engine.config import Settings
from isic.demo import make_dataset
from workflow.ensemble import Member, combine, write_ensemble
from utils import write_csv, write_json


def test_mean_and_rank_on_hand_computed_scores():
    p = np.array([[0.1, 0.4, 0.9, 0.6], [0.3, 0.2, 0.8, 0.7]])
    mean, threshold = combine(p, np.array([0.5, 0.5]), "mean")
    np.testing.assert_allclose(mean, [0.2, 0.3, 0.85, 0.65])
    assert threshold == 0.5
    references = [np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.1, 0.3, 0.5, 0.7])]  # percentiles 1/8, 3/8, 5/8, 7/8
    placed, threshold = combine(p, np.array([0.4, 0.5]), "rank", references)
    first = [0.0, 3 / 8, 1.0, 5 / 8]  # 0.1 is below all, 0.9 above all
    second = [3 / 8, 2 / 8, 1.0, 7 / 8]  # 0.2 is halfway between 0.1's 1/8 and 0.3's 3/8
    np.testing.assert_allclose(placed, (np.array(first) + second) / 2)
    assert threshold == pytest.approx((3 / 8 + 5 / 8) / 2)


def test_a_rank_score_does_not_depend_on_the_other_images_scored():
    rng = np.random.default_rng(0)
    references = [rng.random(50), rng.random(30) ** 2]
    scores = rng.random((2, 6))
    together, threshold = combine(scores, np.array([0.5, 0.3]), "rank", references)
    alone = [combine(scores[:, [i]], np.array([0.5, 0.3]), "rank", references) for i in range(6)]
    np.testing.assert_allclose(together, [score[0] for score, _ in alone])
    assert {t for _, t in alone} == {threshold}
    assert 0 < together.min() and together.max() < 1  # the lone image is not simply ranked first


def member(folder, scores, val, thresholds=(0.5, 0.3), target=None, seen=None) -> Member:
    """A member as predict.py leaves it: its scores (plain and TTA: the TTA ones are shifted by 0.1) and its val
    evaluation (threshold, and TTA threshold; val probabilities)."""
    ids = [f"ISIC_{i}" for i in range(len(scores))]
    rows = pd.DataFrame({"isic_id": ids, "probability": scores, "probability_tta": np.array(scores) + 0.1})
    if target is not None:
        rows.insert(1, "target", target)
    (folder / "val").mkdir(parents=True)
    write_csv(folder / "predictions.csv", rows if seen is None else rows[[not s for s in seen]])
    if seen is not None:
        write_csv(folder / "seen_in_training.csv", rows[list(seen)].assign(run_split="train"))
    write_json(folder / "val" / "metrics.json", {"threshold": thresholds[0], "tta": {"threshold": thresholds[1]}})
    write_csv(folder / "val" / "predictions.csv", pd.DataFrame({"probability": val, "probability_tta": val}))
    return Member(folder, folder, folder / "val")


def test_the_tta_view_combines_tta_scores_and_tta_thresholds(tmp_path):
    target = [0, 1, 0, 1, 0, 1]
    a = member(tmp_path / "a", [0.1, 0.7, 0.3, 0.8, 0.2, 0.6], [0.2, 0.5], target=target)
    b = member(tmp_path / "b", [0.2, 0.5, 0.1, 0.9, 0.4, 0.7], [0.2, 0.5], (0.4, 0.2), target=target)
    m = write_ensemble([a, b], tmp_path / "e", "mean", Settings(), "tta", resamples=20)
    written = pd.read_csv(tmp_path / "e" / "predictions.csv")
    np.testing.assert_allclose(written["probability"], [0.25, 0.7, 0.3, 0.95, 0.4, 0.75])
    assert m["threshold"] == pytest.approx(0.25) and m["ensemble"]["view"] == "tta"
    assert {"probability_tta_a", "probability_tta_b"} <= set(written.columns)


def test_a_rank_ensemble_reports_no_probability_metric(tmp_path):
    target = [0, 1, 0, 1, 0, 1]
    members = [member(tmp_path / k, [0.1, 0.7, 0.3, 0.8, 0.2, 0.6], [0.2, 0.4, 0.6], target=target) for k in "ab"]
    m = write_ensemble(members, tmp_path / "e", "rank", Settings(), resamples=20)
    written = pd.read_csv(tmp_path / "e" / "predictions.csv")
    assert "calibration" not in m and not (tmp_path / "e" / "calibration.png").exists()
    assert "rank_score" in written and not written.columns.str.startswith("probability_prior").any()
    assert m["auroc"] == 1.0 and m["ensemble"]["score"] == "rank_score"


def test_images_a_member_trained_on_are_listed_but_not_counted(tmp_path):
    target, scores = [0, 1, 0, 1, 0, 1], [0.1, 0.7, 0.3, 0.8, 0.9, 0.6]  # image 4, benign at 0.9, seen by a
    a = member(tmp_path / "a", scores, [0.2, 0.5], target=target, seen=[False] * 4 + [True, False])
    b = member(tmp_path / "b", scores, [0.2, 0.5], target=target)
    m = write_ensemble([a, b], tmp_path / "e", "mean", Settings(), resamples=20)
    seen = pd.read_csv(tmp_path / "e" / "seen_in_training.csv")
    assert seen["isic_id"].tolist() == ["ISIC_4"] and seen["seen_by"].tolist() == ["1:train"]
    assert m["n"] == 5 and m["auroc"] == 1.0 and m["ensemble"]["left_out_seen_in_training"] == 1
    assert [r["auroc"] for r in m["ensemble"]["members"]] == [1.0, 1.0]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs on one dataset and split: one at 32 px, one at 40 px (a run copied to make a twin)."""
    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=40, seed=5)
    runs = []
    for size in ("32", "40"):
        out = root / f"run{size}"
        flags = [*tiny(1), "--img-size", size]
        assert in_process("driver.py", "--data-dir", data, "--out", out, "--cache-dir", root / "cache", "--seed", 3,
                          *flags) == 0
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


def files_of(folder) -> dict:
    """Every file under `folder` and its bytes' SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_an_ensemble_leaves_its_members_untouched_and_combines_the_tta_view(two_runs, tmp_path):
    data, runs, _ = two_runs
    before = [files_of(r) for r in runs]
    out = tmp_path / "e"  # the members' val lacks TTA: it is re-evaluated, and TTA training embeddings made
    assert predict.main(["--run", *map(str, runs), "--tta", "--out", str(out), "--workers", "0"]) == 0
    assert predict.main(["--run", *map(str, runs), "--images", str(data / "train-image" / "image"),
                         "--out", str(tmp_path / "images"), "--workers", "0"]) == 0
    assert [files_of(r) for r in runs] == before
    m = json.loads((out / "metrics.json").read_text())
    assert m["ensemble"]["view"] == "tta" and m["threshold"] == pytest.approx(np.mean(
        [json.loads((out / "members" / f"{i}-{r.name}" / "val" / "metrics.json").read_text())["tta"]["threshold"]
         for i, r in enumerate(runs, 1)]))
    members = [pd.read_csv(out / "members" / f"{i}-{r.name}" / "test" / "predictions.csv").set_index("isic_id")
               for i, r in enumerate(runs, 1)]
    ensemble = pd.read_csv(out / "predictions.csv").set_index("isic_id")
    expected = (members[0]["probability_tta"] + members[1]["probability_tta"]) / 2
    np.testing.assert_allclose(ensemble["probability"], expected.loc[ensemble.index], rtol=1e-12)
    assert (out / "report.html").is_file() and (out / "commands.txt").is_file()


@pytest.mark.slow
def test_images_of_another_dataset_that_the_run_learnt_from_are_not_counted(two_runs, tmp_path, capsys):
    data, (run, _), _ = two_runs
    assert predict.main(["--run", str(run), "--data-dir", str(data), "--out", str(tmp_path / "o"),
                         "--workers", "0"]) == 0  # the run's own data: only its test split is new to it
    splits = pd.read_csv(run / "splits.csv")
    learnt = splits[splits["split"].isin(["train", "val"])]
    assert "in the run's own splits.csv" in capsys.readouterr().out
    seen = pd.read_csv(tmp_path / "o" / "seen_in_training.csv")
    assert sorted(seen["isic_id"]) == sorted(learnt["isic_id"]) and set(seen["run_split"]) == {"train", "val"}
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    n_test = int((splits["split"] == "test").sum())
    assert m["n"] == n_test and m["left_out_seen_in_training"] == len(learnt)
    assert sum(c["queries"] for c in m["retrieval"]["per_class"].values()) == n_test
    assert len(pd.read_csv(tmp_path / "o" / "neighbours.csv")["query_id"].unique()) == n_test
    assert predict.main(["--run", str(run), "--data-dir", str(data), "--out", str(tmp_path / "all"),
                         "--workers", "0", "--include-seen"]) == 0
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["n"] == len(splits)
