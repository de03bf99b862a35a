"""crossval.py: patient-disjoint folds, every method on the same folds, one table, and --resume reusing finished runs."""
import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny

from engine.checkpoints import evaluation_weights
from engine.config import parse_cli
from experiments import crossval
from experiments.variants import CONTRASTIVE_ONLY
from isic.metadata import find_layout, load_metadata
from isic.splits import fold_splits, leakage_groups

TINY = tiny(2)


def test_each_image_is_tested_once_and_no_patient_straddles_a_fold_split(tiny_data):
    frame = load_metadata(find_layout(tiny_data, None, None)[0])
    tested = np.zeros(len(frame), dtype=int)
    for split in fold_splits(frame, leakage_groups(frame), 4, seed=0):
        assert set(split) == {"train", "val", "test"}
        patients = {name: set(frame.loc[split == name, "patient_id"]) for name in ("train", "val", "test")}
        for a, b in combinations(patients.values(), 2):
            assert not a & b
        tested += split == "test"
    assert (tested == 1).all()


def test_duplicate_pairs_across_patients_stay_in_one_split_of_every_fold(tiny_data):
    frame = load_metadata(find_layout(tiny_data, None, None)[0])
    first_of_patient = frame.drop_duplicates("patient_id")["isic_id"].tolist()
    pairs = list(zip(first_of_patient[0:20:2], first_of_patient[1:20:2]))  # ten pairs, each of two patients
    index = {image: i for i, image in enumerate(frame["isic_id"])}
    for split in fold_splits(frame, leakage_groups(frame, pairs), 4, seed=0):
        assert all(split[index[a]] == split[index[b]] for a, b in pairs)


@pytest.fixture(scope="module")
def cv(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    driver_flags = ["--data-dir", str(tiny_data), "--cache-dir", str(tmp_path_factory.mktemp("cache")), *TINY]
    args = ["--folds", "2", "--cv-out", str(out), "--methods", "baseline,knn", *driver_flags]
    assert crossval.main(args) == 0
    return out, args, driver_flags


@pytest.mark.slow
def test_table_holds_every_method_on_the_same_folds(cv):
    out, *_ = cv
    table = pd.read_csv(out / "crossval.csv")
    assert sorted(table.groupby("method")["fold"].apply(sorted).tolist()) == [[1, 2]] * 2
    assert table["auroc"].between(0, 1).all() and table["pauc"].between(0, 0.2).all()
    assert "| contrastive + kNN |" in (out / "crossval.md").read_text()
    assert "--epochs 2" in (out / "crossval.md").read_text()
    assert (pd.read_csv(out / "fold1" / "splits.csv")["split_by"] == "patient").all()
    for fold in (1, 2):
        fold_split = pd.read_csv(out / f"fold{fold}" / "splits.csv")
        for method in ("knn",):
            run_split = pd.read_csv(out / f"fold{fold}" / method / "splits.csv")
            assert run_split[["isic_id", "split"]].equals(fold_split[["isic_id", "split"]])


@pytest.mark.slow
def test_contrastive_only_run_is_scored_on_its_final_weights(cv):
    out, *_ = cv
    run = out / "fold1" / "knn"
    config = json.loads((run / "config.json").read_text())
    assert config["w_bce"] == 0 and config["select_metric"] == "last"
    best, last = (torch.load(run / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["model"][k], evaluation_weights(last)[k]) for k in best["model"])


@pytest.mark.slow
def test_resume_reuses_finished_runs_with_the_same_settings(cv, capsys):
    out, args, _ = cv
    before = (out / "crossval.csv").read_text()
    saved = (out / "fold1" / "knn" / "best.pt").stat().st_mtime_ns
    assert crossval.main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert (out / "crossval.csv").read_text() == before
    assert (out / "fold1" / "knn" / "best.pt").stat().st_mtime_ns == saved


@pytest.mark.slow
def test_resume_does_not_reuse_a_run_with_other_settings(cv):
    out, _, driver_flags = cv
    given = {**parse_cli(driver_flags), **CONTRASTIVE_ONLY}  # the knn method's settings
    run, splits = out / "fold1" / "knn", out / "fold1" / "splits.csv"
    assert crossval.finished_run(run, {**given, "splits": str(splits)}, splits) is not None
    assert crossval.finished_run(run, {**given, "splits": str(splits), "epochs": 3}, splits) is None
    assert crossval.finished_run(out / "fold2" / "knn", {**given, "splits": str(splits)}, splits) is None


def test_fewer_than_two_folds_is_one_clear_error(capsys):
    assert crossval.main(["--folds", "1"]) == 2
    assert capsys.readouterr().err == "error: --folds must be at least 2: each fold is the test split once\n"
