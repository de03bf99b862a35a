"""Whether two run folders computed the same thing: splits.csv, history.csv (less its `seconds` column) and
val/test metrics.json, byte for byte.

    python -m experiments.compare_runs RUN_A RUN_B      # exit 0 and "identical", or 2 and each difference

Use it to show that a change of the code changes no result (the same `driver.py --demo` before and after), or that a
resumed run ended like an uninterrupted one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from config import Parser
from utils import UserError, cli_main

COMPARED = ["splits.csv", "history.csv", "val/metrics.json", "test/metrics.json"]


def comparable_text(path: Path) -> str:
    if path.name == "history.csv":  # wall-clock time differs between any two runs
        return pd.read_csv(path).drop(columns="seconds").to_csv(index=False)
    return path.read_text()


def differences(a, b) -> list[str]:
    """The files of COMPARED that differ or are missing in one of the two runs (empty: the runs agree)."""
    found = []
    for name in COMPARED:
        left, right = Path(a) / name, Path(b) / name
        if not left.is_file() or not right.is_file():
            found.append(f"{name}: missing in {left.parent if not left.is_file() else right.parent}")
        elif comparable_text(left) != comparable_text(right):
            found.append(f"{name}: differs")
    return found


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    args = p.parse_args(argv)
    found = differences(args.run_a, args.run_b)
    if found:
        raise UserError("the runs differ: " + "; ".join(found))
    print(f"identical: {', '.join(COMPARED)} (history.csv less its seconds column)")


if __name__ == "__main__":
    sys.exit(cli_main(run))
