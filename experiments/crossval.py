"""Patient-grouped k-fold cross-validation: colour baseline vs BCE-only vs contrastive + kNN vs the joint loss
(and the joint loss with a cross-batch memory, a pair miner, diagnosis pairs, an instance term or a positive margin),
each paired with BCE-only per fold; the embeddings' retrieval of training lesions beside.

    python -m experiments.crossval --data-dir "$ISIC_DATA" --profile cpu      # docs/results.md, cross-validation

Each fold holds out a disjoint set of patients as its test split; the rest is split again by patient into train and
validation (the threshold, kNN's k and, unless --select-metric last, the epoch are chosen there). Every method sees
exactly the same folds. Every other flag goes to driver.py; with --tta (on in --profile cpu) the table is of the
test-time-augmented scores. --resume reuses fold runs that finished with the same settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dataset import load_images
from engine.config import COUNT, Parser, Settings, parse_cli, settings_from_cli
from experiments.baseline import fit_colour_baseline, metadata_baseline_scores, score_colour_baseline
from experiments.variants import (CONTRASTIVE_ONLY, CROSS_BATCH_MEMORY, DIAGNOSIS_PAIRS, INSTANCE_TERM, MINED_PAIRS,
                                  POSITIVE_MARGIN, WITH_METADATA, finished_run, train_and_test)
from isic.metadata import find_layout, join_columns, load_duplicates, load_metadata
from isic.splits import fold_splits, leakage_groups, split_unit, write_splits
from scoring.metrics import auroc, partial_auc
from utils import UserError, cli_main, write_csv, write_text

# key → (name in the table, flags for driver.py, which scorer of test/metrics.json to read)
METHODS = {
    "bce": ("BCE only", {"w_cl": 0.0}, "head"),
    "knn": ("contrastive + kNN", CONTRASTIVE_ONLY, "knn"),
    "joint": ("joint (BCE + contrastive)", {}, "head"),
    "xbm": ("joint + cross-batch memory 256", CROSS_BATCH_MEMORY, "head"),
    "miner": ("joint + multi-similarity miner", MINED_PAIRS, "head"),
    "diagnosis": ("joint + diagnosis pairs", DIAGNOSIS_PAIRS, "head"),
    "instance": ("joint + instance term 0.5", INSTANCE_TERM, "head"),
    "margin": ("joint + positive margin 0.5", POSITIVE_MARGIN, "head"),
    "metadata": ("BCE only + metadata (age, sex, site)", WITH_METADATA, "head"),
}
BASELINES = {"baseline": "colour baseline", "metadata-baseline": "metadata baseline (age, sex, site)"}
REFERENCE = "BCE only"  # every other method's per-fold difference is taken against it
# How the embedding retrieves training lesions for the test split (metrics.json "retrieval"): column → (path, title)
RETRIEVAL = {"precision_at_1": (("mean_of_classes", "precision_at_1"), "precision@1"),
             "map_at_r": (("mean_of_classes", "mean_average_precision_at_r"), "MAP@R"),
             "visual_agreement": (("visual_agreement@5",), "visual agreement@5"),
             "hub_share": (("hub_share@5",), "hub share@5"),
             "hub_max": (("hub_max@5",), "hub max@5")}
COLUMNS = ["method", "fold", "auroc", "pauc", *RETRIEVAL]


def retrieval_values(view: dict) -> list:
    """RETRIEVAL's numbers of one view of test/metrics.json, NaN where it has none (older runs)."""
    values = []
    for path, _ in RETRIEVAL.values():
        found = view.get("retrieval", {})
        for key in path:
            found = found.get(key, {}) if isinstance(found, dict) else {}
        values.append(float(found) if isinstance(found, (int, float)) else float("nan"))
    return values


def metadata_baseline(frame: pd.DataFrame) -> tuple[float, float]:
    train, test = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    p = metadata_baseline_scores(train, test)
    return auroc(test["target"], p), partial_auc(test["target"], p)


def colour_baseline(frame: pd.DataFrame, cache: np.ndarray) -> tuple[float, float]:
    train, test = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    model = fit_colour_baseline(np.asarray(cache[train["row"].to_numpy()]), train["target"].to_numpy())
    p = score_colour_baseline(model, np.asarray(cache[test["row"].to_numpy()]))
    return auroc(test["target"], p), partial_auc(test["target"], p)


def run(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=COUNT, default=5, help="number of patient-grouped folds, at least 2 (default 5)")
    p.add_argument("--cv-out", default="runs/crossval", help="folder for the fold runs and the table")
    p.add_argument("--methods", default="baseline,bce,knn,joint",
                   help=f"comma-separated, from {', '.join([*BASELINES, *METHODS])} (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="reuse fold runs in --cv-out that finished with the same settings (after a stop, or to add "
                   "methods to a table)")
    p.add_argument("--only-finished", action="store_true",
                   help="tabulate the fold runs in --cv-out that finished with the same settings, train none")
    args, driver_flags = p.parse_known_args(argv)
    crossval(args, driver_flags)


def crossval(args, driver_flags) -> None:
    if args.folds < 2:
        raise UserError("--folds must be at least 2: each fold is the test split once")
    given = parse_cli(driver_flags)
    s: Settings = settings_from_cli(given)
    csv_path, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
    frame = load_metadata(csv_path)
    wanted = args.methods.split(",")
    unknown = set(wanted) - set(METHODS) - set(BASELINES)
    if unknown:
        raise UserError(f"unknown --methods {', '.join(sorted(unknown))}: choose from "
                        f"{', '.join([*BASELINES, *METHODS])}")
    if "metadata-baseline" in wanted:
        frame = join_columns(frame, csv_path, s.extra_csv)
    frame["row"] = np.arange(len(frame))
    _, cache, _ = load_images(frame, image_dir, s)
    out = Path(args.cv_out)
    rows = []
    pairs = load_duplicates(s.duplicates) if s.duplicates else []
    frame["group"], frame["split_by"] = leakage_groups(frame, pairs), split_unit(frame, "patient", pairs)
    for fold, split in enumerate(fold_splits(frame, frame["group"].to_numpy(), args.folds, s.seed), start=1):
        frame["split"] = split
        splits_csv = out / f"fold{fold}" / "splits.csv"
        write_splits(frame, splits_csv)
        if "baseline" in wanted:
            rows.append((BASELINES["baseline"], fold, *colour_baseline(frame, cache), *[np.nan] * len(RETRIEVAL)))
        if "metadata-baseline" in wanted:
            rows.append((BASELINES["metadata-baseline"], fold, *metadata_baseline(frame), *[np.nan] * len(RETRIEVAL)))
        for key, (name, method_flags, which) in METHODS.items():
            if key not in wanted:
                continue
            run_dir = out / f"fold{fold}" / key
            run_flags = {**given, **method_flags, "splits": str(splits_csv), "out": str(run_dir), "overwrite": True}
            result = (args.resume or args.only_finished) and finished_run(run_dir, run_flags, splits_csv)
            if not result and args.only_finished:
                continue
            result = result or train_and_test(run_flags)
            view = result.get("tta", result)  # with --tta the table is of the TTA scores
            metrics = view["scorers"][which]
            rows.append((name, fold, metrics["auroc"], metrics["pauc"], *retrieval_values(view)))
        print_table(rows, args.folds)
    table = paired_differences(pd.DataFrame(rows, columns=COLUMNS))
    write_csv(out / "crossval.csv", table)
    flags = " ".join(driver_flags) + (" (AUROC and pAUC with test-time augmentation)" if s.tta else "")
    write_text(out / "crossval.md", f"driver.py flags: {flags}\n\n{markdown(table)}")
    print(f"\n{markdown(table)}\nper-fold results: {out / 'crossval.csv'}")


def paired_differences(table: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """The table with each row's AUROC and pAUC minus the reference method's on the same fold (NaN for the reference
    itself and where it has no result): the folds differ more from each other than the methods do, so only paired
    differences can tell methods apart."""
    ref = table[table["method"] == reference].set_index("fold")[["auroc", "pauc"]]
    table = table.copy()
    for metric in ("auroc", "pauc"):
        diff = table[metric] - table["fold"].map(ref[metric])
        table[f"{metric}_minus_bce"] = diff.where(table["method"] != reference)
    return table


def _signs(values) -> str:
    return " ".join("+" if v > 0 else "−" if v < 0 else "0" for v in values)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| method | test AUROC (mean ± std) | test pAUC (mean ± std) | folds |", "|---|---|---|---|"]
    for method, part in table.groupby("method", sort=False):
        lines.append(f"| {method} | {part['auroc'].mean():.3f} ± {part['auroc'].std(ddof=1):.3f} | "
                     f"{part['pauc'].mean():.3f} ± {part['pauc'].std(ddof=1):.3f} | {len(part)} |")
    paired = paired_differences(table[["method", "fold", "auroc", "pauc"]]).dropna(subset=["auroc_minus_bce"])
    if len(paired):
        lines += ["", f"Paired per-fold differences against {REFERENCE} (method − {REFERENCE} on the same fold; "
                  "signs in fold order):", "",
                  "| method | Δ test AUROC (mean ± std) | per fold | Δ test pAUC (mean ± std) | per fold | folds |",
                  "|---|---|---|---|---|---|"]
        for method, part in paired.groupby("method", sort=False):
            a, p = part["auroc_minus_bce"], part["pauc_minus_bce"]
            lines.append(f"| {method} | {a.mean():+.3f} ± {a.std(ddof=1):.3f} | {_signs(a)} | "
                         f"{p.mean():+.4f} ± {p.std(ddof=1):.4f} | {_signs(p)} | {len(part)} |")
    return "\n".join(lines + retrieval_lines(table)) + "\n"


def retrieval_lines(table: pd.DataFrame) -> list:
    """Mean ± std over folds of how each method's embedding retrieves training lesions for the test split."""
    if not set(RETRIEVAL) <= set(table.columns) or table[list(RETRIEVAL)].isna().all().all():
        return []
    lines = ["", "Retrieval of training lesions for the test split (embedding space; precision@1 and MAP@R as the "
             "mean of the two classes):", "",
             "| method | " + " | ".join(title for _, title in RETRIEVAL.values()) + " | folds |",
             "|---|" + "---|" * (len(RETRIEVAL) + 1)]
    for method, part in table.dropna(subset=list(RETRIEVAL), how="all").groupby("method", sort=False):
        cells = [f"{part[c].mean():.3f} ± {part[c].std(ddof=1):.3f}" for c in RETRIEVAL]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(part)} |")
    return lines


def print_table(rows, folds):
    fold = rows[-1][1] if rows else 0
    table = pd.DataFrame(rows, columns=COLUMNS)
    print(f"\n--- after fold {fold}/{folds} ---\n" + markdown(table), flush=True)


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
