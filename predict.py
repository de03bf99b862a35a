"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --tta                # ... also with 8-fold flip/rotation test-time augmentation
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset, every scorer
    python predict.py --run runs/X --images FOLDER      # unlabelled images: scores and nearest training lesions
"""
from __future__ import annotations

import sys
from pathlib import Path

from config import COUNT, Parser, add_settings
from dataset import prepare_data
from evaluation import evaluate_run, evaluate_split, needs_val, predict_dataset, predict_images
from inference import load_run
from reports import BOOTSTRAP, summary_line
from utils import cli_main, pick_device
from webreport import write_report

ELSEWHERE = {"data_dir": "another labelled dataset (same layouts as driver.py): score every row",
             "csv": "with --image-dir: another labelled dataset given by its CSV",
             "workers": "data loader worker processes (default: the run's)",
             "device": "compute device (default auto)"}


def build_parser() -> Parser:
    p = Parser(description="Evaluate or apply a saved run.")
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    add_settings(p, ["data_dir", "csv", "image_dir", "device", "workers", "skip_bad_images", "neighbours"],
                 help=ELSEWHERE)
    p.add_argument("--images", help="a folder of unlabelled images: scores, neighbours.csv and similar.png")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (8 flips/rotations averaged)")
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
    if args.neighbours is not None:
        s.neighbours = args.neighbours
    run_dir = Path(args.run)
    tta = args.tta or s.tta  # a run trained with --tta is re-evaluated the way it was first evaluated
    if args.images or args.data_dir or args.csv:
        source = Path(args.images or args.data_dir or args.csv)
        out_dir = Path(args.out) if args.out else run_dir / f"predict-{source.stem}"
        if needs_val(run_dir, tta):  # the threshold and k come from val: choose them first, as for the test split
            data = prepare_data(s, splits_path=run_dir / "splits.csv")
            evaluate_split(run_dir, "val", s, model, data, device, tta, args.bootstrap)
        if args.images:
            result = predict_images(args.images, out_dir, run_dir, s, model, device, tta)
            print(f"{len(result)} predictions (val's threshold) → {out_dir / 'predictions.csv'}; nearest training "
                  f"lesions → {out_dir / 'neighbours.csv'}, {out_dir / 'similar.png'}")
        else:
            m = predict_dataset(args.data_dir, args.csv, args.image_dir, out_dir, run_dir, s, model, device, tta,
                                args.bootstrap)
            print(summary_line(m, out_dir))
        print(f"report: {write_report(out_dir, run=run_dir, command=True)}")
        return
    data = prepare_data(s, splits_path=run_dir / "splits.csv")
    if args.split == "test" and needs_val(run_dir, tta):
        metrics = evaluate_run(run_dir, s, model, data, device, tta, args.bootstrap)
    else:
        metrics = evaluate_split(run_dir, args.split, s, model, data, device, tta, args.bootstrap)
    print(summary_line(metrics, run_dir / args.split))
    print(f"report: {write_report(run_dir, command=True)}")  # the page shows the new numbers


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
