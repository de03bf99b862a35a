"""Does averaging fold models help? K members trained on K folds of the data around one held-out test split, each
scored on that test split alone, against their ensemble (mean and rank of probabilities, ensemble.py).

    python -m experiments.fold_ensemble --data-dir "$ISIC_DATA" --profile cpu --out runs/fold-ensemble

The test split is the usual one (driver.py's, from --seed); every member keeps it unseen and validates on a different
fold of the rest (by patient), as the ISIC 2020 winners' fold ensembles did. Numbers are the plain head's (no TTA).
Every other flag goes to driver.py; --resume reuses members that finished with the same settings on the same split.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from engine.config import COUNT, Parser, parse_cli, settings_from_cli
from experiments.variants import finished_run, train_and_test
from isic.splits import read_splits, rotating_val_splits, train_prevalence, write_splits
from workflow import pipeline
from workflow.ensemble import HOW, Member, write_ensemble
from utils import cli_main, write_text


def member_metrics(given: dict, splits_csv: Path, run_dir: Path, resume: bool) -> dict:
    run_flags = {**given, "splits": str(splits_csv), "out": str(run_dir), "overwrite": True}
    return (resume and finished_run(run_dir, run_flags, splits_csv)) or train_and_test(run_flags)


def fold_ensemble(given: dict, folds: int, out: Path, resume: bool) -> pd.DataFrame:
    s = settings_from_cli(given)
    pipeline.run({**given, "out": str(out / "split"), "check_data": True, "overwrite": True})
    frame = read_splits(out / "split" / "splits.csv")
    rows, runs = [], []
    columns = rotating_val_splits(frame["split"], frame["target"].to_numpy(), frame["group"].to_numpy(), folds, s.seed)
    for k, column in enumerate(columns, start=1):
        splits_csv = out / f"member{k}" / "splits.csv"
        write_splits(frame.assign(split=column), splits_csv)
        run_dir = out / f"member{k}" / "run"
        m = member_metrics(given, splits_csv, run_dir, resume)
        rows.append({"model": f"member {k}", "auroc": m["auroc"], "pauc": m["pauc"]})
        runs.append(run_dir)
    groups = dict(zip(frame["isic_id"], frame["patient_id"]))
    prevalence = float(np.mean([train_prevalence(r / "splits.csv") for r in runs]))
    for how in HOW:
        members = [Member(r, r / "test", r / "val") for r in runs]
        m = write_ensemble(members, out / f"ensemble-{how}", how, s, "plain", groups, prevalence)
        rows.append({"model": f"ensemble ({how})", "auroc": m["auroc"], "pauc": m["pauc"]})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    members = table[table["model"].str.startswith("member")]
    lines = ["| model | test AUROC | test pAUC |", "|---|---|---|"]
    lines += [f"| {r.model} | {r.auroc:.3f} | {r.pauc:.3f} |" for r in table.itertuples()]
    lines.append(f"| members, mean ± std | {members['auroc'].mean():.3f} ± {members['auroc'].std(ddof=1):.3f} | "
                 f"{members['pauc'].mean():.3f} ± {members['pauc'].std(ddof=1):.3f} |")
    for r in table[~table["model"].str.startswith("member")].itertuples():
        better = int((r.auroc > members["auroc"]).sum())
        lines.append(f"| {r.model} − members | {r.auroc - members['auroc'].mean():+.3f} (above {better} of "
                     f"{len(members)} members) | {r.pauc - members['pauc'].mean():+.3f} |")
    return "\n".join(lines) + "\n"


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=COUNT, default=5, help="ensemble members, one per fold of the rest (default 5)")
    p.add_argument("--out", default="runs/fold-ensemble", help="folder for the members and the table")
    p.add_argument("--resume", action="store_true", help="reuse members that finished with the same settings on the same split")
    args, driver_flags = p.parse_known_args(argv)
    out = Path(args.out)
    table = fold_ensemble(parse_cli(driver_flags), args.folds, out, args.resume)
    text = f"driver.py flags: {' '.join(driver_flags)}\n\n{markdown(table)}"
    write_text(out / "fold_ensemble.md", text)
    print("\n" + text)


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
