"""tabular.py: patient metadata encoded as hand-computed features, fitted on training rows only."""
import numpy as np
import pandas as pd
import pytest

from tabular import MetadataEncoder, parse_fields
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


def test_encoder_round_trips_through_the_run_folder(tmp_path):
    encoder = MetadataEncoder.fit(TRAIN, ["age", "site"])
    encoder.save(tmp_path)
    again = MetadataEncoder.load(tmp_path)
    assert again == encoder
    np.testing.assert_array_equal(again.transform(TRAIN), encoder.transform(TRAIN))


def test_the_archive_column_names_work_too():
    archive = TRAIN.rename(columns={"anatom_site_general_challenge": "anatom_site_general"})
    assert MetadataEncoder.fit(archive, ["site"]).columns == {"site": "anatom_site_general"}


@pytest.mark.parametrize("text, message", [("age,height", "unknown field"), ("site", "needs a column")])
def test_bad_fields_and_missing_columns_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        MetadataEncoder.fit(TRAIN.drop(columns="anatom_site_general_challenge"), parse_fields(text))


def test_fields_come_in_a_fixed_order():
    assert parse_fields("site, age") == ["age", "site"] and parse_fields("none") == []
