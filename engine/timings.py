"""Where a run's time goes: the wall time of each phase, kept in timings.json beside the results.

    with timings.recording(out / "timings.json", keep=resumed):   # a run or a prediction
        with timings.phase("data.cache") as p:
            ...
            p.note = "740 images, 61 images/s"

The part of a phase's name before the first "." is its group (data, training, validation, evaluation). A resumed run
keeps the phases of its earlier sessions and adds its own. Outside `recording`, `phase` records nothing, so library
functions can be timed whoever calls them. The file is rewritten after every phase: an interrupted run keeps what it
measured. Only the process that writes files records (rank 0 under torchrun).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from utils import write_json

GROUPS = ("data", "training", "validation", "evaluation")


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    note: str = ""


class Recorder:
    def __init__(self, path: Path, phases: list[dict]):
        self.path, self.phases = Path(path), phases

    def add(self, phase: Phase) -> None:
        entry = {"name": phase.name, "seconds": round(phase.seconds, 3)}
        self.phases.append({**entry, "note": phase.note} if phase.note else entry)
        if self.path.parent.is_dir():  # a new run's folder exists only once its data was found good
            write_json(self.path, table(self.phases))


_recorder: Recorder | None = None


def table(phases: list[dict]) -> dict:
    return {"phases": phases, "total_seconds": round(sum(p["seconds"] for p in phases), 3)}


def read(path) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text())["phases"] if path.is_file() else []


@contextlib.contextmanager
def recording(path, keep: bool = False, active: bool = True):
    """Record the phases timed inside into `path`; with `keep`, after those already there (a resumed run)."""
    global _recorder
    if not active:
        yield None
        return
    outer, _recorder = _recorder, Recorder(path, read(path) if keep else [])
    try:
        yield _recorder
    finally:
        save()
        _recorder = outer


_suffixes: list[str] = []


@contextlib.contextmanager
def part(name: str):
    """Phases timed inside get ".name" appended: evaluation.score becomes evaluation.score.test in part "test"."""
    _suffixes.append(name)
    try:
        yield
    finally:
        _suffixes.pop()


@contextlib.contextmanager
def phase(name: str, note: str = ""):
    """Time the block as phase `name` of the current recording (a block that raises is not recorded)."""
    current, started = Phase(".".join([name, *_suffixes]), note=note), time.perf_counter()
    yield current
    current.seconds = time.perf_counter() - started
    if _recorder is not None:
        _recorder.add(current)


def add(name: str, seconds: float, note: str = "") -> None:
    """Record a phase timed by the caller (e.g. an epoch stopped by a signal, whose block did not end normally)."""
    if _recorder is not None:
        _recorder.add(Phase(name, seconds, note))


def save() -> None:
    """Write the current recording now (a new run's folder appears after its first phases were timed)."""
    if _recorder is not None and _recorder.path.parent.is_dir():
        write_json(_recorder.path, table(_recorder.phases))


def summary(phases: list[dict]) -> str:
    """'312 s: data 110, training 120, validation 13, evaluation 69' (seconds per group, in the groups' order)."""
    by_group: dict[str, float] = {}
    for p in phases:
        group = p["name"].split(".")[0]
        by_group[group] = by_group.get(group, 0.0) + p["seconds"]
    order = [g for g in GROUPS if g in by_group] + [g for g in by_group if g not in GROUPS]
    parts = ", ".join(f"{g} {by_group[g]:.0f}" for g in order)
    return f"{sum(by_group.values()):.0f} s: {parts}"


def current_summary() -> str:
    return summary(_recorder.phases) if _recorder is not None else ""


def format_table(phases: list[dict]) -> str:
    """The phases as an aligned text table, longest name first column, then seconds and notes."""
    width = max([len(p["name"]) for p in phases] + [5])
    rows = [f"{'phase':<{width}}  {'seconds':>8}  note"]
    rows += [f"{p['name']:<{width}}  {p['seconds']:>8.1f}  {p.get('note', '')}".rstrip() for p in phases]
    rows.append(f"{'total':<{width}}  {sum(p['seconds'] for p in phases):>8.1f}")
    return "\n".join(rows)
