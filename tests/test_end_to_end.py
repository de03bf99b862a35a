"""A tiny real run through the command lines users type: driver.py, then predict.py on the saved run (the session's
run and the real sample by the command line itself, the rest through the programs' main() in this process)."""
import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import SAMPLE, cli, in_process, needs, tiny

RUN_FILES = ["config.json", "splits.csv", "data_report.txt", "history.csv", "best.pt", "last.pt",
             "loss.png", "accuracy.png", "auroc.png", "pauc.png"]
EVAL_FILES = ["metrics.json", "predictions.csv", "classification_report.txt", "roc.png", "confusion_matrix.png",
              "embeddings.png"]
TINY = tiny(2)


@pytest.mark.slow
def test_run_writes_every_output(finished_run):
    out, result = finished_run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    for split in ("val", "test"):
        for name in EVAL_FILES:
            assert (out / split / name).is_file(), f"{split}/{name}"
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for column in ("train_loss", "train_bce", "train_contrastive", "val_loss", "val_auroc", "val_pauc",
                   "val_accuracy", "lr", "seconds"):
        assert history[column].notna().all(), column
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "resnet18" and "torch" in config["versions"]
    assert "test: AUROC" in result.stdout


@pytest.mark.slow
def test_test_metrics_are_consistent(finished_run):
    out, _ = finished_run
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    val = json.loads((out / "val" / "metrics.json").read_text())
    predictions = pd.read_csv(out / "test" / "predictions.csv")
    splits = pd.read_csv(out / "splits.csv")
    assert metrics["threshold"] == val["threshold"]  # chosen on validation, reused on test
    assert metrics["n"] == len(predictions) == (splits["split"] == "test").sum()
    assert metrics["n_positive"] == predictions["target"].sum()
    assert set(predictions["isic_id"]) == set(splits.loc[splits["split"] == "test", "isic_id"])
    y, p = predictions["target"], predictions["probability"]
    assert metrics["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # pAUC above 80% TPR from its definition: McClish-standardised area of the flipped problem, unstandardised
    assert metrics["pauc"] == pytest.approx(0.02 + 0.36 * (roc_auc_score(1 - y, -p, max_fpr=0.2) - 0.5), abs=1e-12)
    tn, fp = metrics["confusion_matrix"][0]
    assert tn + fp == metrics["n"] - metrics["n_positive"]


@pytest.mark.slow
def test_predict_reproduces_test_metrics(run_copy):
    out = run_copy
    before = json.loads((out / "test" / "metrics.json").read_text())
    assert in_process("predict.py", "--run", out, "--workers", "0") == 0
    assert json.loads((out / "test" / "metrics.json").read_text()) == before


@pytest.mark.slow
def test_predict_on_unlabelled_images(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    images = tiny_data / "train-image" / "image"
    assert in_process("predict.py", "--run", out, "--images", images, "--out", tmp_path) == 0
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == 160 and predictions["probability"].between(0, 1).all()


@pytest.mark.slow
def test_existing_run_is_not_overwritten(finished_run, tiny_data, capsys):
    out, _ = finished_run
    assert in_process("driver.py", "--data-dir", tiny_data, "--out", out, *TINY) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent/isic"], "data folder not found"),
    (["--csv", "/nonexistent/train.csv", "--image-dir", "/tmp"], "metadata CSV not found"),
    (["--batch-size", "16"], "no data given"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path, capsys):
    assert in_process("driver.py", *args, "--out", tmp_path / "o", *TINY) == 2  # an exception would fail the test
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error:")
    assert message in stderr


@pytest.mark.slow
@needs(SAMPLE)
def test_real_sample_end_to_end(tmp_path):
    out = tmp_path / "r"
    result = cli("driver.py", "--data-dir", SAMPLE, "--out", out, "--cache-dir", tmp_path / "cache", *tiny(1))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["n"] == (pd.read_csv(out / "splits.csv")["split"] == "test").sum()


@pytest.mark.slow
def test_runs_and_predictions_record_where_their_time_goes(finished_run, run_copy):
    result = finished_run[1]
    out = run_copy
    phases = json.loads((out / "timings.json").read_text())["phases"]
    names = [p["name"] for p in phases]
    for name in ("data.metadata", "data.split", "data.cache", "training.epoch1", "validation.epoch2",
                 "evaluation.train_embeddings", "evaluation.score.test", "evaluation.retrieval.val",
                 "evaluation.bootstrap.test", "evaluation.report"):
        assert name in names, name
    assert "images/s" in phases[names.index("data.cache")]["note"]
    summary = [line for line in result.stdout.splitlines() if line.startswith("time: ")]
    assert len(summary) == 1 and all(f"{g} " in summary[0] for g in ("data", "training", "validation", "evaluation"))
    assert in_process("predict.py", "--run", out, "--split", "val", "--workers", "0") == 0
    names = [p["name"] for p in json.loads((out / "val" / "timings.json").read_text())["phases"]]
    assert "evaluation.score.val" in names and "training.epoch1" not in names
