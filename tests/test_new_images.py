"""predict.py on new images and other data, with one tiny real run: ids of files that share a stem, the
prior-corrected probability, the seen-in-training note per split, ensembles' run_split and rank check, and what a
shrunk labelled set says beside its numbers."""
import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import driver
import predict
from conftest import tiny
from isic.demo import make_dataset
from reporting.explain import SAME_IMAGE


def quietly(main, *args) -> tuple[int, str]:
    """A program's main in this process (no second start of Python and torch): its exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([str(a) for a in args])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run on 80 synthetic images, its data and a folder of new images: two different lesions as dup.jpg
    and dup.png, their copies under names of their own, a name with `$_$`, one training and one validation image."""
    root = tmp_path_factory.mktemp("new-images")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=40, seed=5)
    out = root / "run"
    assert quietly(driver.main, "--data-dir", data, "--out", out, "--cache-dir", root / "cache", "--seed", "3",
                   *tiny(1))[0] == 0
    splits = pd.read_csv(out / "splits.csv")
    first = {split: splits.loc[splits["split"] == split, "isic_id"].iloc[0] for split in ("train", "val", "test")}
    images, new = data / "train-image" / "image", root / "new"
    new.mkdir()
    shutil.copy(images / f"{first['test']}.jpg", new / "dup.jpg")
    shutil.copy(images / f"{first['test']}.jpg", new / "a.jpg")
    Image.open(images / f"{first['train']}.jpg").save(new / "dup.png")
    shutil.copy(new / "dup.png", new / "b.png")
    shutil.copy(images / f"{first['test']}.jpg", new / "x$_$y.jpg")
    for split in ("train", "val"):
        shutil.copy(images / f"{first[split]}.jpg", new / f"{first[split]}.jpg")
    return out, data, new, first


@pytest.fixture(scope="module")
def scored(run, tmp_path_factory):
    out, _, new, _ = run
    where = tmp_path_factory.mktemp("scored")
    code, printed = quietly(predict.main, "--run", out, "--images", new, "--out", where, "--workers", "0")
    assert code == 0
    return where, printed, pd.read_csv(where / "predictions.csv", dtype={"run_split": str}).set_index("isic_id")


@pytest.mark.slow
def test_files_sharing_a_stem_are_each_scored(run, scored):
    _, _, _, first = run
    _, _, table = scored
    assert {"dup.jpg", "dup.png", "a", "b", "x$_$y", first["train"], first["val"]} == set(table.index)
    p = table["probability"]
    assert p["dup.jpg"] == pytest.approx(p["a"], abs=1e-6) and p["dup.png"] == pytest.approx(p["b"], abs=1e-6)
    assert p["a"] != pytest.approx(p["b"], abs=1e-6)  # two lesions, two scores


@pytest.mark.slow
def test_an_id_with_dollars_is_scored_and_drawn(scored):
    where, _, table = scored
    assert "x$_$y" in table.index and (where / "similar.png").is_file()


@pytest.mark.slow
def test_new_images_get_the_prior_corrected_probability(run, scored):
    out, *_ = run
    _, _, table = scored
    splits = pd.read_csv(out / "splits.csv")
    prevalence = splits.loc[splits["split"] == "train", "target"].mean()
    p = table["probability"]
    expected = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + np.log(prevalence / (1 - prevalence)))))
    np.testing.assert_allclose(table["probability_prior_corrected"], expected, rtol=1e-5)
    test = pd.read_csv(out / "test" / "predictions.csv")  # the labelled split's call at val's threshold
    threshold = json.loads((out / "val" / "metrics.json").read_text())["threshold"]
    assert (test["predicted_malignant"] == (test["probability"] >= threshold).astype(int)).all()


@pytest.mark.slow
def test_the_seen_note_is_true_for_each_split(run, scored):
    _, _, _, first = run
    where, printed, table = scored
    assert table.loc[first["train"], "run_split"] == "train" and table.loc[first["val"], "run_split"] == "val"
    assert table["run_split"].isna().sum() == 5  # the others are new to the run
    nearest = pd.read_csv(where / "neighbours.csv").query("rank == 1").set_index("query_id")["distance"]
    assert nearest[first["train"]] < SAME_IMAGE < nearest[first["val"]]
    [note] = [line for line in printed.splitlines() if line.startswith("note: ")]
    assert "2 of 7 images are in the run's own splits.csv (1 train, 1 val)" in note
    assert "1 in train: each is its own nearest training lesion" in note
    assert "1 in val: no training lesions" in note and "the image itself" not in note


@pytest.mark.slow
def test_tta_on_a_run_evaluated_with_tta_says_it_changes_nothing(run, tmp_path):
    out, _, new, _ = run
    copy = tmp_path / "tta-run"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "tta": True, "profile": "cpu"}))
    code, printed = quietly(predict.main, "--run", copy, "--images", new, "--out", tmp_path / "p", "--workers", "0",
                            "--tta")
    assert code == 0
    [line] = [line for line in printed.splitlines() if "--tta" in line]
    assert line == f"note: {copy} was evaluated with TTA already (its profile cpu): --tta changes nothing"


@pytest.fixture(scope="module")
def twin(run, tmp_path_factory):
    twin = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(run[0], twin)
    return twin


@pytest.mark.slow
def test_an_ensemble_on_new_images_keeps_run_split(run, twin, tmp_path, capsys):
    out, _, new, first = run
    assert predict.main(["--run", str(out), str(twin), "--images", str(new), "--out", str(tmp_path / "e"),
                         "--workers", "0"]) == 0
    table = pd.read_csv(tmp_path / "e" / "predictions.csv", dtype={"run_split": str}).fillna("").set_index("isic_id")
    assert table.loc[first["train"], "run_split"] == "1:train 2:train"
    assert table.loc[first["val"], "run_split"] == "1:val 2:val"
    assert "note: 2 of 7 images are in a member's own splits.csv as train or val" in capsys.readouterr().out
    single = pd.read_csv(tmp_path / "e" / "members" / f"1-{out.name}" / "predictions.csv").set_index("isic_id")
    np.testing.assert_allclose(table["probability_prior_corrected"], single.loc[table.index,
                               "probability_prior_corrected"], rtol=1e-6)
    phases = json.loads((tmp_path / "e" / "timings.json").read_text())["phases"]
    assert [p["name"] for p in phases] == ["evaluation.member1", "evaluation.member2", "evaluation.ensemble",
                                           "evaluation.report"]


@pytest.mark.slow
def test_a_rank_ensemble_missing_val_predictions_stops_before_scoring(run, twin, tmp_path, capsys):
    out, _, new, _ = run
    broken = tmp_path / "broken"
    shutil.copytree(twin, broken)
    (broken / "val" / "predictions.csv").unlink()
    code = predict.main(["--run", str(out), str(broken), "--images", str(new), "--out", str(tmp_path / "e"),
                         "--workers", "0", "--ensemble", "rank"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: {broken / 'val' / 'predictions.csv'} is missing")
    assert not list((tmp_path / "e").rglob("predictions.csv"))  # no member was scored first


@pytest.mark.slow
def test_a_shrunk_labelled_set_says_so_beside_its_numbers(run, tmp_path):
    out, data, _, _ = run
    code, printed = quietly(predict.main, "--run", out, "--data-dir", data, "--out", tmp_path / "o", "--workers", "0")
    assert code == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    left_out = m["left_out_seen_in_training"]
    assert left_out > 0 and f"note: {left_out} more images left out: the run trained or validated on them" in printed
    banner = (tmp_path / "o" / "report.html").read_text().split('<p class="status">')[1].split("</p>")[0]
    assert banner.startswith(f"{m['n']} labelled images evaluated") and f"{left_out} more images left out" in banner
    assert m["n_positive"] < 5  # the run's test split of 80 images: too small, said in the banner and the summary
    assert m["small_set"][1:] in banner and f"note: {m['small_set']}" in printed
