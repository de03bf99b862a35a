"""Ablation in one command: BCE only, contrastive loss scored by kNN, and the joint loss, over several seeds.

    python -m experiments.ablation --data-dir DATA --seeds 0 1 2 --out runs/ablation [any driver.py flag, e.g. --epochs 8]

The split is made once (driver.py --check-data, from --seed, default 42) and given to every run with --splits,
so only the training seed changes. Each run is an ordinary run folder (OUT/<variant>-seed<N>) that predict.py can
re-evaluate. The contrastive-only model (--w-bce 0) has an untrained head, so it is scored by kNN on its embeddings
and evaluated from its last epoch (--select-metric last): the head's validation metric means nothing for it.
Prints mean ± std over seeds of test AUROC and pAUC for each variant and scorer; every number goes to OUT/ablation.csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from engine.config import SEED, Parser, parse_cli
from experiments.variants import CONTRASTIVE_ONLY, train_and_test
from workflow import pipeline
from utils import cli_main, write_csv

# name → (loss weights, scorers reported); the head of a model trained without BCE is not a classifier
VARIANTS = {
    "bce-only": ({"w_cl": 0.0}, ["head", "knn", "prototype"]),
    "contrastive+knn": (CONTRASTIVE_ONLY, ["knn", "prototype"]),
    "joint": ({}, ["head", "knn", "prototype"]),
}


def ablation(given: dict, seeds, out: Path) -> pd.DataFrame:
    split_dir = out / "split"
    pipeline.run({**given, "out": str(split_dir), "check_data": True})  # writes split_dir/splits.csv once
    rows = []
    for seed in seeds:
        for name, (weights, scorers) in VARIANTS.items():
            print(f"\n=== {name}, seed {seed} ===", flush=True)
            m = train_and_test({**given, **weights, "seed": seed, "splits": str(split_dir / "splits.csv"),
                                "out": str(out / f"{name}-seed{seed}")})
            rows += [{"variant": name, "seed": seed, "scorer": scorer, "auroc": m["scorers"][scorer]["auroc"],
                      "pauc": m["scorers"][scorer]["pauc"]} for scorer in scorers]
            write_csv(out / "ablation.csv", pd.DataFrame(rows))  # after every run: partial results survive a stop
    return pd.DataFrame(rows)


def summary(results: pd.DataFrame) -> str:
    table = results.groupby(["variant", "scorer"], sort=False)[["auroc", "pauc"]].agg(["mean", "std", "count"])
    lines = [f"{'variant':<17} {'scorer':<10} {'test AUROC':<17} {'test pAUC':<17} seeds"]
    for (variant, scorer), r in table.iterrows():
        lines.append(f"{variant:<17} {scorer:<10} {r['auroc', 'mean']:.4f} ± {r['auroc', 'std']:.4f}  "
                     f"{r['pauc', 'mean']:.4f} ± {r['pauc', 'std']:.4f}  {int(r['auroc', 'count'])}")
    return "\n".join(lines)


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0],
               epilog="Every other flag is passed to driver.py (see python driver.py --help).")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--out", default="runs/ablation", help="folder for the runs and ablation.csv")
    args, rest = p.parse_known_args(argv)
    given = parse_cli(rest)
    if len(args.seeds) < 2:
        print("note: one seed gives no standard deviation", file=sys.stderr)
    results = ablation(given, args.seeds, Path(args.out))
    print("\n" + summary(results))
    print(f"\nper-run numbers: {Path(args.out) / 'ablation.csv'}")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
