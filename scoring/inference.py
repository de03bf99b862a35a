"""Inference: a saved run's model, and its predictions (probabilities, logits, embeddings) over a set of images."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import image_loader
from engine.augment import to_float
from engine.checkpoints import evaluation_weights, load_checkpoint
from engine.config import Settings
from engine.devices import autocast_dtype
from isic.tabular import metadata_width
from modules import build_model, look_stages, look_vector, stage_statistics
from utils import UserError


@dataclass
class Predictions:
    targets: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    embeddings: np.ndarray
    loss: float
    looks: np.ndarray | None = None  # modules.look_vector of each image, when asked for


@contextlib.contextmanager
def looks_of(net):
    """While open, the yielded list receives modules.look_vector of the images of each forward of `net` (a
    SiameseNet), from hooks on its look stages: one entry a forward, so 8 a batch under DihedralTTA."""
    channels_last = getattr(net.trunk, "output_fmt", "NCHW") == "NHWC"  # timm models that keep (B, H, W, C)
    statistics, looks = [], []
    hooks = [stage.register_forward_hook(lambda _, __, out: statistics.append(stage_statistics(out, channels_last)))
             for stage in look_stages(net.trunk)]

    def forward_done(*_):
        looks.append(look_vector(statistics))
        statistics.clear()
    hooks.append(net.register_forward_hook(forward_done))
    try:
        yield looks
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def evaluate(model, loader, device, amp_dtype=None, loss_fn=None, desc="evaluating", look_of=None) -> Predictions:
    """Score every image of `loader` in order, without augmentation. look_of: the SiameseNet inside `model` (itself,
    or the one DihedralTTA wraps) whose looks to return, each the mean over the views `model` shows it."""
    model.eval()
    targets, logits, embeddings, losses, looks = [], [], [], [], []
    batches = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
    with looks_of(look_of) if look_of is not None else contextlib.nullcontext() as views:
        for images, batch_targets, pair_labels, metadata in batches:
            images = to_float(images.to(device, non_blocking=True))
            batch_targets = batch_targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                batch_embeddings, batch_logits = model(images, metadata.to(device, non_blocking=True))
            if loss_fn is not None:
                batch_loss = loss_fn(batch_embeddings, batch_logits, batch_targets, pair_labels.to(device))[0]
                losses.append(batch_loss * len(batch_targets))
            targets.append(batch_targets)
            logits.append(batch_logits.float())
            embeddings.append(batch_embeddings.float())
            if views is not None:
                looks.append(torch.stack(views).mean(0))
                views.clear()
    logits = torch.cat(logits).cpu().numpy()
    return Predictions(
        targets=torch.cat(targets).cpu().numpy().astype(int),
        probabilities=1 / (1 + np.exp(-logits.astype(np.float64))),
        logits=logits,
        embeddings=torch.cat(embeddings).cpu().numpy(),
        loss=float(torch.stack(losses).sum() / len(logits)) if losses else float("nan"),
        looks=torch.cat(looks).cpu().numpy() if looks else None,
    )


def load_run(run_dir, device, checkpoint: str = "best.pt") -> tuple[Settings, torch.nn.Module]:
    """The settings and best (or another checkpoint's) model of a finished or interrupted run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    s = Settings.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = build_model(s, initial_weights=False, metadata_dim=metadata_width(run_dir, s))
    model.load_state_dict(evaluation_weights(load_checkpoint(run_dir / checkpoint)))
    return s, model.to(device).to(memory_format=torch.channels_last).eval()


def score(model, dataset, s, device) -> Predictions:
    """Every image of `dataset` scored in the device's precision, with its look when the run finds neighbours by
    look; compiled on a GPU when the run was (--compile). Elsewhere eagerly: a CPU that scores a GPU run's images
    may lack the C++ compiler that compiling needs there."""
    loader = image_loader(dataset, s.eval_batch_size, device, s.workers, shuffle=False)
    compiled = s.compile and device.type == "cuda"
    net = getattr(model, "model", model)  # the SiameseNet that DihedralTTA wraps, or the model itself
    return evaluate(torch.compile(model) if compiled else model, loader, device, autocast_dtype(device),
                    look_of=net if s.neighbours_by == "look" else None)
