"""export.py: the exported model, fed the image files as they are, reproduces the run's own probabilities."""
import importlib.util
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import export
from conftest import ROOT, tiny
from demo import make_dataset

pytestmark = pytest.mark.slow  # every test here trains a tiny run first


@pytest.fixture(scope="module")
def run_at_file_size(tmp_path_factory):
    """A run whose --img-size equals the files' size: the exported preprocessing is then exactly the pipeline's."""
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=32, seed=3)
    out = root / "run"
    result = subprocess.run([sys.executable, str(ROOT / "driver.py"), "--data-dir", str(data), "--out", str(out),
                             "--cache-dir", str(root / "cache"), *tiny(1)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return data, out


def exported_probabilities(path, data, ids):
    exported = export.load_export(path)
    images = np.stack([export.read_full_size(data / "train-image" / "image" / f"{i}.jpg").numpy() for i in ids])
    return exported(images)[0]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_reproduces_the_runs_test_probabilities(run_at_file_size, fmt, tmp_path):
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export is optional: pip install onnx onnxscript onnxruntime")
    data, run = run_at_file_size
    path = tmp_path / f"model.{fmt}"
    assert export.main(["--run", str(run), "--format", fmt, "--out", str(path), "--check", "4"]) == 0
    predictions = pd.read_csv(run / "test" / "predictions.csv")
    got = exported_probabilities(path, data, predictions["isic_id"])  # one batch: the batch size is free too
    assert np.abs(got - predictions["probability"].to_numpy()).max() < 1e-5


def test_batch_size_is_free_and_input_size_is_chosen_at_export(run_at_file_size, tmp_path):
    _, run = run_at_file_size
    path = tmp_path / "model.pt2"
    # 48 x 80 files would be cropped to 48 x 48 and resized to 32: nothing to check against, so the check is refused
    assert export.main(["--run", str(run), "--out", str(path), "--input-size", "48", "80"]) == 2
    assert export.main(["--run", str(run), "--out", str(path), "--check", "2"]) == 0
    probabilities, embeddings = export.load_export(path)(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert probabilities.shape == (3,) and embeddings.shape == (3, 16)
    assert np.all((probabilities > 0) & (probabilities < 1))


def test_an_export_that_disagrees_is_refused_and_not_left_behind(run_at_file_size, tmp_path, monkeypatch, capsys):
    _, run = run_at_file_size
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no export can be that close
    assert export.main(["--run", str(run), "--out", str(tmp_path / "model.pt2"), "--check", "2"]) == 2
    assert "differs from the run" in capsys.readouterr().err and not (tmp_path / "model.pt2").exists()
