"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --tta                # ... also with 8-fold flip/rotation test-time augmentation
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset
    python predict.py --run runs/X --images FOLDER      # unlabelled images: probabilities only
"""
from __future__ import annotations

import sys
from pathlib import Path

from config import COUNT, Parser, add_settings
from dataset import prepare_data
from evaluation import (decision_threshold, evaluate_run, evaluate_split, needs_val, predict_dataset, predict_images,
                        train_prevalence)
from inference import load_run
from reports import BOOTSTRAP, summary_line
from utils import UserError, cli_main, pick_device

ELSEWHERE = {"data_dir": "another labelled dataset (same layouts as driver.py): score every row",
             "csv": "with --image-dir: another labelled dataset given by its CSV",
             "workers": "data loader worker processes (default: the run's)",
             "device": "compute device (default auto)"}


def build_parser() -> Parser:
    p = Parser(description="Evaluate or apply a saved run.")
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    add_settings(p, ["data_dir", "csv", "image_dir", "device", "workers", "skip_bad_images"], help=ELSEWHERE)
    p.add_argument("--images", help="a folder of unlabelled images: write probabilities only")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (8 flips/rotations averaged); val/test splits only")
    p.add_argument("--bootstrap", type=COUNT, default=BOOTSTRAP,
                   help=f"bootstrap resamples for the 95%% confidence intervals (default {BOOTSTRAP})")
    p.set_defaults(device="auto")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    s, model = load_run(args.run, device)
    s.skip_bad_images = args.skip_bad_images
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
        return
    data = prepare_data(s, splits_path=run_dir / "splits.csv")
    tta = args.tta or s.tta  # a run trained with --tta is re-evaluated the way it was first evaluated
    if args.split == "test" and needs_val(run_dir, tta):
        metrics = evaluate_run(run_dir, s, model, data, device, tta, args.bootstrap)
    else:
        metrics = evaluate_split(run_dir, args.split, s, model, data, device, tta, args.bootstrap)
    print(summary_line(metrics, run_dir / args.split))


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
