"""The full-scale check's generated data has ISIC 2020's shape, and the final evaluation's CPU-bound parts stay
bounded however many images are scored."""
import os

import numpy as np
import pandas as pd

from experiments.scale_check import generate, images_per_patient
from reporting import plots
from scoring import retrieval

TINY_SIZES = ((0.2, [(300, 200)], 1), (0.8, [(48, 48)], 3))


def test_generated_data_has_the_shape_asked_for(tmp_path):
    root = generate(tmp_path / "d", images=500, patients=31, sizes=TINY_SIZES)
    frame = pd.read_csv(root / "train-metadata.csv", index_col=0)
    assert len(frame) == 500 and frame["patient_id"].nunique() == 31 and frame["target"].sum() == 9  # 1.8%
    files = sorted((root / "train-image" / "image").glob("*.jpg"))
    assert [f.stem for f in files] == sorted(frame["isic_id"])
    assert len({os.stat(f).st_ino for f in files}) <= 8  # hard links to the 2 x (1 + 3) distinct lesions
    mtime = (root / "train-metadata.csv").stat().st_mtime_ns
    generate(root, images=500, patients=31, sizes=TINY_SIZES)  # a second call reuses it
    assert (root / "train-metadata.csv").stat().st_mtime_ns == mtime


def test_patients_have_from_one_to_dozens_of_images():
    counts = images_per_patient(np.random.default_rng(0), 33_126, 2_056)
    assert counts.sum() == 33_126 and counts.min() >= 1 and counts.max() >= 50


def test_tsne_draws_a_fixed_size_sample_keeping_the_malignant_cases():
    y = np.zeros(5000, int)
    y[:90] = 1
    rows = plots.tsne_sample(y, 1000)
    assert len(rows) == 1000 and y[rows].sum() == 90 and len(np.unique(rows)) == 1000
    assert (plots.tsne_sample(y[:700], 1000) == np.arange(700)).all()


def test_retrieval_metrics_sample_a_large_class_of_queries(monkeypatch):
    rng = np.random.default_rng(0)
    train, train_y = rng.normal(size=(300, 4)), np.r_[np.zeros(250, int), np.ones(50, int)]
    query, y = rng.normal(size=(130, 4)), np.r_[np.zeros(120, int), np.ones(10, int)]
    full = retrieval.retrieval_metrics(train, train_y, query, y)
    monkeypatch.setattr(retrieval, "MAX_QUERIES", 40)
    sampled = retrieval.retrieval_metrics(train, train_y, query, y)
    assert sampled["per_class"]["benign"]["queries"] == 120 and sampled["per_class"]["benign"]["sampled_queries"] == 40
    assert "sampled_queries" not in sampled["per_class"]["malignant"]
    assert sampled["per_class"]["malignant"] == full["per_class"]["malignant"]
    assert abs(sampled["per_class"]["benign"]["mean_average_precision_at_r"]
               - full["per_class"]["benign"]["mean_average_precision_at_r"]) < 0.05
