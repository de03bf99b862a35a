"""torchrun: a 2-process DistributedDataParallel run on CPU (gloo) writes what a one-process run writes, and scores
every test image exactly once."""
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch.distributed as dist

from conftest import ROOT, in_process, tiny
from engine.checkpoints import load_checkpoint
from isic.demo import make_dataset
from isic.tabular import ENCODER_FILE

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="this PyTorch build has no torch.distributed with the gloo backend"),
              pytest.mark.slow]  # every test here trains

TINY = [*tiny(2), "--tta"]  # the flags of conftest.finished_run
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # = torchrun


def launch(command, data, out, cache):
    # One thread per process: two ranks share the cores without oversubscribing them.
    result = subprocess.run([*command, str(ROOT / "driver.py"), "--data-dir", str(data), "--out", str(out),
                             "--cache-dir", str(cache), *TINY], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny_data, finished_run, tmp_path_factory):
    """The session's run (one process) and the same command under torchrun with two processes."""
    one, two = finished_run[0], tmp_path_factory.mktemp("distributed") / "two"
    return one, two, launch(TORCHRUN, tiny_data, two, one.parent / "cache")


def files(folder):
    """Every file's path; a TensorBoard event file's name holds its time, host and process, so only its folder counts."""
    names = (re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", str(p.relative_to(folder)))
             for p in folder.rglob("*") if p.is_file())
    return sorted(names)


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


def test_resume_needs_the_same_number_of_processes(runs, capsys):
    _, two, _ = runs
    assert in_process("driver.py", "--resume", two) == 2
    assert "trained by 2 process(es), not 1" in capsys.readouterr().err


def test_other_ranks_read_the_metadata_encoder_rank_0_wrote_for_this_run(tmp_path):
    """Rank 0 writes metadata_encoder.json 3 s late (tests/failing_rank.py), over a previous run's folder holding
    another encoder: the other ranks wait for it rather than read the old one, or none."""
    data = make_dataset(tmp_path / "data", n_images=80, malignant_rate=0.3, size=32, seed=4)
    ids = pd.read_csv(data / "train-metadata.csv")["isic_id"]
    pd.DataFrame({"image_name": ids, "age_approx": 50, "sex": ["male", "female"] * 40,
                  "anatom_site_general_challenge": ["torso", "head/neck", "lower extremity", None] * 20}
                 ).to_csv(tmp_path / "facts.csv", index=False)
    previous = tmp_path / "run"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    (previous / ENCODER_FILE).write_text(json.dumps({"columns": {"sex": "sex"}, "age_mean": 0.0, "age_scale": 1.0,
                                                     "categories": {"sex": ["female", "male", "unknown"]}}))
    result = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "failing_rank.py"), "--data-dir", str(data),
                             "--out", str(previous), "--overwrite", "--cache-dir", str(tmp_path / "cache"),
                             "--metadata", "age,sex,site", "--extra-csv", str(tmp_path / "facts.csv"), *tiny(1)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FAIL": "slow-encoder"})
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = json.loads((previous / ENCODER_FILE).read_text())
    assert list(encoder["columns"]) == ["age", "sex", "site"]
