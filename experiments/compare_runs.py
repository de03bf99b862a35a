"""Whether two run folders computed the same thing: splits.csv, history.csv (less its `seconds` column) and
val/test metrics.json, byte for byte.

    python -m experiments.compare_runs RUN_A RUN_B      # exit 0 and "identical", or 2 and each difference

Use it to show that a change of the code changes no result (the same `driver.py --demo` before and after), or that a
resumed run ended like an uninterrupted one.
"""
from __future__ import annotations

import sys

from engine.config import Parser
from experiments.comparison import COMPARED, differences
from utils import UserError, cli_main


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
