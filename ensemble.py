"""Ensembles of runs (e.g. the folds of a cross-validation): their probabilities on the same images combined into one
prediction, written and reported like one run's.

Each member scores the images itself, at its own image size and with its own backbone, into a folder of its own;
the ensemble reads the members' predictions.csv and combines them:
- mean: the average probability. Still a probability; the decision threshold is the average of the members' own
  (each chosen on that member's validation split).
- rank: the average of each member's rank percentile among the scored images. Robust to members that are calibrated
  differently (other image sizes, backbones, epochs), but a score, not a probability; the threshold calls as many
  images malignant as the members do on average at their own thresholds.
Embedding scores (kNN, prototype) and neighbours stay per member: members have different embedding spaces.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from inference import Predictions
from metrics import auroc, partial_auc
from reports import Scoring, write_labelled
from utils import UserError, write_csv

HOW = ("mean", "rank")


def read_members(folders) -> list[pd.DataFrame]:
    """Each member's predictions.csv, rows in one order (by isic_id); every member must have scored the same images."""
    members = [pd.read_csv(Path(f) / "predictions.csv", dtype={"isic_id": str}).sort_values("isic_id",
                                                                                              ignore_index=True)
               for f in folders]
    for folder, member in zip(folders[1:], members[1:]):
        if not member["isic_id"].equals(members[0]["isic_id"]):
            raise UserError(f"{folder} scored other images than {folders[0]}: an ensemble needs the same images "
                            "(with --split, runs trained on the same splits.csv)")
    return members


def combine(probabilities: np.ndarray, thresholds: np.ndarray, how: str) -> tuple[np.ndarray, float]:
    """(members, images) probabilities and the members' thresholds → (ensemble score per image, its threshold)."""
    if how == "mean":
        return probabilities.mean(0), float(thresholds.mean())
    ranks = np.stack([rankdata(p) / len(p) for p in probabilities]).mean(0)
    called = float(np.mean([(p >= t).mean() for p, t in zip(probabilities, thresholds)]))
    return ranks, float(np.quantile(ranks, 1 - called)) if called > 0 else float(ranks.max() + 1)


def member_threshold(folder, run_dir) -> float:
    """The threshold the member used: its val metrics' (a labelled set's metrics.json repeats it)."""
    for path in (Path(folder) / "metrics.json", Path(run_dir) / "val" / "metrics.json"):
        if path.is_file():
            return float(json.loads(path.read_text())["threshold"])
    raise UserError(f"no threshold for {run_dir}: evaluate its validation split first")


def write_ensemble(folders, run_dirs, out_dir, how: str, s, groups_by_id=None, prevalence: float = 0.5,
                   resamples: int = 1000) -> dict | None:
    """OUT/predictions.csv (the ensemble beside each member's probability) and, for labelled images, the metrics,
    report and plots of one run. Returns the metrics, or None for unlabelled images."""
    out_dir = Path(out_dir)
    members = read_members(folders)
    probabilities = np.stack([m["probability"].to_numpy() for m in members])
    thresholds = np.array([member_threshold(f, r) for f, r in zip(folders, run_dirs)])
    score, threshold = combine(probabilities, thresholds, how)
    ids = members[0]["isic_id"].to_numpy()
    names = [f"probability_{Path(r).name}" if Path(r).name else f"probability_{i}" for i, r in enumerate(run_dirs)]
    member_columns = dict(zip(names if len(set(names)) == len(names) else
                              [f"probability_member{i + 1}" for i in range(len(names))], probabilities))
    if "target" not in members[0]:
        write_csv(out_dir / "predictions.csv", pd.DataFrame({"isic_id": ids, "probability": score,
                                                             "predicted_malignant": (score >= threshold).astype(int),
                                                             **member_columns}))
        return None
    y = members[0]["target"].to_numpy().astype(int)
    logits = np.log(np.clip(score, 1e-7, 1 - 1e-7) / (1 - np.clip(score, 1e-7, 1 - 1e-7)))
    pred = Predictions(y, score, logits.astype(np.float32), np.zeros((len(y), 0), np.float32), float("nan"))
    extra = {"ensemble": {"how": how, "runs": [str(r) for r in run_dirs],
                          "members": [{"run": str(r), "auroc": auroc(y, p), "pauc": partial_auc(y, p),
                                       "threshold": float(t)}
                                      for r, p, t in zip(run_dirs, probabilities, thresholds)]},
             "threshold_chosen_on": "mean of the members' val thresholds" if how == "mean" else
             "the members' average share of images called malignant"}
    groups = None if groups_by_id is None else pd.Series(ids).map(groups_by_id).to_numpy()
    metrics = write_labelled({"plain": Scoring(pred, threshold)}, ids, out_dir, s, extra, groups, prevalence,
                             resamples)
    frame = pd.read_csv(out_dir / "predictions.csv", dtype={"isic_id": str})
    write_csv(out_dir / "predictions.csv", frame.assign(**member_columns))
    return metrics
