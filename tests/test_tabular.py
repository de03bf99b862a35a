"""tabular.py: patient metadata encoded as hand-computed features, fitted on training rows only."""
import numpy as np
import pandas as pd
import pytest
import torch

from isic.tabular import MetadataEncoder, parse_fields
from utils import UserError

TRAIN = pd.DataFrame({"age_approx": [30, 50, None, 70], "sex": ["male", "female", "female", None],
                      "anatom_site_general_challenge": ["torso", "torso", "head/neck", "lower extremity"]})


def test_features_equal_hand_computation():
    encoder = MetadataEncoder.fit(TRAIN, ["age", "sex", "site"])
    mean, std = 50.0, np.std([30, 50, 70])  # population std, missing age left out
    assert encoder.feature_names() == ["age", "age_missing", "sex=female", "sex=male", "sex=unknown",
                                       "site=head/neck", "site=lower extremity", "site=torso", "site=unknown"]
    expected = np.array([
        [(30 - mean) / std, 0, 0, 1, 0, 0, 0, 1, 0],
        [0.0, 0, 1, 0, 0, 0, 0, 1, 0],
        [0.0, 1, 1, 0, 0, 1, 0, 0, 0],  # missing age: the training mean, flagged
        [(70 - mean) / std, 0, 0, 0, 1, 0, 1, 0, 0],  # missing sex: unknown
    ], dtype=np.float32)
    np.testing.assert_allclose(encoder.transform(TRAIN), expected, rtol=1e-6)


def test_unseen_categories_and_missing_values_in_new_data_are_unknown():
    encoder = MetadataEncoder.fit(TRAIN, ["sex", "site"])
    new = pd.DataFrame({"sex": ["Female ", "other"], "anatom_site_general_challenge": ["palms/soles", ""]})
    features = pd.DataFrame(encoder.transform(new), columns=encoder.feature_names())
    assert features["sex=female"].tolist() == [1, 0] and features["sex=unknown"].tolist() == [0, 1]
    assert features["site=unknown"].tolist() == [1, 1] and features.sum(axis=1).tolist() == [2, 2]
    no_columns = encoder.transform(pd.DataFrame(index=range(3)))  # a folder of images without a CSV
    assert no_columns.tolist() == [[0, 0, 1, 0, 0, 0, 1]] * 3


def test_encoder_round_trips_through_the_run_folder(tmp_path):
    encoder = MetadataEncoder.fit(TRAIN, ["age", "site"])
    encoder.save(tmp_path)
    again = MetadataEncoder.load(tmp_path)
    assert again == encoder
    np.testing.assert_array_equal(again.transform(TRAIN), encoder.transform(TRAIN))


def test_the_archive_column_names_work_too():
    archive = TRAIN.rename(columns={"anatom_site_general_challenge": "anatom_site_general"})
    assert MetadataEncoder.fit(archive, ["site"]).columns == {"site": "anatom_site_general"}


def test_new_data_under_the_other_column_names_is_read_not_taken_as_missing():
    encoder = MetadataEncoder.fit(TRAIN, ["age", "sex", "site"])  # the ISIC 2020 names: age_approx, ..._challenge
    archive = TRAIN.rename(columns={"age_approx": "age", "anatom_site_general_challenge": "anatom_site_general"})
    np.testing.assert_array_equal(encoder.transform(archive), encoder.transform(TRAIN))


def test_scoring_images_without_their_metadata_says_how_much_is_unknown(tmp_path, capsys):
    from types import SimpleNamespace

    from isic.tabular import run_features
    MetadataEncoder.fit(TRAIN, ["age", "sex", "site"]).save(tmp_path)
    s = SimpleNamespace(metadata="age,sex,site")
    run_features(tmp_path, s, TRAIN)  # 2 of 12 facts unknown: only how many images got each
    assert capsys.readouterr().out == "patient metadata: age for 3, sex for 3, site for 4 of 4 images\n"
    run_features(tmp_path, s, pd.DataFrame({"isic_id": ["a", "b"], "sex": ["male", None]}))
    coverage, note = capsys.readouterr().out.strip().splitlines()
    assert coverage == "patient metadata: age for 0, sex for 1, site for 0 of 2 images"
    assert "83% of the patient facts (age, sex, site) of these 2 images" in note


@pytest.mark.parametrize("text, message", [("age,height", "unknown field"), ("site", "needs a column")])
def test_bad_fields_and_missing_columns_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        MetadataEncoder.fit(TRAIN.drop(columns="anatom_site_general_challenge"), parse_fields(text))


def test_fields_come_in_a_fixed_order():
    assert parse_fields("site, age") == ["age", "site"] and parse_fields("none") == []


@pytest.fixture(scope="module")
def metadata_run(tmp_path_factory):
    """A tiny run whose head also reads age, sex and site from an extra CSV (older patients malignant more often)."""
    from conftest import in_process, tiny
    from isic.demo import make_dataset
    root = tmp_path_factory.mktemp("metadata")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=32, seed=4)
    ids = pd.read_csv(data / "train-metadata.csv")[["isic_id", "target"]]
    rng = np.random.default_rng(0)
    facts = pd.DataFrame({"image_name": ids["isic_id"], "age_approx": 45 + 20 * ids["target"] + rng.integers(-5, 5, 80),
                          "sex": rng.choice(["male", "female", None], 80),
                          "anatom_site_general_challenge": rng.choice(["torso", "head/neck"], 80)})
    facts.to_csv(root / "facts.csv", index=False)
    out = root / "run"
    assert in_process("driver.py", "--data-dir", data, "--out", out, "--cache-dir", root / "cache",
                      "--metadata", "age,sex,site", "--extra-csv", root / "facts.csv", *tiny(1)) == 0
    return root, data, out


@pytest.mark.slow
def test_metadata_run_saves_its_encoder_and_predict_reproduces_it(metadata_run):
    import json

    import predict
    from scoring.inference import load_run
    root, data, run = metadata_run
    encoder = MetadataEncoder.load(run)
    assert encoder.columns == {"age": "age_approx", "sex": "sex", "site": "anatom_site_general_challenge"}
    splits = pd.read_csv(run / "splits.csv")
    train_ages = pd.read_csv(root / "facts.csv").set_index("image_name").loc[
        splits.loc[splits["split"] == "train", "isic_id"], "age_approx"]
    assert encoder.age_mean == pytest.approx(train_ages.mean())  # fitted on the training split alone
    _, model = load_run(run, torch.device("cpu"))
    assert model.head.in_features == 16 + 16 and model.metadata_branch[0].in_features == encoder.width
    written = (run / "test" / "metrics.json").read_text()
    assert predict.main(["--run", str(run), "--workers", "0"]) == 0
    assert json.loads((run / "test" / "metrics.json").read_text())["auroc"] == json.loads(written)["auroc"]


@pytest.mark.slow
def test_new_images_are_scored_with_or_without_their_metadata(metadata_run, tmp_path):
    import predict
    root, data, run = metadata_run
    images = data / "train-image" / "image"
    assert predict.main(["--run", str(run), "--images", str(images), "--out", str(tmp_path / "a"),
                         "--extra-csv", str(root / "facts.csv"), "--workers", "0"]) == 0
    assert predict.main(["--run", str(run), "--images", str(images), "--out", str(tmp_path / "b"),
                         "--workers", "0"]) == 0  # no metadata: every fact unknown, still scored
    with_facts = pd.read_csv(tmp_path / "a" / "predictions.csv")["probability"]
    without = pd.read_csv(tmp_path / "b" / "predictions.csv")["probability"]
    assert len(with_facts) == len(without) == 80 and not np.allclose(with_facts, without)
