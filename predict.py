"""Score a saved run: its val/test split, another labelled dataset, or a folder of unlabelled images.

    python predict.py --run runs/X                      # re-evaluate the test split → runs/X/test/
    python predict.py --run runs/X --tta                # ... also with 8-fold flip/rotation test-time augmentation
    python predict.py --run runs/X --split val
    python predict.py --run runs/X --data-dir OTHER     # every row of another labelled dataset, every scorer
    python predict.py --run runs/X --images FOLDER      # unlabelled images: scores and nearest training lesions
    python predict.py --run runs/X --images FOLDER --projector   # ... and their embeddings for TensorBoard (OUT/tb)
    python predict.py --run runs/cv/fold*/bce --images FOLDER --out E   # an ensemble of runs (see workflow/ensemble.py)

Another labelled dataset may hold images the run trained or validated on (by id, from its splits.csv): those are
scored into seen_in_training.csv and left out of the metrics unless --include-seen. An ensemble writes only under
--out (its members' results in OUT/members/<k>-<run>/): the member run folders stay as they were.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dataset import prepare_data
from engine import timings
from engine.config import COUNT, Parser, add_settings
from engine.devices import pick_device
from workflow.ensemble import HOW, Member, validation_scores, write_ensemble
from workflow.evaluation import (LoadedRun, OtherData, evaluate_run, evaluate_split, needs_val, predict_dataset,
                                 predict_images)
from isic.metadata import find_layout, load_metadata
from isic.splits import read_splits, train_prevalence
from isic.tabular import with_metadata
from reporting.reports import BOOTSTRAP, summary_line
from reporting.webreport import write_report
from scoring.inference import load_run
from utils import UserError, cli_main

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
                   help="how an ensemble combines its runs: mean probability, or rank: the mean place of each run's "
                        "probability among its own validation probabilities (a score in [0, 1]) (default mean)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split of the run to evaluate")
    add_settings(p, ["data_dir", "csv", "image_dir", "extra_csv", "device", "workers", "skip_bad_images", "neighbours"],
                 help=ELSEWHERE)
    p.add_argument("--images", help="a folder of unlabelled images: scores, neighbours.csv and similar.png")
    p.add_argument("--out", help="where --data-dir/--images results go (default: RUN/predict-<folder name>)")
    p.add_argument("--projector", action="store_true",
                   help="with --data-dir/--csv/--images: also write their embeddings, metadata and thumbnails for "
                        "TensorBoard's embedding projector into OUT/tb (tensorboard --logdir OUT)")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (8 flips/rotations averaged); an ensemble then "
                        "combines the TTA view")
    p.add_argument("--include-seen", action="store_true",
                   help="with --data-dir/--csv: count images the run trained or validated on (by id, from its "
                        "splits.csv) in the metrics; by default they are scored into seen_in_training.csv and left out")
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
        score_run(load(run_dir, args), args, default_out(args, run_dir))
        return
    if not args.out:
        raise UserError("several --run folders make an ensemble: say where it goes with --out")
    out, run_dirs = Path(args.out), [Path(r) for r in args.run]
    require_outside(out, run_dirs)
    if not other_data(args):
        require_same_split(run_dirs, args.split)
    with timings.recording(out / "timings.json"):
        score_ensemble(args, out, run_dirs)
        print(f"time: {timings.current_summary()} (phases in {out / 'timings.json'})")


def score_ensemble(args, out: Path, run_dirs: list[Path]) -> None:
    """Every member scores the images into OUT/members/<k>-<run>/ (each a phase of OUT/timings.json), then their
    scores are combined into OUT."""
    loaded = [load(run_dir, args, home=out / "members" / f"{i}-{run_dir.resolve().name}")
              for i, run_dir in enumerate(run_dirs, 1)]
    view = "tta" if args.tta else "plain"
    if args.ensemble == "rank":  # before any member scores: a missing file would stop the ensemble at its end
        for member in (m for m in loaded if not needs_val(m)):
            validation_scores(Member(member.run_dir, member.out, member.val_dir), view)
    members = []
    for i, member in enumerate(loaded, 1):  # each member writes only under OUT/members/<k>-<run>/
        with timings.phase(f"evaluation.member{i}", note=str(member.run_dir)):
            scored = score_run(member, args, member.home if other_data(args) else None)
        members.append(Member(member.run_dir, scored, member.val_dir))
    prevalence = float(np.mean([train_prevalence(r / "splits.csv") for r in run_dirs]))
    with timings.phase("evaluation.ensemble", note=f"{len(members)} members ({args.ensemble})"):
        m = write_ensemble(members, out, args.ensemble, loaded[0].s, view, patient_ids(args, run_dirs[0]),
                           prevalence, args.bootstrap)
    print(f"ensemble of {len(run_dirs)} runs ({args.ensemble}) → {out / 'predictions.csv'}"
          if m is None else f"ensemble of {len(run_dirs)} runs ({args.ensemble}): {summary_line(m, out)}")
    with timings.phase("evaluation.report"):
        print(f"report: {write_report(out, run=out, command=True)}")


def other_data(args) -> bool:
    return bool(args.images or args.data_dir or args.csv)


def default_out(args, run_dir: Path) -> Path | None:
    """Where a single run's results on other data go (its own splits' go into the run folder)."""
    source = args.images or args.data_dir or args.csv
    return None if not source else Path(args.out) if args.out else run_dir / f"predict-{Path(source).stem}"


def load(run_dir: Path, args, home: Path | None = None) -> LoadedRun:
    """The run with predict.py's overrides; `home`: where its evaluations go instead of the run folder."""
    device = pick_device(args.device)
    s, model = load_run(run_dir, device)
    s.skip_bad_images = args.skip_bad_images
    if args.workers is not None:
        s.workers = args.workers
    if args.neighbours is not None:
        s.neighbours = args.neighbours
    if args.tta and s.tta:
        print(f"note: {run_dir} was evaluated with TTA already ({tta_origin(s)}): --tta changes nothing")
    tta = args.tta or s.tta  # a run trained with --tta is re-evaluated the way it was first evaluated
    return LoadedRun(run_dir, s, model, device, tta, args.bootstrap, home)


def tta_origin(s) -> str:
    return "its --tta" if "tta" in s.given else f"its profile {s.profile}"


def score_run(run: LoadedRun, args, out_dir: Path | None) -> Path:
    """Score with one run; returns the folder that holds its predictions.csv (and timings.json)."""
    where = out_dir or run.out / args.split
    if out_dir is None:
        where.mkdir(parents=True, exist_ok=True)  # the run's own split: timings.json is kept there as phases end
    with timings.recording(where / "timings.json"):
        folder = score_with(run, args, out_dir)
        print(f"time: {timings.current_summary()} (phases in {where / 'timings.json'})")
    return folder


def score_with(run: LoadedRun, args, out_dir: Path | None) -> Path:
    if other_data(args):
        if needs_val(run):  # the threshold and k come from val: choose them first, as for the test split
            evaluate_split(run, "val", run_data(run))
        if args.images:
            result = predict_images(args.images, out_dir, run, args.extra_csv, args.projector)
            print(f"{len(result)} predictions (val's threshold) → {out_dir / 'predictions.csv'}; nearest training "
                  f"lesions → {out_dir / 'neighbours.csv'}, {out_dir / 'similar.png'}")
        else:
            source = OtherData(args.data_dir, args.csv, args.image_dir, args.extra_csv, args.include_seen)
            print(summary_line(predict_dataset(source, out_dir, run, args.projector), out_dir))
        print(f"report: {write_report(out_dir, run=run.run_dir, command=True)}")
        return out_dir
    data = run_data(run)
    if args.split == "test" and needs_val(run):
        metrics = evaluate_run(run, data)
    else:
        metrics = evaluate_split(run, args.split, data)
    folder = run.out / args.split
    print(summary_line(metrics, folder))
    # the page shows the new numbers: the run's own, or an ensemble member's beside its results
    page = write_report(folder, run=run.run_dir, command=True) if run.home else write_report(run.run_dir, command=True)
    print(f"report: {page}")
    return folder


def require_outside(out: Path, run_dirs) -> None:
    """An ensemble leaves its members' run folders as they are: it may not write into one."""
    for run_dir in run_dirs:
        if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
            raise UserError(f"--out {out} is inside the run folder {run_dir}: an ensemble writes beside its members")


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


def run_data(run: LoadedRun):
    """The run's own data, split as it was, with its patient metadata encoded as in training."""
    return with_metadata(prepare_data(run.s, splits_path=Path(run.run_dir) / "splits.csv"), run.s, run.run_dir)


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
