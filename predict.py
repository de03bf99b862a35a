"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --tta                # ... also with 8-fold flip/rotation test-time augmentation
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset
    python predict.py --run runs/X --images FOLDER      # unlabelled images: probabilities only
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors
from torch import nn

import plots
from config import COUNT, SEED, Parser, Settings
from dataset import (IMAGE_EXTENSIONS, ImageDataset, find_layout, image_loader, load_images, load_metadata,
                     prepare_data, read_splits, to_float)
from metrics import (all_metrics, auroc, bootstrap_ci, calibration_metrics, classification_report, partial_auc,
                     prior_corrected_logits, sigmoid, youden_threshold)
from modules import build_model
from train import Predictions, evaluate, evaluation_weights
from utils import UserError, autocast_dtype, load_checkpoint, pick_device, write_csv, write_json, write_text

BOOTSTRAP = 1000           # resamples behind each 95% confidence interval
K_GRID = (5, 15, 45, 135)  # neighbours tried for the kNN score; the best on validation is kept
GALLERY = 4                # cases per row of gallery.png


def load_run(run_dir, device, checkpoint: str = "best.pt") -> tuple[Settings, torch.nn.Module]:
    """The settings and best (or another checkpoint's) model of a finished or interrupted run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    s = Settings.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = build_model(s, initial_weights=False)
    model.load_state_dict(evaluation_weights(load_checkpoint(run_dir / checkpoint)))
    return s, model.to(device).to(memory_format=torch.channels_last).eval()


class DihedralTTA(nn.Module):
    """Test-time augmentation: the model's embedding and logit averaged over the 8 flips and quarter turns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        outputs = [self.model(torch.rot90(x, k, dims=(2, 3))) for x in (images, images.flip(3)) for k in range(4)]
        return tuple(torch.stack(o).mean(0) for o in zip(*outputs))


def score(model, dataset, s, device) -> Predictions:
    loader = image_loader(dataset, s.eval_batch_size, device, s.workers, shuffle=False)
    return evaluate(model, loader, device, autocast_dtype(device))


# ---------------------------------------------------------------- scores from the embedding alone

def embedding_space(embeddings, s) -> np.ndarray:
    """The space the contrastive loss shaped: L2-normalised embeddings unless the run turned that off."""
    if not s.normalize_embeddings:
        return embeddings
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)


def knn_scores(train_embeddings, train_y, embeddings, ks) -> dict:
    """For each k: the fraction of malignant images among the k nearest training embeddings."""
    ks = sorted({min(k, len(train_y)) for k in ks})
    _, nearest = NearestNeighbors(n_neighbors=ks[-1]).fit(train_embeddings).kneighbors(embeddings)
    malignant = np.asarray(train_y)[nearest]
    return {k: malignant[:, :k].mean(1) for k in ks}


def prototype_scores(train_embeddings, train_y, embeddings) -> np.ndarray:
    """Distance to the benign centroid minus distance to the malignant centroid: higher is closer to melanoma."""
    benign, malignant = (train_embeddings[np.asarray(train_y) == c].mean(0) for c in (0, 1))
    return np.linalg.norm(embeddings - benign, axis=1) - np.linalg.norm(embeddings - malignant, axis=1)


@dataclass
class Scoring:
    """One scoring of a labelled set (plain or TTA) and the choices made on validation."""
    pred: Predictions
    threshold: float
    embedding_scores: dict = field(default_factory=dict)  # "knn", "prototype" → one score per image
    k: int | None = None


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


# ---------------------------------------------------------------- reports

def prior_probability(pred: Predictions, prevalence: float) -> np.ndarray:
    return sigmoid(prior_corrected_logits(pred.logits, prevalence))


def labelled_metrics(sc: Scoring, groups, prevalence: float, s, resamples: int) -> dict:
    """Threshold metrics of the head, AUROC and pAUC with 95% CIs for every scorer, and calibration."""
    y, p = sc.pred.targets, sc.pred.probabilities
    scores = {"head": p, **sc.embedding_scores}
    ci = bootstrap_ci(y, scores, groups, resamples, seed=s.seed)
    m = {**all_metrics(y, p, sc.threshold), "auroc_ci95": ci["head"]["auroc"], "pauc_ci95": ci["head"]["pauc"]}
    m["scorers"] = {name: {"auroc": auroc(y, v), "pauc": partial_auc(y, v), "auroc_ci95": ci[name]["auroc"],
                           "pauc_ci95": ci[name]["pauc"]} for name, v in scores.items()}
    if sc.k is not None:
        m["scorers"]["knn"]["k"] = int(sc.k)
    if len(np.unique(y)) == 2:
        m["average_precision"] = float(average_precision_score(y, p))
        m["calibration"] = calibration_metrics(y, p, prior_probability(sc.pred, prevalence), prevalence)
    return m


def write_labelled(scorings: dict, ids, out_dir, s, extra: dict, groups=None, prevalence: float = 0.5,
                   resamples: int = BOOTSTRAP) -> dict:
    """metrics.json, predictions.csv, classification_report.txt and the plots for one labelled set of images.

    `scorings` holds "plain" and, with --tta, "tta"; the top-level metrics are the plain head's.
    """
    out_dir = Path(out_dir)
    plain = scorings["plain"]
    y, p, threshold = plain.pred.targets, plain.pred.probabilities, plain.threshold
    has_patients = groups is not None and pd.Series(groups).notna().any()
    metrics = {**labelled_metrics(plain, groups, prevalence, s, resamples), **extra,
               "bootstrap": {"resamples": resamples, "level": 0.95, "seed": s.seed,
                             "unit": "patient" if has_patients else "image", "stratified_by": "class"}}
    columns = {"isic_id": ids, "target": y}
    for view, sc in scorings.items():
        suffix = "_tta" if view == "tta" else ""
        columns[f"probability{suffix}"] = sc.pred.probabilities
        columns[f"probability_prior_corrected{suffix}"] = prior_probability(sc.pred, prevalence)
        columns.update({f"{name}_score{suffix}": v for name, v in sc.embedding_scores.items()})
        if view == "tta":
            metrics["tta"] = {**labelled_metrics(sc, groups, prevalence, s, resamples),
                              "threshold_chosen_on": "val with TTA (Youden's J)"}
    write_csv(out_dir / "predictions.csv", pd.DataFrame(columns))
    write_text(out_dir / "classification_report.txt", classification_report(y, p, threshold))
    if len(np.unique(y)) == 2:
        plots.roc_plot(y, p, threshold, metrics, out_dir / "roc.png")
        plots.pr_plot(y, p, threshold, metrics, out_dir / "pr.png")
        plots.calibration_plot(y, {"raw (50% training prior)": p,
                                   f"prior-corrected ({100 * prevalence:.1f}%)": prior_probability(plain.pred, prevalence)},
                               out_dir / "calibration.png")
    plots.confusion_plot(metrics["confusion_matrix"], threshold, out_dir / "confusion_matrix.png")
    plots.embeddings_plot(embedding_space(plain.pred.embeddings, s), y, out_dir / "embeddings.png", seed=s.seed,
                          tsne=s.tsne)  # the space the contrastive loss shaped
    write_json(out_dir / "metrics.json", metrics)  # last: its presence means the evaluation finished
    return metrics


def grad_cam(model, images) -> torch.Tensor:
    """Grad-CAM of the malignant logit at the trunk's last block: (B, H, W) heat maps scaled to [0, 1]."""
    store = {}
    hook = model.trunk.layer4.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        with torch.enable_grad():
            _, logits = model(images)
            grads = torch.autograd.grad(logits.sum(), store["a"])[0]  # eval mode: each logit sees only its image
    finally:
        hook.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).detach()


def write_gallery(model, dataset, ids, pred: Predictions, threshold: float, path, device, n: int = GALLERY) -> None:
    """gallery.png: the most confident true positives, false positives and false negatives, with Grad-CAM."""
    y, p = pred.targets, pred.probabilities
    called = p >= threshold
    most = np.argsort(-p, kind="stable")  # most melanoma-like first
    pick = lambda mask, order: [i for i in order if mask[i]][:n]  # noqa: E731
    chosen = {"true positives": pick((y == 1) & called, most), "false positives": pick((y == 0) & called, most),
              "false negatives": pick((y == 1) & ~called, most[::-1])}
    rows = {}
    for title, cases in chosen.items():
        if cases:
            images = to_float(torch.stack([dataset[i][0] for i in cases]).to(device))
            cams = grad_cam(model.eval(), images).cpu().numpy()
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        rows[title] = [(images[j], cams[j], f"{ids[i]}\nP={p[i]:.3f}") for j, i in enumerate(cases)]
    plots.gallery_plot(rows, path)


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


def parse_args(argv=None):
    p = Parser(description="Evaluate or apply a saved run.")
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    p.add_argument("--data-dir", help="another labelled dataset (same layouts as driver.py): score every row")
    p.add_argument("--csv", help="with --image-dir: another labelled dataset given by its CSV")
    p.add_argument("--image-dir", help="with --csv")
    p.add_argument("--images", help="a folder of unlabelled images: write probabilities only")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--workers", type=SEED, help="data loader workers (default: the run's)")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (8 flips/rotations averaged); val/test splits only")
    p.add_argument("--bootstrap", type=COUNT, default=BOOTSTRAP,
                   help=f"bootstrap resamples for the 95%% confidence intervals (default {BOOTSTRAP})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        s, model = load_run(args.run, device)
        if args.workers is not None:
            s.workers = args.workers
        run_dir = Path(args.run)
        if args.images or args.data_dir or args.csv:
            if args.tta:
                raise UserError("--tta applies to the run's own val/test splits, not to --images or --data-dir")
            source = Path(args.images or args.data_dir or args.csv)
            out_dir = Path(args.out) if args.out else run_dir / f"predict-{source.stem}"
            threshold = decision_threshold(run_dir)
            if args.images:
                result = predict_images(args.images, out_dir, s, model, device, threshold)
                print(f"{len(result)} predictions (threshold {threshold:.4f}) → {out_dir / 'predictions.csv'}")
            else:
                m = predict_dataset(args.data_dir, args.csv, args.image_dir, out_dir, s, model, device, threshold,
                                    train_prevalence(run_dir), args.bootstrap)
                print(summary_line(m, out_dir))
            return 0
        data = prepare_data(s, run_dir, splits_path=run_dir / "splits.csv")
        tta = args.tta or s.tta  # a run trained with --tta is re-evaluated the way it was first evaluated
        if args.split == "test" and needs_val(run_dir, tta):
            metrics = evaluate_run(run_dir, s, model, data, device, tta, args.bootstrap)
        else:
            metrics = evaluate_split(run_dir, args.split, s, model, data, device, tta, args.bootstrap)
        print(summary_line(metrics, run_dir / args.split))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def needs_val(run_dir, tta: bool) -> bool:
    """Whether val must be (re)evaluated first: test reuses val's threshold and k (and their TTA versions)."""
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        return True
    val = json.loads(path.read_text())
    return "scorers" not in val or (tta and "tta" not in val)


def summary_line(m: dict, out_dir) -> str:
    """One line of threshold metrics, then a table of AUROC and pAUC with 95% CIs per scorer, then calibration."""
    line = (f"AUROC {m['auroc']:.4f}  pAUC {m['pauc']:.4f}  at threshold {m['threshold']:.4f}: "
            f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
            f"balanced accuracy {m['balanced_accuracy']:.3f}  (n={m['n']}, {m['n_positive']} malignant) → {out_dir}")
    if "scorers" not in m:
        return line
    rows = [f"  {'scorer':<18} {'AUROC [95% CI]':<24} pAUC [95% CI]"]
    for view, part in (("", m), (", TTA", m.get("tta"))):
        for name, r in (part or {}).get("scorers", {}).items():
            label = f"kNN (k={r['k']})" if name == "knn" else name
            rows.append(f"  {label + view:<18} {_with_ci(r['auroc'], r['auroc_ci95']):<24} "
                        f"{_with_ci(r['pauc'], r['pauc_ci95'])}")
    b = m.get("bootstrap", {})
    rows.append(f"  95% CIs: {b.get('resamples')} bootstrap resamples by {b.get('unit')}, stratified by class")
    if "calibration" in m:
        c = m["calibration"]
        rows.append(f"  calibration: Brier {c['brier']:.4f} (prior-corrected {c['brier_prior_corrected']:.4f})  "
                    f"ECE {c['ece']:.4f} (prior-corrected {c['ece_prior_corrected']:.4f})  "
                    f"training prevalence {100 * c['train_prevalence']:.2f}%")
    return "\n".join([line, *rows])


def _with_ci(value: float, ci) -> str:
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


if __name__ == "__main__":
    sys.exit(main())
