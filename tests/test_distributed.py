"""torchrun: a 2-process DistributedDataParallel run on CPU (gloo) writes what a one-process run writes, and scores
every test image exactly once."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch.distributed as dist

from conftest import ROOT, tiny
from demo import make_dataset
from checkpoints import load_checkpoint

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this PyTorch build has no torch.distributed with the gloo backend")

TINY = tiny(2)
pytestmark = pytest.mark.slow  # every test here trains
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # = torchrun


def launch(command, data, out, cache):
    # One thread per process: two ranks share the cores without oversubscribing them.
    result = subprocess.run([*command, str(ROOT / "driver.py"), "--data-dir", str(data), "--out", str(out),
                             "--cache-dir", str(cache), *TINY], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = make_dataset(root / "data", n_images=120, malignant_rate=0.2, size=40, seed=1)
    launch([sys.executable], data, root / "one", root / "cache")
    two = launch(TORCHRUN, data, root / "two", root / "cache")
    return root / "one", root / "two", two


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_two_processes_write_the_same_outputs_as_one(runs):
    one, two, result = runs
    assert files(two) == files(one)
    assert list(pd.read_csv(two / "history.csv")["epoch"]) == [1, 2]
    assert load_checkpoint(two / "last.pt")["world_size"] == 2
    assert result.stdout.count("test: AUROC") == 1  # only rank 0 prints


def test_two_processes_score_every_test_image_once(runs):
    _, two, _ = runs
    splits = pd.read_csv(two / "splits.csv")
    test_ids = splits.loc[splits["split"] == "test", "isic_id"]
    metrics = json.loads((two / "test" / "metrics.json").read_text())
    predictions = pd.read_csv(two / "test" / "predictions.csv")
    assert metrics["n"] == len(test_ids) == len(predictions)
    assert predictions["isic_id"].is_unique and set(predictions["isic_id"]) == set(test_ids)


def test_resume_needs_the_same_number_of_processes(runs):
    _, two, _ = runs
    result = subprocess.run([sys.executable, str(ROOT / "driver.py"), "--resume", str(two)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "trained by 2 process(es), not 1" in result.stderr and "Traceback" not in result.stderr
