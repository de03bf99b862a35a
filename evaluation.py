"""Evaluation: score a run's val/test split, another labelled dataset or new images with every scorer (head, kNN,
prototype; with TTA when asked) against the run's stored training embeddings, choosing the threshold and k on val and
reusing them everywhere else; list each image's nearest training lesions (neighbours.csv, similar.png)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dataset import ImageDataset, load_images
from explain import FIRST_IMAGES, SIMILAR, gallery_cases, write_gallery, write_similar
from inference import Predictions, score
from metadata import IMAGE_EXTENSIONS, find_layout, join_columns, load_metadata
from metrics import auroc, partial_auc, youden_threshold
from references import References, train_references, views
from reports import BOOTSTRAP, Scoring, write_labelled
from retrieval import embedding_space, knn_scores, nearest, prototype_scores, retrieval_metrics
from tabular import run_features
from visual_similarity import dataset_features, retrieval_quality
from utils import UserError, write_csv

K_GRID = (5, 15, 45, 135)  # neighbours tried for the kNN score; the best on validation is kept


def scoring(pred: Predictions, refs: References, view: str, s, chosen: dict | None, visual=None,
            device=None) -> Scoring:
    """Choose the threshold (Youden's J) and k here when `chosen` is None (the val split), else reuse val's.
    Labelled images (given with their colour/texture features `visual`) also get retrieval metrics against the
    training split."""
    if chosen is None:
        threshold = youden_threshold(pred.targets, pred.probabilities)
    else:
        threshold = chosen["threshold"]
    train, query = embedding_space(refs.embeddings[view], s), embedding_space(pred.embeddings, s)
    if chosen is None:
        by_k = knn_scores(train, refs.targets, query, K_GRID)
        metric = auroc if s.select_metric == "auroc" else partial_auc
        k = max(by_k, key=lambda k: metric(pred.targets, by_k[k]))
    else:
        k = chosen["scorers"]["knn"]["k"]
        by_k = knn_scores(train, refs.targets, query, [k])
    retrieval = {}
    if visual is not None:
        retrieval = {**retrieval_metrics(train, refs.targets, query, pred.targets, device),
                     **retrieval_quality(train, refs.targets, query, pred.targets, refs.visual, visual)}
    return Scoring(pred, threshold, {"knn": by_k[k], "prototype": prototype_scores(train, refs.targets, query)}, k,
                   retrieval)


def chosen_on_val(val: dict, view: str) -> dict:
    """The threshold and k that val chose for this view (plain or TTA)."""
    chosen = val if view == "plain" else val.get("tta")
    if chosen is None or "scorers" not in chosen:
        flag = " --tta" if view == "tta" else ""
        raise UserError(f"the run's val/metrics.json lacks the threshold and k chosen on val{flag}: evaluate val "
                        f"again (predict.py --run RUN --split val{flag})")
    return chosen


def write_retrieval(out_dir, refs: References, embeddings, ids, s, cases: dict, dataset, captions, labels=None) -> None:
    """neighbours.csv: the --neighbours nearest training lesions of every image (plain embeddings);
    similar.png: the `cases` beside their SIMILAR nearest ones."""
    train, query = embedding_space(refs.embeddings["plain"], s), embedding_space(embeddings, s)
    distances, rows = nearest(train, query, max(s.neighbours, SIMILAR))
    k = min(s.neighbours, distances.shape[1])
    table = pd.DataFrame({"query_id": np.repeat(np.asarray(ids), k), "rank": np.tile(np.arange(1, k + 1), len(ids)),
                          "isic_id": refs.ids[rows[:, :k]].ravel(), "label": refs.targets[rows[:, :k]].ravel()})
    if (refs.diagnosis != "").any():
        table["diagnosis"] = refs.diagnosis[rows[:, :k]].ravel()
    table["distance"] = distances[:, :k].ravel()
    write_csv(Path(out_dir) / "neighbours.csv", table)
    write_similar(dataset, captions, labels, cases, distances[:, :SIMILAR], rows[:, :SIMILAR], refs, s,
                  Path(out_dir) / "similar.png")


def read_val_metrics(run_dir) -> dict:
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: evaluate the validation split first (predict.py --run {run_dir} --split val)")
    return json.loads(path.read_text())


def score_views(model, dataset, refs: References, s, device, tta: bool, val: dict | None,
                 labelled: bool = True) -> dict:
    """Every view's Scoring of one set of images: choices made here when `val` is None, else val's reused."""
    visual = dataset_features(dataset) if labelled else None
    return {view: scoring(score(scorer, dataset, s, device), refs, view, s,
                          None if val is None else chosen_on_val(val, view), visual, device)
            for view, scorer in views(model, tta).items()}


def write_labelled_set(out_dir, scorings: dict, refs: References, model, dataset, ids, s, device, extra: dict,
                       groups, resamples: int) -> dict:
    """gallery.png, neighbours.csv, similar.png, then write_labelled's files (metrics.json last)."""
    out_dir, plain = Path(out_dir), scorings["plain"]
    y, p = plain.pred.targets, plain.pred.probabilities
    cases = gallery_cases(y, p, plain.threshold)
    write_gallery(model, dataset, ids, plain.pred, plain.threshold, out_dir / "gallery.png", device, cases)
    captions = [f"{i}\nP={v:.3f}" for i, v in zip(ids, p)]
    write_retrieval(out_dir, refs, plain.pred.embeddings, ids, s, cases, dataset, captions, y)
    prevalence = float(refs.targets.mean())  # the training split's: the prior of the prior-corrected probability
    return write_labelled(scorings, ids, out_dir, s, extra, groups, prevalence, resamples)


def evaluate_split(run_dir, split: str, s, model, data, device, tta: bool = False, resamples: int = BOOTSTRAP,
                   references: References | None = None) -> dict:
    """Evaluate the run's own val or test split. The threshold (Youden's J) and the kNN's k are chosen on val and
    reused for test; kNN, prototype and retrieval compare with the training split's embeddings (`references`)."""
    run_dir = Path(run_dir)
    refs = references or train_references(run_dir, model, s, device, tta, data)
    val = None if split == "val" else read_val_metrics(run_dir)
    dataset = data.dataset(split, s.img_size)
    scorings = score_views(model, dataset, refs, s, device, tta, val)
    part = data.frame[data.frame["split"] == split]
    extra = {"split": split, "threshold_chosen_on": "val (Youden's J)"}
    return write_labelled_set(run_dir / split, scorings, refs, model, dataset, part["isic_id"].to_numpy(), s, device,
                              extra, part["patient_id"].to_numpy(), resamples)


def evaluate_run(run_dir, s, model, data, device, tta: bool = False, resamples: int = BOOTSTRAP) -> dict:
    """The end of training: val (fixes the threshold and k), then test. Returns the test metrics."""
    references = train_references(run_dir, model, s, device, tta, data)
    evaluate_split(run_dir, "val", s, model, data, device, tta, resamples, references)
    return evaluate_split(run_dir, "test", s, model, data, device, tta, resamples, references)


def predict_images(folder, out_dir, run_dir, s, model, device, tta: bool = False, extra_csv=None) -> pd.DataFrame:
    """Unlabelled images: probability, the call at val's threshold, kNN and prototype scores (each also with TTA),
    neighbours.csv, and similar.png for the first FIRST_IMAGES images (sorted by file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise UserError(f"no .jpg, .jpeg or .png images in {folder}")
    frame = pd.DataFrame({"isic_id": [f.stem for f in files], "target": 0})
    paths, cache, bad = load_images(frame, folder, s)
    rows = np.flatnonzero(~frame["isic_id"].isin(bad).to_numpy())
    if len(rows) == 0:
        raise UserError(f"no readable images in {folder}")
    if s.metadata and extra_csv:
        frame = join_columns(frame, None, extra_csv)
    features = run_features(run_dir, s, frame)  # without a CSV every patient fact is unknown
    dataset = ImageDataset(rows, np.zeros(len(rows)), paths, s.img_size, cache,
                           metadata=None if features is None else features[rows])
    ids = frame["isic_id"].to_numpy()[rows]
    val = read_val_metrics(run_dir)
    refs = train_references(run_dir, model, s, device, tta, visual=False)
    scorings = score_views(model, dataset, refs, s, device, tta, val, labelled=False)
    columns = {"isic_id": ids}
    for view, sc in scorings.items():
        suffix = "_tta" if view == "tta" else ""
        columns[f"probability{suffix}"] = sc.pred.probabilities
        columns[f"predicted_malignant{suffix}"] = (sc.pred.probabilities >= sc.threshold).astype(int)
        columns.update({f"{name}_score{suffix}": v for name, v in sc.embedding_scores.items()})
    plain = scorings["plain"]
    captions = [f"{i}\nP={v:.3f}" for i, v in zip(ids, plain.pred.probabilities)]
    cases = {f"first {min(FIRST_IMAGES, len(ids))} images": list(range(min(FIRST_IMAGES, len(ids))))}
    write_retrieval(out_dir, refs, plain.pred.embeddings, ids, s, cases, dataset, captions)
    result = pd.DataFrame(columns)
    write_csv(Path(out_dir) / "predictions.csv", result)  # last: its presence means the scoring finished
    return result


def predict_dataset(data_dir, csv, image_dir, out_dir, run_dir, s, model, device, tta: bool = False,
                    resamples: int = BOOTSTRAP, extra_csv=None) -> dict:
    """Every row of another labelled dataset, judged as the run's own test split: every scorer (with TTA when
    asked) against the run's training split, with the threshold and k chosen on the run's val split."""
    csv_path, image_dir = find_layout(data_dir, csv, image_dir)
    frame = load_metadata(csv_path)
    if s.metadata:  # the run's head also reads patient facts: from this CSV, or one given with --extra-csv
        frame = join_columns(frame, csv_path, extra_csv)
    features = run_features(run_dir, s, frame)
    paths, cache, bad = load_images(frame, image_dir, s)
    rows = np.flatnonzero(~frame["isic_id"].isin(bad).to_numpy())
    dataset = ImageDataset(rows, frame["target"].to_numpy()[rows], paths, s.img_size, cache,
                           metadata=None if features is None else features[rows])
    val = read_val_metrics(run_dir)
    refs = train_references(run_dir, model, s, device, tta)
    scorings = score_views(model, dataset, refs, s, device, tta, val)
    extra = {"dataset": str(csv_path), "threshold_chosen_on": "val of the run (Youden's J)"}
    return write_labelled_set(out_dir, scorings, refs, model, dataset, frame["isic_id"].to_numpy()[rows], s, device,
                              extra, frame["patient_id"].to_numpy()[rows], resamples)


def needs_val(run_dir, tta: bool) -> bool:
    """Whether val must be (re)evaluated first: test reuses val's threshold and k (and their TTA versions)."""
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        return True
    val = json.loads(path.read_text())
    return "scorers" not in val or (tta and "tta" not in val)
