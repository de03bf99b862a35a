"""Sizes of best.pt and last.pt for a backbone, saved by the training loop's own end of epoch (no data, no training),
and what saving them costs the training thread.

    python -m experiments.checkpoint_sizes --backbone resnet50
    python -m experiments.checkpoint_sizes --backbone resnet18 --rounds 3   # also: background against synchronous

One optimiser step on random images gives AdamW its moments; the moving average is kept as in a default run. With
--rounds, best.pt and last.pt are saved as the training loop saves them (train.save_checkpoints: a snapshot handed to
the background writer) and, side by side, synchronously as one call of save_checkpoint each, that many times; the
training thread's share is read from timings.json. The first hand-over, which allocates the snapshot's memory (in a
run: the epoch-0 last.pt, before training), is not counted.
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import timings
from engine.checkpoints import CheckpointWriter, evaluation_checkpoint, save_checkpoint
from engine.config import COUNT, Parser, Settings, add_settings
from modules import build_model
from train import TrainingState, build_optimizer, end_of_epoch, moving_average, save_checkpoints
from utils import cli_main

ROW = dict(epoch=1, train_loss=0.0, train_bce=0.0, train_contrastive=0.0, val_loss=0.0, val_auroc=0.5, val_pauc=0.02,
           val_accuracy=0.5, lr=0.0, seconds=0.0)


def one_step_state(s: Settings) -> TrainingState:
    model = build_model(s, initial_weights=False)
    optimizer, scheduler = build_optimizer(model, s, steps_per_epoch=100)
    state = TrainingState(model, moving_average(model, s.ema, s.epochs * 100), optimizer, scheduler,
                          torch.amp.GradScaler("cpu", enabled=False))
    model(torch.rand(2, 3, 64, 64))[1].sum().backward()
    optimizer.step()
    if state.ema is not None:
        state.ema.update_parameters(model)
    return state


def save_costs(state: TrainingState, s: Settings, folder: Path, rounds: int) -> tuple[float, float]:
    """(seconds of the training thread's share, seconds of synchronous saves) over `rounds` saves of best.pt and
    last.pt, after a first hand-over that is not counted."""
    synchronous = 0.0
    with timings.recording(folder / "timings.json"), CheckpointWriter() as writer:
        for epoch in range(rounds + 1):
            state.epoch = epoch
            save_checkpoints(writer, state, s, folder / "background", best=True, last=True)
            writer.wait()  # the write alone, not beside the synchronous one
            started, checkpoint = time.perf_counter(), state.state_dict(s)
            save_checkpoint(folder / "synchronous" / "best.pt", evaluation_checkpoint(checkpoint))
            save_checkpoint(folder / "synchronous" / "last.pt", checkpoint)
            synchronous += (time.perf_counter() - started) * (epoch > 0)
    phases = {p["name"]: p["seconds"] for p in timings.read(folder / "timings.json")}
    return sum(phases[f"training.checkpoint.epoch{epoch}"] for epoch in range(1, rounds + 1)), synchronous


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    add_settings(p, ["backbone", "embedding_dim", "ema"], default=None)
    p.add_argument("--rounds", type=COUNT, help="also time this many background and synchronous saves")
    args = vars(p.parse_args(argv))
    rounds = args.pop("rounds")
    given = {k: v for k, v in args.items() if v is not None}
    s = Settings(**given, epochs=2)
    with tempfile.TemporaryDirectory() as folder:
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch line of a step that trained nothing
            end_of_epoch(one_step_state(s), dict(ROW), s, Path(folder), plotted=time.time())
        sizes = {name: (Path(folder) / name).stat().st_size / 1e6 for name in ("best.pt", "last.pt")}
    print(f"{s.backbone}, embedding {s.embedding_dim}, ema {s.ema}: best.pt {sizes['best.pt']:.1f} MB, "
          f"last.pt {sizes['last.pt']:.1f} MB")
    if rounds:
        with tempfile.TemporaryDirectory() as folder:
            share, synchronous = save_costs(one_step_state(s), s, Path(folder), rounds)
        print(f"saving best.pt and last.pt {rounds} times, {torch.get_num_threads()} thread(s): the training thread's "
              f"share {share:.3f} s, synchronous saves {synchronous:.3f} s, ratio {share / synchronous:.3f}")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
