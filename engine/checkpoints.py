"""Checkpoints: plain-typed dicts saved atomically, loaded with weights_only, with a format version for resuming.

last.pt holds the whole training state: the weights, their moving average, the optimiser, schedule and scaler, the
epoch's record and every random state (train.TrainingState.state_dict); resuming needs this exact format. best.pt holds
only what scoring needs (evaluation_checkpoint): the weights that were validated, the settings and the epoch, a quarter
of the size. Any checkpoint whose weights fit the model evaluates, a best.pt holding a full training state too.
"""
from __future__ import annotations

import pickle
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from utils import UserError, atomic_path

# Raise when the training state changes shape (optimiser groups, random states): older files cannot be resumed.
FORMAT = 2


def save_checkpoint(path, checkpoint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def snapshot(checkpoint, into=None):
    """A copy of a checkpoint that later training steps cannot change: every tensor copied to the CPU (into pinned
    memory from a GPU), the containers rebuilt (the other values are immutable, or fresh objects made by state_dict).
    `into`, an earlier snapshot of the same structure that is no longer used, lends its tensors: copying into memory
    already mapped costs a fraction of allocating it anew."""
    if isinstance(checkpoint, torch.Tensor):
        reusable = isinstance(into, torch.Tensor) and into.shape == checkpoint.shape and into.dtype == checkpoint.dtype
        target = into if reusable else torch.empty_like(checkpoint, device="cpu", pin_memory=checkpoint.is_cuda)
        return target.copy_(checkpoint.detach())
    if isinstance(checkpoint, dict):
        into = into if isinstance(into, dict) else {}
        return {key: snapshot(value, into.get(key)) for key, value in checkpoint.items()}
    if isinstance(checkpoint, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(checkpoint) else [None] * len(checkpoint)
        return type(checkpoint)(snapshot(value, old) for value, old in zip(checkpoint, into))
    return checkpoint


class CheckpointWriter:
    """Writes checkpoints in a background thread while training goes on.

    At most one write is in flight: a new one, and leaving the `with` block, wait for it first. Each file is written
    atomically (save_checkpoint), so a kill during a write leaves the previous file whole. A write that failed is
    raised in the training thread at the next wait. One thread serves every write: handing a write over costs the
    training thread nothing but a queue entry (starting a thread per write cost it up to 0.3 s on a busy CPU)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending, self.seconds = None, 0.0  # the write in flight (a Future); the last finished write's duration
        self.copy = None  # the last snapshot, whose memory the next one reuses once its write is done

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        try:
            self.wait(raise_error=kind is None)  # an exception already on its way is not hidden by a failed write
        finally:
            self.pool.shutdown()

    def snapshot(self, checkpoint: dict) -> dict:
        """Wait for the write in flight, then copy `checkpoint` (snapshot) into the memory of the one it wrote."""
        self.wait()
        self.copy = snapshot(checkpoint, into=self.copy)
        return self.copy

    def save(self, files: dict) -> None:
        """Write {path: checkpoint} in the background, in that order; the checkpoints must be made of self.snapshot's
        copy (or of another snapshot)."""
        self.wait()
        self.pending = self.pool.submit(self._write, files)

    def _write(self, files: dict) -> None:
        started = time.perf_counter()
        for path, checkpoint in files.items():
            save_checkpoint(path, checkpoint)
        self.seconds = time.perf_counter() - started

    def wait(self, raise_error: bool = True) -> None:
        pending, self.pending = self.pending, None
        error = pending.exception() if pending is not None else None  # waits for the write to end
        if error is not None and raise_error:
            raise error


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
