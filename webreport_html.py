"""The HTML pieces report.html is made of (escaped text, numbers as the page writes them, tables, embedded figures)
and the readers of a run folder's JSON and CSV files; webreport.py arranges them into the page's sections."""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

SHOWN_ROWS = 20  # of the history and of CSV tables; the files hold all


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value) -> str:
    """How the page writes a number: integers as they are, everything else with 4 decimals (like the summary)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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


def figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def table(header, rows, numeric_from: int = 1) -> str:
    """rows hold HTML already escaped; columns from `numeric_from` on are right-aligned numbers."""
    def cells(row, tag):
        return "".join(f'<{tag}{" class=n" if i >= numeric_from else ""}>{c}</{tag}>' for i, c in enumerate(row))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f'<div class="wrap"><table><tr>{cells(header, "th")}</tr>{body}</table></div>'


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def csv_table(rows: list[dict], title: str) -> str:
    shown = f"the first {SHOWN_ROWS} of {len(rows)} rows" if len(rows) > SHOWN_ROWS else f"{len(rows)} rows"
    return (f"<p>{esc(title)}: {shown}.</p>"
            + table(list(rows[0]), [[esc(v) for v in r.values()] for r in rows[:SHOWN_ROWS]]))


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
