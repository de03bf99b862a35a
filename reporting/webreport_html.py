"""What report.html is made of, as plain data for templates/report.html.j2: table cells (text, tagged numbers, code),
tables and embedded figures; how the page writes numbers and names; and the readers of a run folder's JSON and CSV
files. webreport.py arranges them into the page's sections; the template turns them into HTML, escaping every field."""
from __future__ import annotations

import base64
import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SHOWN_ROWS = 20  # of CSV tables; the files hold all
# Keys as a reader says them; any other key: underscores become spaces, "_at_5" becomes "@5", and WORDS are spelled.
READABLE = {"r_precision": "R-precision", "mean_average_precision_at_r": "MAP@R", "per_class": "per class",
            "mean_of_classes": "mean of the classes", "all_queries": "all queries", "isic_id": "image"}
WORDS = {"knn": "kNN", "tta": "TTA", "auroc": "AUROC", "pauc": "pAUC", "ece": "ECE"}


# ---------------------------------------------------------------- cells: what a table holds

@dataclass
class Num:
    """A number from a metrics.json, tagged with where it came from (data-key="split:path.in.metrics")."""
    key: str
    text: str
    kind: str = "num"


@dataclass
class CI:
    """A value with its 95% confidence interval."""
    value: Num
    low: Num
    high: Num
    kind: str = "ci"


@dataclass
class Code:
    text: str
    kind: str = "code"


@dataclass
class Link:
    """A link to another file of the folder (a relative path), e.g. an ensemble member's report."""
    href: str
    text: str
    kind: str = "link"


@dataclass
class Parts:
    """Several cells written one after the other (e.g. text around a number)."""
    parts: list
    kind: str = "parts"


@dataclass
class Table:
    """rows of cells (str, Num, CI, Code, Parts); columns from `numeric_from` on are right-aligned numbers."""
    header: list
    rows: list
    numeric_from: int = 1
    note: str = ""  # said above the table


@dataclass
class Figure:
    src: str  # a data URI
    caption: str


@dataclass
class Grid:
    """Figures side by side (they stack in a narrow window); wide ones each take the page's width; folded ones too,
    each behind its caption in a <details> element. kind "trio": three side by side in a wide window."""
    figures: list = field(default_factory=list)
    wide: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    kind: str = "grid"


# ---------------------------------------------------------------- how numbers and names are written

def fmt(value) -> str:
    """How the page writes a number from metrics.json: integers as they are, everything else with 4 decimals."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def short(text: str) -> str:
    """A number read from a CSV, as a reader needs it: integers as they are, others with 3 decimals (tiny ones in
    scientific notation rather than as 0.000); anything that is not a number unchanged."""
    try:
        value = float(text)
    except ValueError:
        return text
    if re.fullmatch(r"-?\d+", text.strip()) or not math.isfinite(value):
        return text
    return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def learning_rate(value: float) -> str:
    return f"{value:.2e}"


def history_cell(column: str, text: str | None) -> str:
    """A history.csv value: the learning rate in scientific notation, seconds to a tenth, others as metrics."""
    if not text:
        return "–"
    value = float(text)
    return learning_rate(value) if column == "lr" else f"{value:.1f}" if column == "seconds" else fmt(value)


def same_as_default(value, default) -> bool:
    """Equal, or the default folder made absolute (driver.py stores paths so that predict.py runs from anywhere)."""
    if value == default:
        return True
    if isinstance(value, str) and isinstance(default, str) and default and Path(value).is_absolute():
        tail = Path(default).parts
        return not Path(default).is_absolute() and Path(value).parts[-len(tail):] == tail
    return False


def readable(name: str) -> str:
    """A metrics.json or CSV key as a heading: precision_at_1 → precision@1, hub_share@5 → hub share@5."""
    if name in READABLE:
        return READABLE[name]
    words = re.sub(r"_at_(\w+)$", r"@\1", name).split("_")
    return " ".join(WORDS.get(w, w) for w in words)


# ---------------------------------------------------------------- files of a run folder

def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def figure(path: Path, caption: str) -> Figure:
    return Figure(data_uri(path), caption)


def csv_table(rows: list[dict], what: str, numeric_from: int = 1) -> Table:
    """The first SHOWN_ROWS rows of a CSV, numbers shortened; `what` names it in the line above the table."""
    shown = f"the first {SHOWN_ROWS} of {len(rows)} rows" if len(rows) > SHOWN_ROWS else plural(len(rows), "row")
    return Table([readable(c) for c in rows[0]], [[short(v) for v in r.values()] for r in rows[:SHOWN_ROWS]],
                 numeric_from, note=f"{what}: {shown}.")


def per_epoch(name: str) -> str:
    """A phase's name with its epoch number as N: training.epoch17 → training.epochN (one row for all epochs)."""
    return re.sub(r"epoch\d+", "epochN", name)


def phase_note(first: dict, times: int) -> str:
    note = str(first.get("note", ""))
    return note if times == 1 else f"{times} times; the first: {note}" if note else f"{times} times"


def timings(t: dict) -> dict:
    """timings.json summarised: each group's total ("group" is a phase's name before its first dot) and each phase,
    the phases of every epoch as one row (count, total, mean), so a long run's page stays short ({}: none)."""
    phases = t.get("phases") or []
    if not phases:
        return {}
    groups, steps = {}, {}
    for p in phases:
        name, seconds = str(p.get("name", "")), float(p.get("seconds", 0.0))
        group, step = groups.setdefault(name.split(".")[0], [0, 0.0]), steps.setdefault(per_epoch(name), [0, 0.0, p])
        group[0], group[1], step[0], step[1] = group[0] + 1, group[1] + seconds, step[0] + 1, step[1] + seconds
    rows = [[Code(name), phase_note(p, n), str(n), f"{s:.1f}", f"{s / n:.1f}"] for name, (n, s, p) in steps.items()]
    total = t.get("total_seconds")
    return dict(phases=Table(["phase", "note", "times", "seconds", "mean"], rows, numeric_from=2),
                groups=Table(["group", "phases", "seconds"], [[g, str(n), f"{s:.1f}"] for g, (n, s) in groups.items()]),
                total=f"{total:.1f} s ({total / 60:.1f} min)" if is_number(total) else "")


# ---------------------------------------------------------------- walking metrics.json

def dig(value, path):
    """value[path[0]][path[1]]...; "–" where the path leads nowhere."""
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return "–"
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_groups(value: dict, path=()):
    """(path, dict) for every dict within `value` that holds numbers directly."""
    numbers = {k: v for k, v in value.items() if is_number(v)}
    if numbers and path:
        yield path, numbers
    for k, v in value.items():
        if isinstance(v, dict):
            yield from number_groups(v, (*path, k))


def leaves(value, path=()):
    """(path, value) for every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path, value
