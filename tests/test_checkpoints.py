"""best.pt holds what scoring needs, last.pt the whole training state; a best.pt holding a full state (as older runs
wrote it) still evaluates."""
import json
import time

import torch

from engine.checkpoints import load_checkpoint, save_checkpoint
from engine.config import Settings
from modules import build_model
from scoring.inference import load_run
from train import TrainingState, build_optimizer, end_of_epoch, moving_average

ROW = dict(epoch=1, train_loss=1.0, train_bce=0.5, train_contrastive=0.5, val_loss=1.0, val_auroc=0.7, val_pauc=0.05,
           val_accuracy=0.6, lr=1e-3, seconds=1.0)


def trained_state(s) -> TrainingState:
    """Two optimiser steps: the optimiser has its moments and the moving average differs from the weights."""
    model = build_model(s, initial_weights=False)
    optimizer, scheduler = build_optimizer(model, s, steps_per_epoch=4)
    state = TrainingState(model, moving_average(model, 0.5, 100), optimizer, scheduler,
                          torch.amp.GradScaler("cpu", enabled=False))
    for _ in range(2):
        loss = model(torch.rand(4, 3, 32, 32))[1].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        state.ema.update_parameters(model)
    return state


def tensor_bytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def test_best_pt_holds_the_validated_weights_and_last_pt_the_whole_state(tmp_path):
    s = Settings(backbone="resnet18", embedding_dim=16, epochs=2)
    state = trained_state(s)
    end_of_epoch(state, dict(ROW), s, tmp_path, plotted=time.time())
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert set(best) == {"format", "contents", "model", "epoch", "best", "settings", "precision"}
    assert {"model", "ema", "optimizer", "scheduler", "rng", "history"} <= set(last)
    average = state.ema.module.state_dict()
    assert best["model"].keys() == average.keys()
    assert all(torch.equal(best["model"][k], average[k]) for k in average)  # the weights that were validated
    assert not torch.equal(best["model"]["head.weight"], state.model.state_dict()["head.weight"])
    assert (best["epoch"], best["best"]["epoch"], best["settings"]["backbone"]) == (1, 1, "resnet18")
    one_copy = tensor_bytes(average)
    assert (tmp_path / "best.pt").stat().st_size < 1.02 * one_copy + 50_000
    assert (tmp_path / "last.pt").stat().st_size > 3.9 * one_copy  # weights, average, two optimiser moments


def test_a_resnet18_best_pt_is_under_50_mb():
    """best.pt is one copy of the weights (above): for ResNet18 with the default embedder, under 50 MB."""
    assert tensor_bytes(build_model(Settings(backbone="resnet18"), initial_weights=False).state_dict()) < 50e6


def test_a_best_pt_holding_the_full_state_still_evaluates(tmp_path):
    s = Settings(backbone="resnet18", embedding_dim=16, epochs=2)
    state = trained_state(s)
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    save_checkpoint(tmp_path / "best.pt", state.state_dict(s))
    _, model = load_run(tmp_path, torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.ema.module.state_dict().items())
