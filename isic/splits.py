"""The leakage-free split: images of one patient (and listed duplicate pairs) never straddle train/val/test.

splits.csv records each image's split, its leakage group and the split unit; every later step reuses it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from isic.metadata import load_duplicates
from utils import UserError, write_csv

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["isic_id", "patient_id", "target", "split", "group", "split_by"]  # splits.csv


def leakage_groups(frame: pd.DataFrame, duplicate_pairs=()) -> np.ndarray:
    """Group label per row: images of one patient, and images listed as duplicates, share a group."""
    n = len(frame)
    position = {image_id: i for i, image_id in enumerate(frame["isic_id"])}
    rows, cols = [], []
    patients = frame["patient_id"]
    known = patients.notna().to_numpy()
    if known.any():
        codes = pd.factorize(patients[known])[0]
        members = np.flatnonzero(known)
        first_of_patient = members[np.unique(codes, return_index=True)[1]][codes]
        rows += list(members)
        cols += list(first_of_patient)
    for a, b in duplicate_pairs:
        if a in position and b in position:
            rows.append(position[a])
            cols.append(position[b])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def split_frame(frame: pd.DataFrame, split_by="patient", val_frac=0.15, test_frac=0.10, seed=42,
                duplicate_pairs=()) -> pd.Series:
    """Stratified train/val/test labels. With split_by='patient', no patient or duplicate pair spans two splits."""
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise UserError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in (0, 1) and sum below 1")
    y = frame["target"].to_numpy()
    index = np.arange(len(frame))
    val_of_rest = val_frac / (1 - test_frac)
    if split_by == "image":
        need = math.ceil(1 / min(test_frac, val_frac))
        _require_positives(y, need, "images")
        rest, test = train_test_split(index, test_size=test_frac, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=val_of_rest, stratify=y[rest], random_state=seed)
    else:
        groups = leakage_groups(frame, duplicate_pairs)
        test_folds, val_folds = round(1 / test_frac), round(1 / val_of_rest)
        _require_positives(y, max(test_folds, val_folds), "patients", groups)
        rest, test = one_group_fold(index, y, groups, test_folds, seed)
        train, val = one_group_fold(rest, y[rest], groups[rest], val_folds, seed)
    split = np.empty(len(frame), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    split = pd.Series(split, index=frame.index, name="split")
    require_both_classes(frame["target"], split)
    return split


def require_both_classes(target: pd.Series, split: pd.Series) -> None:
    for name in SPLITS:
        if target[split == name].nunique() < 2:
            raise UserError(f"the {name} split got only one class; add malignant images or change the fractions")


def one_group_fold(index, y, groups, n_folds, seed):
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    keep, held_out = next(folds.split(index, y, groups))
    return index[keep], index[held_out]


def fold_splits(frame: pd.DataFrame, groups: np.ndarray, folds: int, seed: int, val_frac: float = 0.15):
    """Yield one split column per fold: test = that fold's leakage groups (patients, duplicate pairs); val/train
    split the rest by group."""
    y = frame["target"].to_numpy()
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for rest, test in outer.split(frame, y, groups):
        train, val = one_group_fold(rest, y[rest], groups[rest], round((1 - 1 / folds) / val_frac), seed)
        split = np.empty(len(frame), dtype=object)
        split[train], split[val], split[test] = "train", "val", "test"
        yield split


def rotating_val_splits(split: pd.Series, y: np.ndarray, groups: np.ndarray, folds: int, seed: int):
    """Yield one split column per fold that keeps `split`'s test rows and makes each fold of the rest (by leakage
    group) the validation split once: members of an ensemble that all leave the same test split unseen."""
    rest = np.flatnonzero((split != "test").to_numpy())
    for keep, held_out in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            rest, y[rest], groups[rest]):
        column = split.to_numpy().copy()
        column[rest[keep]], column[rest[held_out]] = "train", "val"
        yield column


def _require_positives(y, need: int, unit: str, groups=None) -> None:
    have = int(y.sum()) if groups is None else len(np.unique(groups[y == 1]))
    if have < need:
        raise UserError(f"only {have} malignant {unit}: a stratified train/val/test split with these fractions "
                        f"needs at least {need}")


def split_unit(frame: pd.DataFrame, split_by: str, duplicate_pairs) -> str:
    """What no two splits may share: 'patient+duplicates', 'patient', 'duplicates' or 'image' (a plain split)."""
    if split_by == "image":
        return "image"
    parts = []
    if frame["patient_id"].notna().any():
        parts.append("patient")
    if len(duplicate_pairs):
        parts.append("duplicates")
    return "+".join(parts) or "image"


def split_rows(frame: pd.DataFrame, s) -> pd.DataFrame:
    """The frame with its split, its leakage group and the split unit: the columns splits.csv records."""
    pairs = load_duplicates(s.duplicates) if s.duplicates else []
    unit = split_unit(frame, s.split_by, pairs)
    by = "image" if unit == "image" else "patient"
    split = split_frame(frame, by, s.val_frac, s.test_frac, s.seed, pairs)
    groups = np.arange(len(frame)) if unit == "image" else leakage_groups(frame, pairs)
    return frame.assign(split=split, group=groups, split_by=unit)


def write_splits(frame: pd.DataFrame, path) -> None:
    write_csv(path, frame[[c for c in SPLIT_COLUMNS if c in frame.columns]])


def read_splits(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    splits = pd.read_csv(path, dtype={"isic_id": str, "patient_id": "string"})
    if not {"isic_id", "target", "split"} <= set(splits.columns):
        raise UserError(f"{path} is not a splits.csv written by this pipeline")
    return splits


def apply_saved_split(frame: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    splits = splits.drop(columns=["patient_id", "target"], errors="ignore")  # the metadata's own are used
    merged = splits.merge(frame, on="isic_id", how="left", validate="one_to_one")
    missing = merged["target"].isna()
    if missing.any():
        raise UserError(f"{int(missing.sum())} ids of the saved split are not in the metadata, "
                        f"e.g. {merged['isic_id'][missing].iloc[0]}: is this the dataset the run was trained on?")
    return merged.astype({"target": int, "row": int})


def train_prevalence(splits_csv) -> float:
    """The malignant rate of a saved split's training part: the prior that prior-corrected probabilities assume."""
    splits = read_splits(splits_csv)
    return float(splits.loc[splits["split"] == "train", "target"].mean())


SEEN = ("train", "val")  # a run learnt from its training split and chose its epoch, threshold and k on val


def split_of(splits_csv, ids) -> np.ndarray:
    """The split of a run's splits.csv that holds each id ("train", "val", "test"); "" for ids it does not list."""
    splits = read_splits(splits_csv)
    return pd.Series(ids, dtype=object).map(dict(zip(splits["isic_id"], splits["split"]))).fillna("").to_numpy(object)


def seen_note(held: np.ndarray, what: str) -> str:
    """One line: how many of the scored images the run trained or validated on, by split."""
    counts = ", ".join(f"{int((held == name).sum())} {name}" for name in SEEN if (held == name).any())
    return f"{int(np.isin(held, SEEN).sum())} of {len(held)} {what} are in the run's own splits.csv ({counts})"


def seen_meaning(held: np.ndarray) -> str:
    """What being in each split means for the scored images' results, for the splits `held` has."""
    meaning = {"train": "{} in train: each is its own nearest training lesion",
               "val": "{} in val: no training lesions, but they chose the run's epoch, threshold and k"}
    return "; ".join(text.format(int((held == name).sum())) for name, text in meaning.items() if (held == name).any())
