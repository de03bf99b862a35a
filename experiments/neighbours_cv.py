"""Neighbours by look against neighbours by the class embedding, paired on the same trained runs of a
cross-validation: the setting changes only where the nearest training lesions are found, so nothing is retrained.

    python -m experiments.crossval --data-dir "$ISIC_DATA" --profile cpu --no-tsne --methods joint \
        --neighbours-by embedding --cv-out runs/cv-neighbours
    python -m experiments.neighbours_cv --cv-out runs/cv-neighbours

Each fold's run (foldK/joint, evaluated by embedding) is copied to foldK/look, whose val and test splits are evaluated
again by look, as `predict.py --run` does; the table pairs the two on every fold (docs/similarity.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

from dataset import prepare_data
from experiments.crossval import RETRIEVAL, retrieval_values
from isic.tabular import with_metadata
from scoring.inference import load_run
from utils import UserError, cli_main, write_csv, write_text
from workflow.evaluation import LoadedRun, evaluate_run

BY = {"embedding": "joint", "look": "look"}  # neighbours by → the fold's run folder
COLUMNS = ["auroc", "pauc", *RETRIEVAL]
TITLES = {"auroc": "AUROC", "pauc": "pAUC", **{c: title for c, (_, title) in RETRIEVAL.items()}}


def evaluated_by_look(run: Path, copy: Path) -> None:
    """`copy`: `run` with its val and test splits evaluated again by look (kept when already done)."""
    if (copy / "test" / "metrics.json").is_file() and \
            json.loads((copy / "config.json").read_text()).get("neighbours_by") == "look":
        return
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tb"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "neighbours_by": "look"}, indent=2))
    s, model = load_run(copy, torch.device("cpu"))  # what predict.py --run COPY --split test does
    evaluate_run(LoadedRun(copy, s, model, torch.device("cpu"), s.tta),
                 with_metadata(prepare_data(s, splits_path=copy / "splits.csv"), s, copy))


def fold_rows(fold_dir: Path) -> list[dict]:
    rows = []
    for by, name in BY.items():
        metrics = json.loads((fold_dir / name / "test" / "metrics.json").read_text())
        for view in ("plain", "tta"):
            part = metrics if view == "plain" else metrics.get("tta")
            if part is None:
                continue
            head = part["scorers"]["head"]
            rows.append({"fold": int(fold_dir.name.removeprefix("fold")), "by": by, "view": view,
                         "auroc": head["auroc"], "pauc": head["pauc"],
                         **dict(zip(RETRIEVAL, retrieval_values(part)))})
    return rows


def markdown(table: pd.DataFrame) -> str:
    lines = []
    for view, part in table.groupby("view", sort=False):
        lines += [f"\n{view} view, test split: mean ± std over {part['fold'].nunique()} folds", "",
                  "| neighbours by | " + " | ".join(TITLES[c] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for by, rows in part.groupby("by", sort=False):
            lines.append(f"| {by} | " + " | ".join(f"{rows[c].mean():.3f} ± {rows[c].std(ddof=1):.3f}"
                                                   for c in COLUMNS) + " |")
        pivot = part.pivot(index="fold", columns="by", values=COLUMNS)
        lines += ["", "look − embedding on the same fold (folds in order):", "",
                  "| | " + " | ".join(TITLES[c] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        differences = {c: pivot[c]["look"] - pivot[c]["embedding"] for c in COLUMNS}
        lines.append("| mean | " + " | ".join(f"{d.mean():+.3f}" for d in differences.values()) + " |")
        for fold in pivot.index:
            lines.append(f"| fold {fold} | " + " | ".join(f"{d[fold]:+.3f}" for d in differences.values()) + " |")
    return "\n".join(lines) + "\n"


def run(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cv-out", required=True, help="the cross-validation's folder (crossval.py --cv-out)")
    args = p.parse_args(argv)
    folds = sorted(Path(args.cv_out).glob("fold*/joint/test/metrics.json"))
    if not folds:
        raise UserError(f"no finished fold runs in {args.cv_out} (foldK/joint/test/metrics.json)")
    for metrics in folds:
        evaluated_by_look(metrics.parents[1], metrics.parents[2] / "look")
    table = pd.DataFrame([row for metrics in folds for row in fold_rows(metrics.parents[2])])
    write_csv(Path(args.cv_out) / "neighbours.csv", table)
    text = markdown(table)
    write_text(Path(args.cv_out) / "neighbours.md", text)
    print(text)


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
