"""Ensembles of runs (e.g. the folds of a cross-validation): their scores of the same images combined into one
prediction, written and reported like one run's.

Each member scores the images itself, at its own image size and with its own backbone, into a folder of its own
(predict.py: OUT/members/<k>-<run>/; the member's run folder is only read). The ensemble reads the members'
predictions.csv, takes the view asked for (plain, or TTA: probability_tta and the threshold val chose with TTA) and
combines them:
- mean: the average probability. Still a probability; the decision threshold is the average of the members' own
  (each chosen on that member's validation split).
- rank: the average over members of where the image's probability falls among that member's validation
  probabilities (0: below all of them, 1: above all, linear in between). Robust to members calibrated differently
  (other image sizes, backbones, epochs), and an image's score does not depend on the other images scored with it.
  A score, not a probability: no calibration is reported for it. The threshold is the average of the members'
  thresholds placed the same way.
Images any member trained or validated on (another dataset's seen_in_training.csv) are combined too, but listed
apart and left out of the metrics. Embedding scores (kNN, prototype) and neighbours stay per member: members have
different embedding spaces.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from isic.splits import SEEN
from reporting.reports import BOOTSTRAP, Scoring, prior_probability, write_labelled
from scoring.inference import Predictions
from scoring.metrics import auroc, partial_auc
from workflow.evaluation import SEEN_FILE
from utils import UserError, write_csv, write_json

HOW = ("mean", "rank")
COLUMN = {"plain": "probability", "tta": "probability_tta"}  # a member's scores of each view


@dataclass
class Member:
    run_dir: Path  # the trained run, only read
    scored: Path   # its predictions.csv of the scored images (and seen_in_training.csv)
    val: Path      # the val evaluation its threshold comes from: metrics.json and predictions.csv


def read_scores(member: Member, view: str) -> pd.DataFrame:
    """The member's scored images by isic_id, with `seen`: the member run's split for images it learnt from."""
    frames = [pd.read_csv(member.scored / "predictions.csv", dtype={"isic_id": str})]
    if (member.scored / SEEN_FILE).is_file():
        frames.append(pd.read_csv(member.scored / SEEN_FILE, dtype={"isic_id": str, "run_split": str})
                      .rename(columns={"run_split": "seen"}))
    frame = pd.concat(frames, ignore_index=True).sort_values("isic_id", ignore_index=True)
    if COLUMN[view] not in frame:
        raise UserError(f"{member.scored / 'predictions.csv'} has no {COLUMN[view]}: score it with the {view} view")
    return frame.assign(seen=frame["seen"].fillna("") if "seen" in frame else "")


def read_members(members: list[Member], view: str) -> list[pd.DataFrame]:
    """Each member's scores, rows in one order (by isic_id); every member must have scored the same images."""
    frames = [read_scores(m, view) for m in members]
    for member, frame in zip(members[1:], frames[1:]):
        if not frame["isic_id"].equals(frames[0]["isic_id"]):
            raise UserError(f"{member.scored} scored other images than {members[0].scored}: an ensemble needs the "
                            "same images (with --split, runs trained on the same splits.csv)")
    return frames


def val_metrics(member: Member, view: str) -> dict:
    path = member.val / "metrics.json"
    if not path.is_file():
        raise UserError(f"no threshold for {member.run_dir}: {path} is missing; evaluate its validation split first")
    m = json.loads(path.read_text())
    if view == "tta" and "tta" not in m:
        raise UserError(f"{path} has no TTA threshold: evaluate the validation split with --tta first")
    return m if view == "plain" else m["tta"]


def validation_scores(member: Member, view: str) -> np.ndarray:
    """The member's probabilities of its own validation images: the fixed scale a rank ensemble places images on."""
    path = member.val / "predictions.csv"
    if not path.is_file():
        raise UserError(f"{path} is missing: a rank ensemble places {member.run_dir}'s scores among its validation "
                        f"probabilities; evaluate its validation split again (predict.py --run {member.run_dir} "
                        "--split val)")
    frame = pd.read_csv(path)
    if COLUMN[view] not in frame:
        raise UserError(f"{member.val / 'predictions.csv'} has no {COLUMN[view]}: evaluate val with the {view} view")
    return frame[COLUMN[view]].to_numpy()


def place_among(reference, scores) -> np.ndarray:
    """Where each score falls among the reference scores, in [0, 1]: a reference value's mid-rank percentile
    (ties share it), linear in between, 0 below the lowest and 1 above the highest."""
    values, counts = np.unique(np.asarray(reference, dtype=float), return_counts=True)
    percentile = (np.cumsum(counts) - counts / 2) / counts.sum()
    return np.interp(np.asarray(scores, dtype=float), values, percentile, left=0.0, right=1.0)


def combine(scores: np.ndarray, thresholds: np.ndarray, how: str, references=None) -> tuple[np.ndarray, float]:
    """(members, images) probabilities and the members' thresholds → (ensemble score per image, its threshold).
    `references`: each member's validation probabilities, the scale of the rank ensemble."""
    if how == "mean":
        return scores.mean(0), float(thresholds.mean())
    placed = np.stack([place_among(r, p) for r, p in zip(references, scores)]).mean(0)
    return placed, float(np.mean([place_among(r, [t])[0] for r, t in zip(references, thresholds)]))


def member_columns(members: list[Member], scores: np.ndarray, view: str) -> dict:
    """probability[_tta]_<run folder name> per member (member1, member2, ... when the names repeat)."""
    names = [m.run_dir.resolve().name for m in members]
    if len(set(names)) < len(names):
        names = [f"member{i}" for i in range(1, len(members) + 1)]
    return {f"{COLUMN[view]}_{name}": s for name, s in zip(names, scores)}


def write_ensemble(members: list[Member], out_dir, how: str, s, view: str = "plain", groups_by_id=None,
                   prevalence: float = 0.5, resamples: int = BOOTSTRAP) -> dict | None:
    """OUT/predictions.csv (the ensemble beside each member's score) and, for labelled images, the metrics, report
    and plots of one run. Returns the metrics, or None for unlabelled images (then OUT/ensemble.json says how)."""
    out_dir = Path(out_dir)
    frames = read_members(members, view)
    scores = np.stack([f[COLUMN[view]].to_numpy(dtype=float) for f in frames])
    vals = [val_metrics(m, view) for m in members]
    thresholds = np.array([float(v["threshold"]) for v in vals])
    references = [validation_scores(m, view) for m in members] if how == "rank" else None
    score, threshold = combine(scores, thresholds, how, references)
    name = "probability" if how == "mean" else "rank_score"
    about = {"how": how, "view": view, "score": name, "threshold": threshold, "runs": [str(m.run_dir) for m in members],
             "members": member_records(members, vals, out_dir)}
    columns = member_columns(members, scores, view)
    table = pd.DataFrame({"isic_id": frames[0]["isic_id"], name: score,
                          "predicted_malignant": (score >= threshold).astype(int), **columns})
    if "target" not in frames[0]:
        write_new_images(out_dir, table, frames, about, prevalence)
        return None
    seen = np.any([f["seen"].to_numpy() != "" for f in frames], axis=0)
    if seen.any():  # scored by every member, but some member trained or validated on them: listed, not counted
        write_csv(out_dir / SEEN_FILE, table.assign(target=frames[0]["target"], seen_by=seen_by(frames))[seen])
    y, kept = frames[0]["target"].to_numpy().astype(int)[~seen], table[~seen]
    for record, p in zip(about["members"], scores):  # each member on the images the ensemble is measured on
        record |= {"auroc": auroc(y, p[~seen]), "pauc": partial_auc(y, p[~seen])}
    about |= {"gain_over_best_member": {key: metric(y, score[~seen]) - max(r[key] for r in about["members"])
                                        for key, metric in (("auroc", auroc), ("pauc", partial_auc))},
              "left_out_seen_in_training": int(seen.sum())}
    extra = {"ensemble": about, "threshold_chosen_on": "mean of the members' val thresholds" if how == "mean" else
             "mean of the members' val thresholds, each placed among its val probabilities"}
    scored = members[0].scored / "metrics.json"  # what the members scored: a split of their runs, or a dataset
    extra |= {k: v for k, v in (json.loads(scored.read_text()) if scored.is_file() else {}).items()
              if k in ("split", "dataset")}
    groups = None if groups_by_id is None else kept["isic_id"].map(groups_by_id).to_numpy()
    metrics = write_labelled({"plain": ensemble_scoring(y, score[~seen], threshold, how)}, kept["isic_id"].to_numpy(),
                             out_dir, s, extra, groups, prevalence, resamples)
    written = pd.read_csv(out_dir / "predictions.csv", dtype={"isic_id": str})
    write_csv(out_dir / "predictions.csv", written.assign(**{c: kept[c].to_numpy() for c in columns}))
    return metrics


def member_records(members: list[Member], vals: list[dict], out_dir: Path) -> list[dict]:
    """Each member's run, the folder its scores and report are in (relative to the ensemble's), its threshold and
    its AUROC and pAUC on its own validation split (where the threshold was chosen)."""
    return [{"run": str(m.run_dir), "folder": os.path.relpath(m.scored, out_dir), "threshold": float(v["threshold"]),
             "val_auroc": v.get("auroc"), "val_pauc": v.get("pauc")} for m, v in zip(members, vals)]


def write_new_images(out_dir: Path, table: pd.DataFrame, frames: list[pd.DataFrame], about: dict,
                     prevalence: float) -> None:
    """OUT/predictions.csv of new images (a mean's prior-corrected probability, as for a labelled set; each member's
    split of the images its splits.csv lists) and OUT/ensemble.json."""
    if about["how"] == "mean":
        corrected = prior_probability(as_prediction(np.zeros(len(table)), table["probability"].to_numpy()), prevalence)
        table.insert(2, "probability_prior_corrected", corrected)
    table["run_split"] = seen_by(frames, "run_split")
    seen = [any(split.split(":")[1] in SEEN for split in splits.split()) for splits in table["run_split"]]
    if any(seen):
        print(f"note: {sum(seen)} of {len(table)} images are in a member's own splits.csv as train or val, marked in "
              "the run_split column of predictions.csv (member:split)")
    write_csv(out_dir / "predictions.csv", table)
    write_json(out_dir / "ensemble.json", about)


def seen_by(frames: list[pd.DataFrame], column: str = "seen") -> list[str]:
    """Per image, the members whose splits.csv lists it and in which split, e.g. '1:train 3:val'; `column`: each
    member's split of the image ("seen": train or val only; "run_split" of new images: also test)."""
    splits = [f[column].fillna("").astype(str) if column in f else pd.Series("", index=f.index) for f in frames]
    return [" ".join(f"{k}:{split}" for k, split in enumerate(row, 1) if split) for row in zip(*splits)]


def ensemble_scoring(y, score, threshold: float, how: str) -> Scoring:
    """The ensemble as one scorer: a mean's probability keeps its log-odds (for the prior correction); a rank score
    is no probability."""
    return Scoring(as_prediction(y, score), threshold, is_probability=how == "mean")


def as_prediction(y, score) -> Predictions:
    """Ensemble scores as Predictions: a mean's probability keeps its log-odds (what the prior correction moves)."""
    clipped = np.clip(score, 1e-7, 1 - 1e-7)
    return Predictions(y, score, np.log(clipped / (1 - clipped)).astype(np.float32),
                       np.zeros((len(y), 0), np.float32), float("nan"))
