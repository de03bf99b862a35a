"""Evaluation: score a run's val/test split, another labelled dataset or new images with every scorer (head, kNN,
prototype; with TTA when asked) against the run's stored training embeddings, choosing the threshold and k on val and
reusing them everywhere else; list each image's nearest training lesions (neighbours.csv, similar.png)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset import ImageDataset, load_images
from engine import timings
from engine.config import Settings
from isic.metadata import IMAGE_EXTENSIONS, find_layout, join_columns, load_metadata
from isic.splits import SEEN, seen_meaning, seen_note, split_of
from isic.tabular import run_features
from reporting.explain import SIMILAR, gallery_cases, image_cases, similar_cases, write_gallery, write_similar
from reporting.reports import BOOTSTRAP, Scoring, figure_subject, prior_probability, run_name, write_labelled
from reporting.tensorboard_log import FOLDER as TENSORBOARD, add_projector
from reporting.webreport import SKIPPED
from scoring.inference import Predictions, score
from scoring.metrics import auroc, partial_auc, youden_threshold
from scoring.references import References, neighbour_space, neighbour_space_name, train_references, views
from scoring.retrieval import embedding_space, knn_scores, nearest, prototype_scores, retrieval_metrics
from scoring.visual_similarity import dataset_features, retrieval_quality
from utils import UserError, write_csv

K_GRID = (5, 15, 45, 135)  # neighbours tried for the kNN score; the best on validation is kept
SEEN_FILE = "seen_in_training.csv"  # images of another dataset that the run trained or validated on


@dataclass
class LoadedRun:
    """A trained run ready to score images, and how it scores them: what every evaluation below needs."""
    run_dir: Path
    s: Settings
    model: torch.nn.Module
    device: torch.device
    tta: bool = False
    resamples: int = BOOTSTRAP
    home: Path | None = None  # where its val/test evaluations go: None, the run folder; an ensemble member's elsewhere

    @property
    def out(self) -> Path:
        return Path(self.home or self.run_dir)

    @property
    def val_dir(self) -> Path:
        """Where val's choices (threshold, k) are read: a re-evaluation written under `out`, else the run's own."""
        again = self.out / "val"
        return again if (again / "metrics.json").is_file() else Path(self.run_dir) / "val"

    def references(self, data=None, visual: bool = True) -> References:
        return train_references(self.run_dir, self.model, self.s, self.device, self.tta, data, store=self.home,
                                visual=visual)


@dataclass
class ImageSet:
    """Scored images: the dataset, each row's id and patient (the bootstrap's unit)."""
    dataset: ImageDataset
    ids: np.ndarray
    patients: np.ndarray | None = None


@dataclass
class OtherData:
    """Another labelled dataset (predict.py --data-dir, or --csv and --image-dir; --extra-csv)."""
    data_dir: str | None = None
    csv: str | None = None
    image_dir: str | None = None
    extra_csv: str | None = None
    count_seen: bool = False  # count the images the run trained or validated on in the metrics


def scoring(pred: Predictions, refs: References, view: str, s, chosen: dict | None, visual=None) -> Scoring:
    """Choose the threshold (Youden's J) and k here when `chosen` is None (the val split), else reuse val's.
    Labelled images (given with their colour/texture features `visual`) also get retrieval metrics against the
    training split."""
    if chosen is None:
        threshold = youden_threshold(pred.targets, pred.probabilities)
    else:
        threshold = chosen["threshold"]
    train, query = embedding_space(refs.embeddings[view], s), embedding_space(pred.embeddings, s)
    with timings.phase("evaluation.knn", note=f"{len(query)} queries, {len(train)} references"):
        if chosen is None:
            by_k = knn_scores(train, refs.targets, query, K_GRID)
            metric = auroc if s.select_metric == "auroc" else partial_auc
            k = max(by_k, key=lambda k: metric(pred.targets, by_k[k]))
        else:
            k = chosen["scorers"]["knn"]["k"]
            by_k = knn_scores(train, refs.targets, query, [k])
        embedding_scores = {"knn": by_k[k], "prototype": prototype_scores(train, refs.targets, query)}
    retrieval = {}
    if visual is not None:
        train, query = neighbour_space(refs, view, pred, s)
        with timings.phase("evaluation.retrieval"):
            retrieval = {**retrieval_metrics(train, refs.targets, query, pred.targets),
                         **retrieval_quality(train, refs.targets, query, pred.targets, refs.visual, visual),
                         "neighbours_by": s.neighbours_by, "distance": neighbour_space_name(s)}
    return Scoring(pred, threshold, embedding_scores, k, retrieval)


def chosen_on_val(val: dict, view: str) -> dict:
    """The threshold and k that val chose for this view (plain or TTA)."""
    chosen = val if view == "plain" else val.get("tta")
    if chosen is None or "scorers" not in chosen:
        flag = " --tta" if view == "tta" else ""
        raise UserError(f"the run's val/metrics.json lacks the threshold and k chosen on val{flag}: evaluate val "
                        f"again (predict.py --run RUN --split val{flag})")
    return chosen


def write_retrieval(out_dir, refs: References, pred: Predictions, ids, s, cases: dict, dataset, captions,
                    labels=None, subject: str = "scored images") -> None:
    """neighbours.csv: the --neighbours nearest training lesions of every image (plain view, in the space
    --neighbours-by names); similar.png: the `cases` of `subject` (its title) beside their SIMILAR nearest ones."""
    train, query = neighbour_space(refs, "plain", pred, s)
    distances, rows = nearest(train, query, max(s.neighbours, SIMILAR))
    k = min(s.neighbours, distances.shape[1])
    table = pd.DataFrame({"query_id": np.repeat(np.asarray(ids), k), "rank": np.tile(np.arange(1, k + 1), len(ids)),
                          "isic_id": refs.ids[rows[:, :k]].ravel(), "label": refs.targets[rows[:, :k]].ravel()})
    if (refs.diagnosis != "").any():
        table["diagnosis"] = refs.diagnosis[rows[:, :k]].ravel()
    table["distance"] = distances[:, :k].ravel()
    write_csv(Path(out_dir) / "neighbours.csv", table)
    write_similar(dataset, captions, labels, cases, distances[:, :SIMILAR], rows[:, :SIMILAR], refs, s,
                  Path(out_dir) / "similar.png", subject)


def read_val_metrics(run: LoadedRun) -> dict:
    path = run.val_dir / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: evaluate the validation split first "
                        f"(predict.py --run {run.run_dir} --split val)")
    return json.loads(path.read_text())


def score_views(run: LoadedRun, dataset, refs: References, val: dict | None, labelled: bool = True) -> dict:
    """Every view's Scoring of one set of images: choices made here when `val` is None, else val's reused."""
    visual = None
    if labelled:
        visual = dataset_features(dataset, run.s)
    scorings = {}
    for view, scorer in views(run.model, run.tta).items():
        with timings.phase("evaluation.score" + ("_tta" if view == "tta" else ""), note=f"{len(dataset)} images"):
            pred = score(scorer, dataset, run.s, run.device)
        scorings[view] = scoring(pred, refs, view, run.s, None if val is None else chosen_on_val(val, view), visual)
    return scorings


def prediction_columns(scorings: dict, prevalence: float) -> dict:
    """Each view's probability, its prior-corrected version (`prevalence`: the training split's), the call at val's
    threshold and the embedding scores, as predictions.csv columns."""
    columns = {}
    for view, sc in scorings.items():
        suffix = "_tta" if view == "tta" else ""
        columns[f"probability{suffix}"] = sc.pred.probabilities
        columns[f"probability_prior_corrected{suffix}"] = prior_probability(sc.pred, prevalence)
        columns[f"predicted_malignant{suffix}"] = (sc.pred.probabilities >= sc.threshold).astype(int)
        columns.update({f"{name}_score{suffix}": v for name, v in sc.embedding_scores.items()})
    return columns


def write_labelled_set(run: LoadedRun, images: ImageSet, scorings: dict, refs: References, out_dir,
                       extra: dict) -> dict:
    """gallery.png, neighbours.csv, similar.png, then write_labelled's files (metrics.json last)."""
    out_dir, plain = Path(out_dir), scorings["plain"]
    y, p = plain.pred.targets, plain.pred.probabilities
    cases, subject = gallery_cases(y, p, plain.threshold), figure_subject(extra, run_name(run.s))
    with timings.phase("evaluation.gallery", note="Grad-CAM"):
        write_gallery(run.model, images.dataset, images.ids, plain.pred, plain.threshold, out_dir / "gallery.png",
                      run.device, cases, subject=subject)
    captions = [f"{i}\nP(melanoma) {v:.3f}" for i, v in zip(images.ids, p)]
    with timings.phase("evaluation.similar", note="neighbours.csv, similar.png"):
        write_retrieval(out_dir, refs, plain.pred, images.ids, run.s, similar_cases(cases, y, run.s.seed),
                        images.dataset, captions, y, subject)
    prevalence = float(refs.targets.mean())  # the training split's: the prior of the prior-corrected probability
    return write_labelled(scorings, images.ids, out_dir, run.s, extra, images.patients, prevalence, run.resamples)


def evaluate_split(run: LoadedRun, split: str, data, references: References | None = None) -> dict:
    """Evaluate the run's own val or test split into run.out/split. The threshold (Youden's J) and the kNN's k are
    chosen on val and reused for test; kNN, prototype and retrieval compare with the training split's embeddings."""
    refs = references or run.references(data)
    val = None if split == "val" else read_val_metrics(run)
    dataset = data.dataset(split, run.s.img_size)
    part = data.frame[data.frame["split"] == split]
    extra = {"split": split, "threshold_chosen_on": "val (Youden's J)"}
    images = ImageSet(dataset, part["isic_id"].to_numpy(), part["patient_id"].to_numpy())
    with timings.part(split):
        scorings = score_views(run, dataset, refs, val)
        return write_labelled_set(run, images, scorings, refs, run.out / split, extra)


def evaluate_run(run: LoadedRun, data) -> dict:
    """The end of training: val (fixes the threshold and k), then test. Returns the test metrics."""
    references = run.references(data)
    evaluate_split(run, "val", data, references)
    return evaluate_split(run, "test", data, references)


def image_ids(files) -> list[str]:
    """Each file's id: its stem (what metadata CSVs and splits.csv name it by), or its whole name where two files
    share a stem (dup.jpg and dup.png), so that each is scored on its own."""
    shared = pd.Series([f.stem for f in files]).duplicated(keep=False)
    return [f.name if twin else f.stem for f, twin in zip(files, shared)]


def predict_images(folder, out_dir, run: LoadedRun, extra_csv=None, projector: bool = False) -> pd.DataFrame:
    """Unlabelled images: probability (raw and prior-corrected), the call at val's threshold, kNN and prototype
    scores (each also with TTA), neighbours.csv, similar.png for the first images (sorted by file name), and with
    `projector` their embeddings for TensorBoard's projector (OUT/tb)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise UserError(f"no .jpg, .jpeg or .png images in {folder}")
    frame = pd.DataFrame({"isic_id": image_ids(files), "target": 0, "stem": [f.stem for f in files]})
    paths, cache, bad = load_images(frame, folder, run.s)
    rows = np.flatnonzero(~frame["isic_id"].isin(bad).to_numpy())
    if len(rows) == 0:
        raise UserError(f"no readable images in {folder}")
    write_skipped(out_dir, frame, paths, bad)
    features = run_features(run.run_dir, run.s, patient_facts(frame, run.s, extra_csv))
    dataset = ImageDataset(rows, np.zeros(len(rows)), paths, run.s.img_size, cache,
                           metadata=None if features is None else features[rows])
    ids = frame["isic_id"].to_numpy()[rows]
    held = split_of(Path(run.run_dir) / "splits.csv", frame["stem"].to_numpy()[rows])
    if np.isin(held, SEEN).any():
        print(f"note: {seen_note(held, 'images')}, marked in the run_split column of predictions.csv: "
              f"{seen_meaning(held)}")
    refs = run.references(visual=False)
    scorings = score_views(run, dataset, refs, read_val_metrics(run), labelled=False)
    plain = scorings["plain"]
    captions = [f"{i}\nP(melanoma) {v:.3f}" for i, v in zip(ids, plain.pred.probabilities)]
    with timings.phase("evaluation.similar", note="neighbours.csv, similar.png"):
        write_retrieval(out_dir, refs, plain.pred, ids, run.s, image_cases(len(ids)), dataset, captions,
                        subject=f"new images in {folder.name}, run {run_name(run.s)}")
    if projector:
        add_projector(Path(out_dir) / TENSORBOARD, "images", plain.pred, run.s, dataset, ids)
    prevalence = float(refs.targets.mean())  # the training split's, as for a labelled set
    result = pd.DataFrame({"isic_id": ids, **prediction_columns(scorings, prevalence), "run_split": held})
    write_csv(Path(out_dir) / "predictions.csv", result)  # last: its presence means the scoring finished
    return result


def patient_facts(frame: pd.DataFrame, s, extra_csv) -> pd.DataFrame:
    """New images with their patient facts from `extra_csv` for a --metadata run, joined by file stem (two files of
    one stem get the same facts); without a CSV every fact is unknown."""
    if not (s.metadata and extra_csv):
        return frame
    joined = join_columns(frame.assign(isic_id=frame["stem"]), None, extra_csv)
    return joined.assign(isic_id=frame["isic_id"].to_numpy())


def predict_dataset(source: OtherData, out_dir, run: LoadedRun, projector: bool = False) -> dict:
    """Every row of another labelled dataset, judged as the run's own test split: every scorer (with TTA when
    asked) against the run's training split, with the threshold and k chosen on the run's val split. Images the
    run trained or validated on (by id) are scored into seen_in_training.csv and left out of the metrics, unless
    `source.count_seen`. With `projector`, the counted images' embeddings for TensorBoard's projector (OUT/tb)."""
    csv_path, image_dir = find_layout(source.data_dir, source.csv, source.image_dir)
    frame = load_metadata(csv_path)
    if run.s.metadata:  # the run's head also reads patient facts: from this CSV, or one given with --extra-csv
        frame = join_columns(frame, csv_path, source.extra_csv)
    features = run_features(run.run_dir, run.s, frame)
    paths, cache, bad = load_images(frame, image_dir, run.s)
    write_skipped(out_dir, frame, paths, bad)
    held = split_of(Path(run.run_dir) / "splits.csv", frame["isic_id"])
    seen = np.isin(held, SEEN) & (not source.count_seen)
    readable = ~frame["isic_id"].isin(bad).to_numpy()

    def images(rows) -> ImageSet:
        dataset = ImageDataset(rows, frame["target"].to_numpy()[rows], paths, run.s.img_size, cache,
                               metadata=None if features is None else features[rows])
        return ImageSet(dataset, frame["isic_id"].to_numpy()[rows], frame["patient_id"].to_numpy()[rows])

    val, refs = read_val_metrics(run), run.references()
    if (seen & readable).any():
        write_seen(run, images(np.flatnonzero(seen & readable)), held[seen & readable], refs, val, out_dir)
        print(f"note: {seen_note(held[readable], 'images of ' + csv_path.name)}: scored into "
              f"{Path(out_dir) / SEEN_FILE}, left out of the metrics (--include-seen counts them)")
    counted = np.flatnonzero(~seen & readable)
    if len(counted) == 0:
        raise UserError(f"every readable image of {csv_path} is in the run's training or validation split: nothing "
                        "to evaluate it on (--include-seen counts them anyway)")
    chosen = images(counted)
    scorings = score_views(run, chosen.dataset, refs, val)
    if projector:
        part = join_columns(frame, csv_path, source.extra_csv).iloc[counted]  # with the diagnosis, where a CSV has one
        add_projector(Path(out_dir) / TENSORBOARD, "dataset", scorings["plain"].pred, run.s, chosen.dataset,
                      part["isic_id"], part["target"], part.get("diagnosis"), part["patient_id"])
    extra = {"dataset": str(csv_path), "threshold_chosen_on": "val of the run (Youden's J)",
             "left_out_seen_in_training": int(seen.sum())}
    return write_labelled_set(run, chosen, scorings, refs, out_dir, extra)


def write_seen(run: LoadedRun, images: ImageSet, held, refs: References, val: dict, out_dir) -> None:
    """seen_in_training.csv: the images of another dataset that the run trained or validated on, scored."""
    scorings = score_views(run, images.dataset, refs, val, labelled=False)
    columns = prediction_columns(scorings, float(refs.targets.mean()))
    write_csv(Path(out_dir) / SEEN_FILE, pd.DataFrame({"isic_id": images.ids, "target": images.dataset.targets,
                                                       "run_split": held, **columns}))


def write_skipped(out_dir, frame, paths, bad: dict) -> None:
    """OUT/skipped_images.csv: the unreadable images --skip-bad-images left out, for report.html (none: no file)."""
    path = Path(out_dir) / SKIPPED
    path.unlink(missing_ok=True)  # from an earlier scoring into the same folder
    if bad:
        files = dict(zip(frame["isic_id"], paths))
        write_csv(path, pd.DataFrame({"file": [str(files[i]) for i in bad], "error": list(bad.values())}))


def needs_val(run: LoadedRun) -> bool:
    """Whether val must be (re)evaluated first: test reuses val's threshold and k (and their TTA versions)."""
    path = run.val_dir / "metrics.json"
    if not path.is_file():
        return True
    val = json.loads(path.read_text())
    return "scorers" not in val or (run.tta and "tta" not in val)
