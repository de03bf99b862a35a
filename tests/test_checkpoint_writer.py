"""Checkpoints written in the background (engine.checkpoints.CheckpointWriter, train.save_checkpoints): the file holds
the state at hand-over, one write at a time, a failed write reaches the training thread, a SIGKILL during a write
leaves the previous file loadable, and the training thread's share is a small part of a synchronous save."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import ROOT
from engine import checkpoints, timings
from engine.checkpoints import CheckpointWriter, load_checkpoint
from experiments.checkpoint_sizes import save_costs
from engine.config import Settings
from test_checkpoints import trained_state
from test_faults import HALF_SAVE
from train import TrainingState, save_checkpoints
from utils import UserError


def small_state() -> TrainingState:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainingState(model, None, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), epoch=1)


@pytest.fixture
def slow_writes(monkeypatch):
    """Every checkpoint write takes 0.3 s more; the number of writes in flight at once is tracked."""
    real, flight = checkpoints.save_checkpoint, {"now": 0, "most": 0, "written": []}

    def slow(path, checkpoint):
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        time.sleep(0.3)
        real(path, checkpoint)
        flight["written"].append((path.name, checkpoint["epoch"]))
        flight["now"] -= 1
    monkeypatch.setattr(checkpoints, "save_checkpoint", slow)
    return flight


def test_the_file_holds_the_state_at_hand_over_while_training_goes_on(tmp_path, slow_writes):
    state, s = small_state(), Settings()
    before = state.model.weight.detach().clone()
    with CheckpointWriter() as writer:
        save_checkpoints(writer, state, s, tmp_path, best=False, last=True)
        assert not writer.pending.done()  # handed over: the write goes on in the background
        with torch.no_grad():
            state.model.weight.add_(1.0)  # the next epoch's steps change the weights in place
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["weight"], before)


def test_one_write_in_flight_and_the_run_waits_for_the_last(tmp_path, slow_writes):
    state, s = small_state(), Settings()
    with CheckpointWriter() as writer:
        for epoch in (1, 2, 3):
            state.epoch = epoch
            save_checkpoints(writer, state, s, tmp_path, best=epoch != 2, last=True)
    assert slow_writes["most"] == 1
    assert slow_writes["written"] == [("best.pt", 1), ("last.pt", 1), ("last.pt", 2), ("best.pt", 3), ("last.pt", 3)]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3 and not list(tmp_path.glob(".*"))


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def full_disk(path, checkpoint):
        raise UserError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(checkpoints, "save_checkpoint", full_disk)
    with pytest.raises(UserError, match="cannot write .*last.pt: No space left on device"):
        with CheckpointWriter() as writer:
            save_checkpoints(writer, small_state(), Settings(), tmp_path, best=False, last=True)


@pytest.fixture
def one_thread():
    """On a small shared CPU, intra-op threads spin-wait for each other (docs/speed.md): a copy's time would then
    measure the machine's load, not the copy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_training_threads_share_of_saving_is_under_a_tenth_of_a_synchronous_save(tmp_path, one_thread):
    """ResNet18's full state (weights, average, AdamW moments: 184 MB in last.pt), saved as a run saves it, three
    times: the training thread's share (timings.json) against the same checkpoints written synchronously, side by
    side (experiments/checkpoint_sizes.py --rounds, whose figures are in docs/speed.md)."""
    s = Settings(backbone="resnet18", embedding_dim=16, epochs=4)
    share, synchronous = save_costs(trained_state(s), s, tmp_path, rounds=3)
    print(f"training thread's share {share:.3f} s, synchronous saves {synchronous:.3f} s: {share / synchronous:.3f}")
    assert share < 0.1 * synchronous
    note = {p["name"]: p["note"] for p in timings.read(tmp_path / "timings.json")}["training.checkpoint.epoch3"]
    assert note.startswith("best.pt, last.pt copied for the background writer (the previous write took")
    assert load_checkpoint(tmp_path / "background" / "last.pt")["epoch"] == 3


# A child writes last.pt of epoch 1, then hands epoch 2's to the writer, which is SIGKILLed halfway through the file.
KILLED_MID_WRITE = HALF_SAVE + r"""
import sys, time
from engine.checkpoints import CheckpointWriter
folder = sys.argv[1]
plant_half_save(2)
with CheckpointWriter() as writer:
    for epoch in (1, 2):
        state = {"epoch": epoch, "weights": torch.full((1000,), float(epoch))}
        writer.save({os.path.join(folder, "last.pt"): writer.snapshot(state)})
    time.sleep(60)  # the training thread goes on; the kill comes from the writer
"""


def test_sigkill_during_a_background_write_leaves_the_previous_file_loadable(tmp_path):
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and torch.equal(last["weights"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")
