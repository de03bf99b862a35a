"""What the programs say and write beside the numbers, checked without training: flag names in messages, defaults in
--help, literal ids in figures, the projector's files, the instance term's share of the loss, an interrupted epoch's
time, patient-metadata coverage and the caveats of a small labelled set."""
import json

import numpy as np
import pandas as pd
import pytest

import driver
import sample
import train
from dataset import ImageDataset
from engine import timings
from engine.config import Settings, build_parser
from isic.demo import make_dataset
from isic.tabular import MetadataEncoder, run_features, with_metadata
from reporting import plots, tensorboard_log, webreport
from reporting.reports import summary_line
from utils import UserError
from workflow import pipeline


def test_the_resume_error_names_only_flags_that_exist(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Settings().to_dict()))
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(UserError) as error:
        pipeline.resume_settings({"resume": str(tmp_path), "epochs": 3})
    named = [word.strip(",") for word in str(error.value).split() if word.startswith("--") and word != "--resume"]
    assert "--no-tensorboard" in named and "--tensorboard" not in named
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    assert set(named) <= flags  # each one a flag driver.py accepts


def test_sample_draws_with_the_seed_its_help_names(tmp_path, capsys):
    help_text = sample.build_parser().format_help()
    assert f"(default {Settings().seed})" in help_text
    source = make_dataset(tmp_path / "src", n_images=60, malignant_rate=0.3, size=16, seed=1)
    for name, seed in (("default", []), ("named", ["--seed", str(Settings().seed)])):
        assert sample.main(["--data-dir", str(source), "--out", str(tmp_path / name), "--patients", "8", *seed]) == 0
    drawn = [sorted(p.name for p in (tmp_path / name / "train-image" / "image").iterdir())
             for name in ("default", "named")]
    assert drawn[0] == drawn[1]


@pytest.mark.parametrize("name", ["a$_$b", r"x\y$^$"])
def test_ids_are_drawn_as_written(tmp_path, name):
    picture = np.full((8, 8, 3), 0.5)
    plots.similar_plot([(name, (picture, f"{name}\nP(melanoma) 0.5"), [(picture, name, True, "")])],
                       tmp_path / "similar.png", f"queries of {name}")
    plots.gallery_plot({name: [(picture, np.zeros((8, 8)), name)]}, tmp_path / "gallery.png", name, name)
    assert (tmp_path / "similar.png").is_file() and (tmp_path / "gallery.png").is_file()


def projected(folder, tag: str, ids) -> None:
    n = len(ids)
    cache = np.random.default_rng(0).integers(0, 255, (n, 3, 8, 8), dtype=np.uint8)
    dataset = ImageDataset(np.arange(n), np.zeros(n), [None] * n, 8, cache)
    table = pd.DataFrame({"isic_id": ids, "probability": np.linspace(0, 1, n)})
    tensorboard_log.write_projector(folder, tag, np.ones((n, 4)), table, dataset)


def test_projector_metadata_keeps_one_line_and_one_field_per_value(tmp_path):
    projected(tmp_path, "images", ["plain", "tab\there", "new\nline"])
    lines = (tmp_path / "images" / "metadata.tsv").read_text().split("\n")[:-1]
    assert len(lines) == 4 and all(len(line.split("\t")) == 2 for line in lines)
    assert [line.split("\t")[0] for line in lines[1:]] == ["plain", "tab here", "new line"]


def test_sets_projected_into_one_folder_all_stay(tmp_path):
    projected(tmp_path, "images", ["a", "b"])
    projected(tmp_path, "dataset", ["c", "d", "e"])
    projected(tmp_path, "images", ["a", "b", "f"])  # scored again: replaced, not added twice
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count('tensor_name: "images"') == 1 and config.count('tensor_name: "dataset"') == 1


ROW = {"epoch": 3, "train_loss": 1.5, "train_bce": 0.5, "train_contrastive": 0.25, "train_instance": 1.5,
       "val_loss": 0.7, "val_auroc": 0.8, "val_pauc": 0.1, "val_accuracy": 0.7, "lr": 1e-3, "seconds": 2.0}


def test_the_epoch_line_shows_the_instance_term_and_what_val_loss_lacks():
    line = train.epoch_line(ROW, 5, False, instance=True)
    assert "(bce 0.5000, contrastive 0.2500, instance 1.5000)" in line and "val loss (no instance term) 0.7000" in line
    assert "instance" not in train.epoch_line(ROW, 5, False)


class Writer:
    def __init__(self):
        self.tags = []

    def add_scalar(self, tag, value, step):
        self.tags.append(tag)


class Scheduler:
    last_epoch = 7

    def get_last_lr(self):
        return [1e-3]


def test_tensorboard_step_scalars_include_the_instance_term_when_trained():
    window = np.ones((4, 9))
    for instance, expected in ((True, ["loss", "bce", "contrastive", "instance"]), (False, ["loss", "bce", "contrastive"])):
        writer = Writer()
        tensorboard_log.Board(writer, Scheduler(), instance).steps(window)
        assert writer.tags == [f"step/{name}" for name in expected] + ["step/lr"]


def test_the_history_table_shows_the_instance_term(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Settings(w_instance=0.5).to_dict()))
    pd.DataFrame([ROW]).to_csv(tmp_path / "history.csv", index=False)
    page = webreport.write_report(tmp_path, training=True).read_text()
    assert ">train instance term</th>" in page and ">val loss (no instance term)</th>" in page


def test_an_interrupted_epoch_keeps_its_time(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_images=60, malignant_rate=0.3, size=16, seed=1)

    def stopped(*args, **kwargs):
        import time
        time.sleep(0.3)
        raise train.Interrupted("SIGTERM")
    monkeypatch.setattr(train, "train_one_epoch", stopped)
    out = tmp_path / "run"
    assert driver.main(["--data-dir", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                        "--backbone", "resnet18", "--img-size", "16", "--batch-size", "8", "--epochs", "2",
                        "--workers", "0"]) == 2
    [epoch] = [p for p in timings.read(out / "timings.json") if p["name"] == "training.epoch1"]
    assert epoch["seconds"] >= 0.3 and "interrupted" in epoch["note"]


def test_patient_metadata_coverage_is_printed(tmp_path, capsys):
    frame = pd.DataFrame({"isic_id": list("abcd"), "split": "train", "age_approx": [40, None, 60, 55],
                          "sex": ["male", "female", None, "female"], "anatom_site_general_challenge": [None] * 3 + ["torso"]})
    MetadataEncoder.fit(frame, ["age", "sex", "site"]).save(tmp_path)
    s = Settings(metadata="age,sex,site")
    run_features(tmp_path, s, frame.assign(sex=["male", "unseen", "female", None]))
    assert "patient metadata: age for 3, sex for 2, site for 1 of 4 images" in capsys.readouterr().out

    class Data:
        pass
    data = Data()
    data.frame = frame
    with_metadata(data, s, tmp_path, fit=True)
    assert "patient metadata: age for 3, sex for 3, site for 1 of 4 images" in capsys.readouterr().out


def test_a_small_set_says_what_its_numbers_cannot_carry():
    from scoring.metrics import size_caveat  # imported here: the other tests run without it
    assert size_caveat([0] * 10 + [1] * 5) == ""
    assert size_caveat([0] * 10 + [1] * 2).startswith("only 2 images with a melanoma:")
    assert size_caveat([0] * 10 + [1] * 6, ["p"] * 10 + ["q", "q", "q", "r", "r", "s"]).startswith(
        "only 3 patients with a melanoma:")
    assert size_caveat([0, 0, 0, 1] * 3, list("abcd") * 3).startswith("only 1 patient with a melanoma")
    assert size_caveat([1] * 8) == "no image without one: no AUROC, pAUC or interval"
    m = {"auroc": 1.0, "pauc": 0.2, "threshold": 0.5, "sensitivity": 1.0, "specificity": 1.0, "balanced_accuracy": 1.0,
         "n": 6, "n_positive": 1, "left_out_seen_in_training": 67, "small_set": size_caveat([0] * 5 + [1])}
    lines = summary_line(m, "out").splitlines()
    assert lines[1] == ("  note: 67 more images left out: the run trained or validated on them (seen_in_training.csv; "
                        "--include-seen counts them)")
    assert lines[2].startswith("  note: only 1 image with a melanoma")
