"""Evaluation: score a run's val/test split, another labelled dataset or new images with every scorer (head, kNN,
prototype; with TTA when asked), choosing the threshold and k on val and reusing them everywhere else."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from augment import DihedralTTA
from dataset import ImageDataset, load_images
from explain import write_gallery
from inference import Predictions, score
from metadata import IMAGE_EXTENSIONS, find_layout, load_metadata
from metrics import auroc, partial_auc, youden_threshold
from reports import BOOTSTRAP, Scoring, write_labelled
from retrieval import embedding_space, knn_scores, prototype_scores
from splits import read_splits
from utils import UserError, write_csv

K_GRID = (5, 15, 45, 135)  # neighbours tried for the kNN score; the best on validation is kept


def scoring(pred: Predictions, reference: Predictions | None, s, chosen: dict | None) -> Scoring:
    """Choose the threshold (Youden's J) and k here when `chosen` is None (the val split), else reuse val's."""
    if chosen is None:
        threshold = youden_threshold(pred.targets, pred.probabilities)
    else:
        threshold = chosen["threshold"]
    if reference is None:
        return Scoring(pred, threshold)
    train, query = embedding_space(reference.embeddings, s), embedding_space(pred.embeddings, s)
    if chosen is None:
        by_k = knn_scores(train, reference.targets, query, K_GRID)
        metric = auroc if s.select_metric == "auroc" else partial_auc
        k = max(by_k, key=lambda k: metric(pred.targets, by_k[k]))
    else:
        k = chosen["scorers"]["knn"]["k"]
        by_k = knn_scores(train, reference.targets, query, [k])
    return Scoring(pred, threshold, {"knn": by_k[k], "prototype": prototype_scores(train, reference.targets, query)}, k)


def read_val_metrics(run_dir) -> dict:
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: evaluate the validation split first (predict.py --run {run_dir} --split val)")
    return json.loads(path.read_text())


def decision_threshold(run_dir) -> float:
    return read_val_metrics(run_dir)["threshold"]


def train_prevalence(run_dir) -> float:
    """The malignant rate of the run's training split: the prior that prior-corrected probabilities assume."""
    splits = read_splits(Path(run_dir) / "splits.csv")
    return float(splits.loc[splits["split"] == "train", "target"].mean())


def views(model, tta: bool) -> dict:
    return {"plain": model, "tta": DihedralTTA(model)} if tta else {"plain": model}


def train_references(model, data, s, device, tta: bool) -> dict:
    """The training split's predictions (no augmentation; also with TTA when asked): what kNN and prototypes use."""
    train = data.dataset("train", s.img_size)
    return {view: score(scorer, train, s, device) for view, scorer in views(model, tta).items()}


def evaluate_split(run_dir, split: str, s, model, data, device, tta: bool = False, resamples: int = BOOTSTRAP,
                   references: dict | None = None) -> dict:
    """Evaluate the run's own val or test split. The threshold (Youden's J) and the kNN's k are chosen on val and
    reused for test; kNN and prototype scores compare with the training split's embeddings (`references`)."""
    run_dir = Path(run_dir)
    references = references or train_references(model, data, s, device, tta)
    val = None if split == "val" else read_val_metrics(run_dir)
    dataset = data.dataset(split, s.img_size)
    scorings = {}
    for view, scorer in views(model, tta).items():
        chosen = None if val is None else val if view == "plain" else val["tta"]
        scorings[view] = scoring(score(scorer, dataset, s, device), references[view], s, chosen)
    part = data.frame[data.frame["split"] == split]
    ids = part["isic_id"].to_numpy()
    prevalence = float(data.frame.loc[data.frame["split"] == "train", "target"].mean())
    plain = scorings["plain"]
    write_gallery(model, dataset, ids, plain.pred, plain.threshold, run_dir / split / "gallery.png", device)
    extra = {"split": split, "threshold_chosen_on": "val (Youden's J)"}
    return write_labelled(scorings, ids, run_dir / split, s, extra, part["patient_id"].to_numpy(), prevalence,
                          resamples)


def evaluate_run(run_dir, s, model, data, device, tta: bool = False, resamples: int = BOOTSTRAP) -> dict:
    """The end of training: val (fixes the threshold and k), then test. Returns the test metrics."""
    references = train_references(model, data, s, device, tta)
    evaluate_split(run_dir, "val", s, model, data, device, tta, resamples, references)
    return evaluate_split(run_dir, "test", s, model, data, device, tta, resamples, references)


def predict_images(folder, out_dir, s, model, device, threshold: float) -> pd.DataFrame:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise UserError(f"no .jpg, .jpeg or .png images in {folder}")
    frame = pd.DataFrame({"isic_id": [f.stem for f in files], "target": 0})
    paths, cache, bad = load_images(frame, folder, s)
    dataset = ImageDataset(np.arange(len(files)), np.zeros(len(files)), paths, s.img_size, cache)
    pred = score(model, dataset, s, device)
    result = pd.DataFrame({"isic_id": frame["isic_id"], "probability": pred.probabilities,
                           "predicted_malignant": (pred.probabilities >= threshold).astype(int)})
    result = result[~result["isic_id"].isin(bad)]
    write_csv(Path(out_dir) / "predictions.csv", result)
    return result


def predict_dataset(data_dir, csv, image_dir, out_dir, s, model, device, threshold: float, prevalence: float,
                    resamples: int = BOOTSTRAP) -> dict:
    """Every row of another labelled dataset. No kNN/prototype scores: they need the run's training images."""
    csv_path, image_dir = find_layout(data_dir, csv, image_dir)
    frame = load_metadata(csv_path)
    paths, cache, bad = load_images(frame, image_dir, s)
    rows = np.flatnonzero(~frame["isic_id"].isin(bad).to_numpy())
    dataset = ImageDataset(rows, frame["target"].to_numpy()[rows], paths, s.img_size, cache)
    pred = score(model, dataset, s, device)
    ids = frame["isic_id"].to_numpy()[rows]
    write_gallery(model, dataset, ids, pred, threshold, Path(out_dir) / "gallery.png", device)
    extra = {"dataset": str(csv_path), "threshold_chosen_on": "val of the run (Youden's J)"}
    return write_labelled({"plain": Scoring(pred, threshold)}, ids, out_dir, s, extra,
                          frame["patient_id"].to_numpy()[rows], prevalence, resamples)


def needs_val(run_dir, tta: bool) -> bool:
    """Whether val must be (re)evaluated first: test reuses val's threshold and k (and their TTA versions)."""
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        return True
    val = json.loads(path.read_text())
    return "scorers" not in val or (tta and "tta" not in val)
