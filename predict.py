"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset
    python predict.py --run runs/X --images FOLDER      # unlabelled images: probabilities only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import plots
from config import Settings
from dataset import IMAGE_EXTENSIONS, ImageDataset, find_layout, load_images, load_metadata, prepare_data
from metrics import all_metrics, classification_report, youden_threshold
from modules import build_model
from train import Predictions, evaluate
from utils import UserError, autocast_dtype, load_checkpoint, pick_device, write_csv, write_json, write_text


def load_run(run_dir, device) -> tuple[Settings, torch.nn.Module]:
    """The settings and best model of a finished (or interrupted) run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    s = Settings.from_dict(json.loads((run_dir / "config.json").read_text()))
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model = build_model(s, initial_weights=False)
    model.load_state_dict(checkpoint["model"])
    return s, model.to(device).to(memory_format=torch.channels_last).eval()


def score(model, dataset, s, device) -> Predictions:
    loader = DataLoader(dataset, batch_size=s.eval_batch_size, shuffle=False, num_workers=s.workers,
                        pin_memory=device.type == "cuda")
    return evaluate(model, loader, device, autocast_dtype(device))


def write_labelled(pred: Predictions, ids, threshold: float, out_dir, s, extra: dict) -> dict:
    """metrics.json, predictions.csv, classification_report.txt and the plots for one labelled set of images."""
    out_dir = Path(out_dir)
    y, p = pred.targets, pred.probabilities
    metrics = {**all_metrics(y, p, threshold), **extra}
    write_csv(out_dir / "predictions.csv", pd.DataFrame({"isic_id": ids, "target": y, "probability": p}))
    write_text(out_dir / "classification_report.txt", classification_report(y, p, threshold))
    if len(np.unique(y)) == 2:
        plots.roc_plot(y, p, threshold, metrics, out_dir / "roc.png")
    plots.confusion_plot(metrics["confusion_matrix"], threshold, out_dir / "confusion_matrix.png")
    plots.embeddings_plot(pred.embeddings, y, out_dir / "embeddings.png", seed=s.seed, tsne=s.tsne)
    write_json(out_dir / "metrics.json", metrics)  # last: its presence means the evaluation finished
    return metrics


def decision_threshold(run_dir) -> float:
    path = Path(run_dir) / "val" / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: evaluate the validation split first (predict.py --run {run_dir} --split val)")
    return json.loads(path.read_text())["threshold"]


def evaluate_split(run_dir, split: str, s, model, data, device) -> dict:
    """Evaluate the run's own val or test split. The threshold is chosen on val (Youden's J) and reused for test."""
    run_dir = Path(run_dir)
    pred = score(model, data.dataset(split, s.img_size), s, device)
    if split == "val":
        threshold = youden_threshold(pred.targets, pred.probabilities)
    else:
        threshold = decision_threshold(run_dir)
    ids = data.frame.loc[data.frame["split"] == split, "isic_id"].to_numpy()
    extra = {"split": split, "threshold_chosen_on": "val (Youden's J)"}
    return write_labelled(pred, ids, threshold, run_dir / split, s, extra)


def evaluate_run(run_dir, s, model, data, device) -> dict:
    """The end of training: val (fixes the threshold), then test. Returns the test metrics."""
    evaluate_split(run_dir, "val", s, model, data, device)
    return evaluate_split(run_dir, "test", s, model, data, device)


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


def predict_dataset(data_dir, csv, image_dir, out_dir, s, model, device, threshold: float) -> dict:
    csv_path, image_dir = find_layout(data_dir, csv, image_dir)
    frame = load_metadata(csv_path)
    paths, cache, bad = load_images(frame, image_dir, s)
    rows = np.flatnonzero(~frame["isic_id"].isin(bad).to_numpy())
    dataset = ImageDataset(rows, frame["target"].to_numpy()[rows], paths, s.img_size, cache)
    pred = score(model, dataset, s, device)
    extra = {"dataset": str(csv_path), "threshold_chosen_on": "val of the run (Youden's J)"}
    return write_labelled(pred, frame["isic_id"].to_numpy()[rows], threshold, out_dir, s, extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate or apply a saved run.")
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    p.add_argument("--data-dir", help="another labelled dataset (same layouts as driver.py): score every row")
    p.add_argument("--csv", help="with --image-dir: another labelled dataset given by its CSV")
    p.add_argument("--image-dir", help="with --csv")
    p.add_argument("--images", help="a folder of unlabelled images: write probabilities only")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--workers", type=int, help="data loader workers (default: the run's)")
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
            source = Path(args.images or args.data_dir or args.csv)
            out_dir = Path(args.out) if args.out else run_dir / f"predict-{source.stem}"
            threshold = decision_threshold(run_dir)
            if args.images:
                result = predict_images(args.images, out_dir, s, model, device, threshold)
                print(f"{len(result)} predictions (threshold {threshold:.4f}) → {out_dir / 'predictions.csv'}")
            else:
                m = predict_dataset(args.data_dir, args.csv, args.image_dir, out_dir, s, model, device, threshold)
                print(summary_line(m, out_dir))
            return 0
        data = prepare_data(s, run_dir, splits_path=run_dir / "splits.csv")
        if args.split == "test" and not (run_dir / "val" / "metrics.json").is_file():
            evaluate_split(run_dir, "val", s, model, data, device)
        metrics = evaluate_split(run_dir, args.split, s, model, data, device)
        print(summary_line(metrics, run_dir / args.split))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def summary_line(m: dict, out_dir) -> str:
    return (f"AUROC {m['auroc']:.4f}  pAUC {m['pauc']:.4f}  at threshold {m['threshold']:.4f}: "
            f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
            f"balanced accuracy {m['balanced_accuracy']:.3f}  (n={m['n']}, {m['n_positive']} malignant) → {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
