"""TensorBoard event files of a run, in RUN/tb (`tensorboard --logdir runs` compares every run under runs/).

Training curves per step and per epoch, the run's settings with its final AUROC and pAUC as HParams, the test
figures as images, and the test split's embeddings for the projector, each point drawn as its lesion's thumbnail.
Written by rank 0 alone; --no-tensorboard writes nothing. Every value is logged at the optimiser step it belongs to
(the scheduler's count), so curves per step and per epoch share one axis, and so does a resumed run.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins import projector
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

from dataset import image_loader
from engine.config import NOT_OUTCOME
from engine.distributed import is_main
from scoring.inference import score
from scoring.references import diagnosis_column
from scoring.retrieval import embedding_space
from utils import atomic_path

FOLDER = "tb"
STEP_VALUES = ("loss", "bce", "contrastive", "instance")  # the first columns of train_one_epoch's rows, in this order
FIGURES = ("roc", "pr", "calibration", "confusion_matrix", "gallery", "similar", "embeddings")
MODES = {"check_data", "check_images", "demo"}  # how a run was started: no columns of the HParams table
THUMBNAIL = 64  # pixels a side at most
SPRITE_LIMIT = 8192  # the projector loads the sprite as one WebGL texture: at most 8192 pixels a side


class Board:
    """The training curves: the loss, its parts and the learning rate at each host sync of an epoch (values already
    on the host), and every column of history.csv once per epoch."""

    def __init__(self, writer: SummaryWriter, scheduler, instance: bool = False):
        self.writer, self.scheduler = writer, scheduler
        self.values = STEP_VALUES if instance else STEP_VALUES[:3]  # the instance term only where it is trained

    def steps(self, window: np.ndarray) -> None:
        """`window`: train_one_epoch's rows (one per batch) since the last sync."""
        step = self.scheduler.last_epoch
        for i, name in enumerate(self.values):
            self.writer.add_scalar(f"step/{name}", float(window[:, i].mean()), step)
        self.writer.add_scalar("step/lr", self.scheduler.get_last_lr()[0], step)

    def epoch(self, row: dict) -> None:
        """Flushed at once: logged before last.pt records the epoch, so a resume never lacks it."""
        for name, value in row.items():
            if name != "epoch" and isinstance(value, numbers.Real):
                self.writer.add_scalar(f"epoch/{name}", value, self.scheduler.last_epoch)
        self.writer.flush()


@contextlib.contextmanager
def training_board(out_dir, s, scheduler):
    """A Board on rank 0 (None on the others and with --no-tensorboard). purge_step makes TensorBoard drop what an
    interrupted run logged after its last checkpoint: everything past the restored scheduler's step."""
    if not (s.tensorboard and is_main()):
        yield None
        return
    with SummaryWriter(Path(out_dir) / FOLDER, purge_step=scheduler.last_epoch + 1) as writer:
        yield Board(writer, scheduler, s.w_instance > 0)


def write_results(out_dir, s, model, data, device, step: int) -> None:
    """The end of a run, logged at `step` (one past its last optimiser step, so that a resume purges and rewrites
    it): the settings with the final val/test AUROC and pAUC as HParams, the test figures, and the projector of
    the test split (embedded once more here: evaluation keeps no embeddings of it)."""
    if not s.tensorboard:
        return
    out_dir = Path(out_dir)
    with SummaryWriter(out_dir / FOLDER) as writer:
        add_hparams(writer, s, final_metrics(out_dir), step)
        add_figures(writer, out_dir / "test", step)
    test = data.frame[data.frame["split"] == "test"]
    dataset = data.dataset("test", s.img_size)
    ids = test["isic_id"].to_numpy()
    add_projector(out_dir / FOLDER, "test", score(model, dataset, s, device), s, dataset, ids, test["target"],
                  diagnosis_column(s, ids), test["patient_id"])


def final_metrics(out_dir: Path) -> dict:
    """AUROC and pAUC of val/ and test/metrics.json, named as the HParams table shows them."""
    found = {}
    for split in ("val", "test"):
        metrics = json.loads((out_dir / split / "metrics.json").read_text())
        found.update({f"hparams/{split}_{name}": float(metrics[name]) for name in ("auroc", "pauc")})
    return found


def hparam_values(s) -> dict:
    """The settings that change what a run computes, as the types HParams takes (None as "none")."""
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value).lower()
            for name, value in s.to_dict().items() if name not in NOT_OUTCOME | MODES}


def add_hparams(writer: SummaryWriter, s, metrics: dict, step: int) -> None:
    for summary in hparams(hparam_values(s), metrics):  # experiment, session start, session end
        writer.file_writer.add_summary(summary, step)
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)


def add_figures(writer: SummaryWriter, folder: Path, step: int) -> None:
    for name in FIGURES:
        path = folder / f"{name}.png"
        if path.is_file():
            writer.add_image(f"test/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


# ---------------------------------------------------------------- the embedding projector

def add_projector(folder, tag: str, pred, s, dataset, ids, labels=None, diagnosis=None, patients=None) -> None:
    """Embeddings of scored images (`pred`, in `dataset`'s order) for the projector, with their metadata."""
    table = pd.DataFrame({"isic_id": np.asarray(ids)})
    if labels is not None:
        table["label"] = np.where(np.asarray(labels) == 1, "malignant", "benign")
    if diagnosis is not None and (pd.Series(diagnosis).fillna("") != "").any():
        table["diagnosis"] = pd.Series(diagnosis).fillna("").replace("", "unknown").to_numpy()
    table["probability"] = pred.probabilities
    if patients is not None:
        table["patient"] = pd.Series(patients).fillna("unknown").to_numpy()
    write_projector(folder, tag, embedding_space(pred.embeddings, s), table, dataset)


def write_projector(folder, tag: str, embeddings: np.ndarray, table: pd.DataFrame, dataset) -> None:
    """FOLDER/TAG/tensors.tsv, metadata.tsv (a header, then one row per image) and sprite.png (the thumbnails row
    by row in a square grid), and the projector_config.pbtxt that points to them.

    Written here rather than by SummaryWriter.add_embedding, which builds the sprite in float64: gigabytes for the
    tens of thousands of images a full dataset has."""
    folder, part = Path(folder), Path(folder) / tag
    with atomic_path(part / "tensors.tsv") as tmp:
        np.savetxt(tmp, embeddings, fmt="%.6g", delimiter="\t")
    with atomic_path(part / "metadata.tsv") as tmp:  # the projector splits lines on tabs and knows no quoting
        table.replace(r"[\t\r\n]", " ", regex=True).to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    side = thumbnail_side(len(table), dataset.size)
    with atomic_path(part / "sprite.png") as tmp:
        Image.fromarray(sprite(thumbnails(dataset, side))).save(tmp, format="PNG")
    config = other_embeddings(folder, tag)
    info = config.embeddings.add(tensor_name=tag, tensor_path=f"{tag}/tensors.tsv", metadata_path=f"{tag}/metadata.tsv")
    info.sprite.image_path = f"{tag}/sprite.png"
    info.sprite.single_image_dim.extend([side, side])
    projector.visualize_embeddings(str(folder), config)


def other_embeddings(folder: Path, tag: str) -> projector.ProjectorConfig:
    """The folder's projector config without `tag`'s entry: sets scored into the same folder before (predict.py
    --images and --data-dir into one --out) stay in the projector."""
    config, path = projector.ProjectorConfig(), folder / "projector_config.pbtxt"
    if path.is_file():
        text_format.Parse(path.read_text(), config)
    kept = [e for e in config.embeddings if e.tensor_name != tag]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    return config


def thumbnail_side(n: int, size: int) -> int:
    return min(THUMBNAIL, size, SPRITE_LIMIT // math.ceil(math.sqrt(n)))


def thumbnails(dataset, side: int) -> torch.Tensor:
    """Every image of `dataset` in its order, (N, 3, side, side) uint8."""
    parts = []
    for images, *_ in image_loader(dataset, 256, torch.device("cpu"), workers=0, shuffle=False):
        if images.shape[-1] != side:
            images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        parts.append(images)
    return torch.cat(parts)


def sprite(images: torch.Tensor) -> np.ndarray:
    """The images row by row in a square grid of ceil(sqrt(N)) a side, empty cells black: (H, W, 3) uint8."""
    columns = math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, nrow=columns, padding=0)
    square = torch.zeros((3, columns * images.shape[-2], columns * images.shape[-1]), dtype=torch.uint8)
    square[:, :grid.shape[1]] = grid
    return square.permute(1, 2, 0).numpy()
