"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --tta                # ... also with 8-fold flip/rotation test-time augmentation
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset, every scorer
    python predict.py --run runs/X --images FOLDER      # unlabelled images: scores and nearest training lesions
    python predict.py --run runs/X --images FOLDER --projector   # ... and their embeddings for TensorBoard (OUT/tb)
    python predict.py --run runs/cv/fold*/bce --images FOLDER --out E   # an ensemble of runs (see ensemble.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from config import COUNT, Parser, add_settings
from dataset import prepare_data
from devices import pick_device
from ensemble import HOW, write_ensemble
from evaluation import evaluate_run, evaluate_split, needs_val, predict_dataset, predict_images
from inference import load_run
from metadata import find_layout, load_metadata
from reports import BOOTSTRAP, summary_line
from splits import read_splits, train_prevalence
from tabular import with_metadata
from utils import UserError, cli_main
from webreport import write_report

ELSEWHERE = {"data_dir": "another labelled dataset (same layouts as driver.py): score every row",
             "csv": "with --image-dir: another labelled dataset given by its CSV",
             "workers": "data loader worker processes (default: the run's)",
             "device": "compute device (default auto)",
             "extra_csv": "patient metadata (age, sex, site) of the --data-dir/--csv/--images data, joined by image "
                          "id, for a run trained with --metadata; without it those facts count as unknown"}


def build_parser() -> Parser:
    p = Parser(description="Evaluate or apply a saved run.")
    p.add_argument("--run", required=True, nargs="+", metavar="RUN",
                   help="run folder written by driver.py; several make an ensemble (e.g. a cross-validation's folds)")
    p.add_argument("--ensemble", choices=HOW, default="mean",
                   help="how an ensemble combines its runs: mean probability or mean rank (default mean)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    add_settings(p, ["data_dir", "csv", "image_dir", "extra_csv", "device", "workers", "skip_bad_images", "neighbours"],
                 help=ELSEWHERE)
    p.add_argument("--images", help="a folder of unlabelled images: scores, neighbours.csv and similar.png")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--projector", action="store_true",
                   help="with --data-dir/--csv/--images: also write their embeddings, metadata and thumbnails for "
                        "TensorBoard's embedding projector into OUT/tb (tensorboard --logdir OUT)")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (8 flips/rotations averaged)")
    p.add_argument("--bootstrap", type=COUNT, default=BOOTSTRAP,
                   help=f"bootstrap resamples for the 95%% confidence intervals (default {BOOTSTRAP})")
    p.set_defaults(device="auto")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.projector and not (args.images or args.data_dir or args.csv):
        raise UserError("--projector is for other data (--data-dir, --csv or --images): the run's test split is in "
                        "RUN/tb already")
    if len(args.run) == 1:
        run_dir = Path(args.run[0])
        score_run(run_dir, args, default_out(args, run_dir))
        return
    if not args.out:
        raise UserError("several --run folders make an ensemble: say where it goes with --out")
    run_dirs = [Path(r) for r in args.run]
    if not (args.images or args.data_dir or args.csv):
        require_same_split(run_dirs, args.split)
    members = [score_run(r, args, Path(args.out) / "members" / f"{i}-{r.name}") for i, r in enumerate(run_dirs, 1)]
    first = load_run(run_dirs[0], pick_device("cpu"))[0]
    m = write_ensemble(members, run_dirs, args.out, args.ensemble, first, patient_ids(args, run_dirs[0]),
                       float(np.mean([train_prevalence(r / "splits.csv") for r in run_dirs])), args.bootstrap)
    print(f"ensemble of {len(run_dirs)} runs ({args.ensemble}) → {Path(args.out) / 'predictions.csv'}"
          if m is None else f"ensemble of {len(run_dirs)} runs ({args.ensemble}): {summary_line(m, args.out)}")


def default_out(args, run_dir: Path) -> Path | None:
    """Where a single run's results on other data go (its own splits' go into the run folder)."""
    source = args.images or args.data_dir or args.csv
    return None if not source else Path(args.out) if args.out else run_dir / f"predict-{Path(source).stem}"


def score_run(run_dir: Path, args, out_dir: Path | None) -> Path:
    """Score with one run; returns the folder that holds its predictions.csv."""
    device = pick_device(args.device)
    s, model = load_run(run_dir, device)
    s.skip_bad_images = args.skip_bad_images
    if args.workers is not None:
        s.workers = args.workers
    if args.neighbours is not None:
        s.neighbours = args.neighbours
    tta = args.tta or s.tta  # a run trained with --tta is re-evaluated the way it was first evaluated
    if args.images or args.data_dir or args.csv:
        if needs_val(run_dir, tta):  # the threshold and k come from val: choose them first, as for the test split
            evaluate_split(run_dir, "val", s, model, run_data(s, run_dir), device, tta, args.bootstrap)
        if args.images:
            result = predict_images(args.images, out_dir, run_dir, s, model, device, tta, args.extra_csv,
                                    args.projector)
            print(f"{len(result)} predictions (val's threshold) → {out_dir / 'predictions.csv'}; nearest training "
                  f"lesions → {out_dir / 'neighbours.csv'}, {out_dir / 'similar.png'}")
        else:
            m = predict_dataset(args.data_dir, args.csv, args.image_dir, out_dir, run_dir, s, model, device, tta,
                                args.bootstrap, args.extra_csv, args.projector)
            print(summary_line(m, out_dir))
        print(f"report: {write_report(out_dir, run=run_dir, command=True)}")
        return out_dir
    data = run_data(s, run_dir)
    if args.split == "test" and needs_val(run_dir, tta):
        metrics = evaluate_run(run_dir, s, model, data, device, tta, args.bootstrap)
    else:
        metrics = evaluate_split(run_dir, args.split, s, model, data, device, tta, args.bootstrap)
    print(summary_line(metrics, run_dir / args.split))
    print(f"report: {write_report(run_dir, command=True)}")  # the page shows the new numbers
    return run_dir / args.split


def require_same_split(run_dirs, split: str) -> None:
    """An ensemble on a run's own split needs runs whose `split` holds the same images (then none of them trained
    on those): e.g. folds of the rest around one held-out test split, not the folds of a cross-validation."""
    def ids(run_dir):
        splits = read_splits(run_dir / "splits.csv")
        return set(splits.loc[splits["split"] == split, "isic_id"])
    first = ids(run_dirs[0])
    for run_dir in run_dirs[1:]:
        if ids(run_dir) != first:
            raise UserError(f"the {split} split of {run_dir} holds other images than that of {run_dirs[0]}: "
                            "ensemble them on other data (--data-dir, --csv or --images)")


def patient_ids(args, run_dir: Path) -> dict | None:
    """isic_id → patient_id of the images an ensemble scored: its confidence intervals resample patients."""
    if args.images:
        return None
    if args.data_dir or args.csv:
        frame = load_metadata(find_layout(args.data_dir, args.csv, args.image_dir)[0])
    else:
        frame = read_splits(run_dir / "splits.csv")
    return dict(zip(frame["isic_id"], frame["patient_id"]))


def run_data(s, run_dir: Path):
    """The run's own data, split as it was, with its patient metadata encoded as in training."""
    return with_metadata(prepare_data(s, splits_path=run_dir / "splits.csv"), s, run_dir)


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
