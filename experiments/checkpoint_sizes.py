"""Sizes of best.pt and last.pt for a backbone, saved by the training loop's own end of epoch (no data, no training).

    python -m experiments.checkpoint_sizes --backbone resnet50

One optimiser step on random images gives AdamW its moments; the moving average is kept as in a default run.
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.config import Parser, Settings, add_settings
from modules import build_model
from train import TrainingState, build_optimizer, end_of_epoch, moving_average
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


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    add_settings(p, ["backbone", "embedding_dim", "ema"], default=None)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    s = Settings(**given, epochs=2)
    with tempfile.TemporaryDirectory() as folder:
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch line of a step that trained nothing
            end_of_epoch(one_step_state(s), dict(ROW), s, Path(folder), plotted=time.time())
        sizes = {name: (Path(folder) / name).stat().st_size / 1e6 for name in ("best.pt", "last.pt")}
    print(f"{s.backbone}, embedding {s.embedding_dim}, ema {s.ema}: best.pt {sizes['best.pt']:.1f} MB, "
          f"last.pt {sizes['last.pt']:.1f} MB")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
