"""Images held in the device's memory (--resident): the same batches, in the same order, with the same augmentation as
the loader's, so that a run gives the same results either way; and --save-every, which must not change them either."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

import driver
from conftest import tiny
from dataset import ResidentLoader, eval_loader, hold_on_device, prepare_data, train_loader
from engine import checkpoints
from engine.augment import BatchAugment, to_float
from engine.config import Settings
from train import seed_epoch
from utils import UserError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_data, tmp_path_factory):
    s = Settings(data_dir=str(tiny_data), cache_dir=str(tmp_path_factory.mktemp("cache")), img_size=32,
                 batch_size=16, eval_batch_size=8, workers=0)
    return s, prepare_data(s)


def augmented_epoch(loader, seed: int, epoch: int) -> list:
    """Every batch of one training epoch as the loop sees it: the four parts, and the images augmented."""
    seed_epoch(loader, seed, epoch)
    augment = BatchAugment()
    return [(*batch, augment(to_float(batch[0]))) for batch in loader]


def assert_same_batches(got: list, want: list):
    assert len(got) == len(want) > 1
    for g, w in zip(got, want):
        assert len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w))


def test_auto_keeps_the_loader_on_a_cpu_and_off_is_off(loaded):
    s, data = loaded
    assert hold_on_device(data, "auto", CPU) is data and hold_on_device(data, "off", CPU) is data
    assert not isinstance(train_loader(data, s, CPU), ResidentLoader)


def test_auto_keeps_the_loader_when_the_cache_would_take_over_half_the_free_gpu_memory(loaded, monkeypatch, capsys):
    s, data = loaded
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * data.cache.nbytes - 1, 80 * 2**30))
    assert hold_on_device(data, "auto", torch.device("cuda")) is data
    assert "images stay on the host: 0.0 GiB is more than 50% of the 0.0 GiB free on cuda" in capsys.readouterr().out


def test_resident_training_batches_are_the_loaders(loaded):
    """Same sampler draw, same images, same order, and the same augmentation drawn from the same random stream."""
    s, data = loaded
    resident = hold_on_device(data, "on", CPU)
    assert isinstance(resident.resident, torch.Tensor) and not np.shares_memory(resident.resident.numpy(), data.cache)
    for epoch in (1, 2):
        want = augmented_epoch(train_loader(data, s, CPU), s.seed, epoch)
        got = augmented_epoch(train_loader(resident, s, CPU), s.seed, epoch)
        assert isinstance(train_loader(resident, s, CPU), ResidentLoader)
        assert_same_batches(got, want)
    assert not torch.equal(got[0][0], augmented_epoch(train_loader(data, s, CPU), s.seed, 3)[0][0])  # epochs differ


@pytest.mark.parametrize("split", ["val", "test", "train"])
def test_resident_evaluation_batches_are_the_loaders(loaded, split):
    s, data = loaded
    want = list(eval_loader(data, split, s, CPU))
    got = list(eval_loader(hold_on_device(data, "on", CPU), split, s, CPU))
    assert_same_batches(got, want)
    assert sum(len(batch[1]) for batch in got) == int((data.frame["split"] == split).sum())  # the partial last one too


def test_resident_on_without_the_cache_is_one_clear_error(loaded):
    with pytest.raises(UserError, match="--resident on holds the image cache in the device's memory: drop --no-cache"):
        hold_on_device(dataclasses.replace(loaded[1], cache=None), "on", CPU)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The same tiny 2-epoch run twice in this process: as by default (the loader, last.pt every epoch), and with the
    images held in memory and --save-every 2; the epochs of every last.pt written, recorded."""
    root = tmp_path_factory.mktemp("resident-runs")
    written = {}
    real = checkpoints.save_checkpoint

    def recording(path, checkpoint):
        written.setdefault(path.parent.name, []).append((path.name, checkpoint["epoch"]))
        real(path, checkpoint)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", recording)
        torch.set_num_threads(1)  # on a small shared CPU, threads that spin-wait for each other make a run crawl
        for name, extra in (("loader", []), ("resident", ["--resident", "on", "--save-every", "2"])):
            code = driver.main(["--data-dir", str(tiny_data), "--cache-dir", str(root / "cache"), "--out",
                                str(root / name), "--no-tensorboard", *tiny(2), *extra])
            assert code == 0
    torch.set_num_threads(threads)
    return root / "loader", root / "resident", written


@pytest.mark.slow
def test_a_run_from_resident_images_matches_the_loaders_run(runs):
    loader, resident, _ = runs
    history = [pd.read_csv(run / "history.csv").drop(columns="seconds") for run in (loader, resident)]
    pd.testing.assert_frame_equal(history[0], history[1], check_exact=True)
    for split in ("val", "test"):
        for name in ("metrics.json", "predictions.csv"):
            assert (loader / split / name).read_text() == (resident / split / name).read_text(), (split, name)
    assert json.loads((resident / "config.json").read_text())["resident"] == "on"


@pytest.mark.slow
def test_save_every_writes_last_pt_every_n_epochs_and_after_the_last(runs):
    _, _, written = runs
    last = {run: [epoch for name, epoch in files if name == "last.pt"] for run, files in written.items()}
    assert last == {"loader": [0, 1, 2], "resident": [0, 2]}
    best = {run: [epoch for name, epoch in files if name == "best.pt"] for run, files in written.items()}
    assert best["resident"] == best["loader"] and best["loader"][0] == 1  # best.pt still follows validation
