"""Whether two run folders computed the same thing: splits.csv, history.csv (less its `seconds` column) and
val/test metrics.json, byte for byte. Used by experiments/compare_runs.py and the GPU check."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

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
