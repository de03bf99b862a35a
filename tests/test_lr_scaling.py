"""--lr-scaling linear: a larger batch gets a proportionally larger peak learning rate, and its batches stay half
benign, half malignant."""
import pytest
import torch

from dataset import prepare_data, train_loader
from engine.config import Settings
from train import build_optimizer, seed_epoch


def peak(s: Settings) -> float:
    model = torch.nn.Linear(3, 1)
    optimizer, scheduler = build_optimizer(model, s, steps_per_epoch=10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return max(lrs)


@pytest.mark.parametrize("scaling, batch, expected", [("none", 256, 1e-3), ("linear", 64, 1e-3),
                                                      ("linear", 128, 2e-3), ("linear", 256, 4e-3),
                                                      ("linear", 32, 5e-4)])
def test_linear_scaling_multiplies_the_peak_lr_by_the_batch_over_64(scaling, batch, expected):
    s = Settings(lr=1e-3, batch_size=batch, lr_scaling=scaling, epochs=2, warmup_epochs=0.5)
    assert peak(s) == pytest.approx(expected)


@pytest.mark.parametrize("batch", [32, 64])
def test_larger_batches_stay_half_benign_half_malignant(tiny_data, tmp_path, batch):
    s = Settings(data_dir=str(tiny_data), cache_dir=str(tmp_path), img_size=32, batch_size=batch, workers=0)
    loader = train_loader(prepare_data(s), s, torch.device("cpu"))
    seed_epoch(loader, s.seed, 1)
    counts = [int(targets.sum()) for _, targets, *_ in loader]
    assert counts and counts == [batch // 2] * len(counts)
