"""Checkpoints: plain-typed dicts saved atomically, loaded with weights_only, with a format version for resuming.

last.pt holds the whole training state: the weights, their moving average, the optimiser, schedule and scaler, the
epoch's record and every random state (train.TrainingState.state_dict); resuming needs this exact format. best.pt holds
only what scoring needs (evaluation_checkpoint): the weights that were validated, the settings and the epoch, a quarter
of the size. Any checkpoint whose weights fit the model evaluates, a best.pt holding a full training state too.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from utils import UserError, atomic_path

# Raise when the training state changes shape (optimiser groups, random states): older files cannot be resumed.
FORMAT = 2


def save_checkpoint(path, checkpoint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load with weights_only=True: a file that would run pickled code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain Python types
        found = re.search(r"Unsupported [^.]*", str(e))
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code when loaded "
                        f"({found[0] if found else 'not plain tensors'}); load only checkpoints this pipeline wrote, "
                        f"or state dicts of plain tensors") from None
    except Exception as e:  # truncated, corrupted, or not a PyTorch file at all
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({first})") from None


def require_resumable(checkpoint: dict, path) -> None:
    """Refuse, in one line, a checkpoint written in another format: its training state would not load faithfully."""
    found = checkpoint.get("format", 1)  # format 1 had no version field
    if found != FORMAT:
        age = "an older" if isinstance(found, int) and found < FORMAT else "another"
        raise UserError(f"{path} was written by {age} version of this pipeline (checkpoint format {found}, this one "
                        f"reads {FORMAT}) and cannot be resumed; its best.pt still evaluates with predict.py")


def evaluation_checkpoint(checkpoint: dict) -> dict:
    """best.pt: the validated weights (the moving average when the run kept one) under "model", with the settings and
    the epoch's record; no optimiser, no second copy of the weights, no random states."""
    return {"format": FORMAT, "contents": "evaluation", "model": evaluation_weights(checkpoint),
            **{key: checkpoint[key] for key in ("epoch", "best", "settings", "precision")}}


def evaluation_weights(checkpoint: dict) -> dict:
    """The weights that were validated: the moving average when the run kept one, else the trained weights."""
    return checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]
