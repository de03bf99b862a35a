"""The one page of a run: report.html, every number and figure of a run folder in one file a browser opens from disk.

It is written from the files the run already holds (commands.txt, config.json, data_report.txt, history.csv, the
history plots, val/ and test/ metrics.json and figures) and recomputes nothing: each number on the page is the one in
metrics.json or history.csv, formatted. Figures are embedded as data URIs and there is no script, so a copied folder
opens on a machine without network, in a narrow window and on paper. Written after each epoch that redraws the history
plots (the page then says the run is still training), at the end of training, and by predict.py whenever it evaluates.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from config import PROFILES, Settings
from utils import write_text
from webreport_html import (SHOWN_ROWS, csv_table, esc, figure, fmt, is_number, leaves, number_groups, read_csv,
                            read_json, table)

REPORT, COMMANDS = "report.html", "commands.txt"
SPLITS = ("test", "val")  # test first: the headline (and first when the columns stack in a narrow window)
HISTORY_FIGURES = {"loss.png": "loss", "accuracy.png": "accuracy", "auroc.png": "validation AUROC",
                   "pauc.png": "validation pAUC", "pairs.png": "contrastive pairs"}
CURVE_FIGURES = {"roc.png": "ROC", "pr.png": "precision-recall", "calibration.png": "calibration",
                 "confusion_matrix.png": "confusion matrix"}
OWN_SECTION = {"embeddings.png": "embeddings", "gallery.png": "error gallery", "similar.png": "similar lesions"}
KNOWN = {**HISTORY_FIGURES, **CURVE_FIGURES, **OWN_SECTION}
HIDDEN_SETTINGS = {"out", "versions", "resume"}  # the folder itself; versions have their own table
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auroc", "val_pauc", "val_accuracy", "lr", "seconds")
THRESHOLD_ROWS = ("threshold", "sensitivity", "specificity", "precision", "f1", "accuracy", "balanced_accuracy",
                  "average_precision", "n", "n_positive")
CALIBRATION_ROWS = {"brier": "Brier (raw: 50% training prior)", "brier_prior_corrected": "Brier, prior-corrected",
                    "ece": "ECE (raw)", "ece_prior_corrected": "ECE, prior-corrected",
                    "train_prevalence": "training prevalence", "ece_bins": "ECE bins"}
CSS = Path(__file__).with_name("webreport.css")  # inlined into each page


def record_command(folder) -> None:
    """Append this process's command line to FOLDER/commands.txt: config.json holds the settings, not how they were
    typed, and a resume or a re-evaluation adds its own line."""
    path = Path(folder) / COMMANDS
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')}  cd {shlex.quote(os.getcwd())} && "
            f"{shlex.join([Path(sys.executable).name, *sys.argv])}\n")
    write_text(path, (path.read_text() if path.is_file() else "") + line)


def write_report(folder, training: bool = False, run=None, command: bool = False) -> Path:
    """Write FOLDER/report.html; `run` is the trained run when FOLDER is a predict.py output for other data.
    command: first record this process's command line (predict.py, after it succeeded)."""
    folder = Path(folder)
    if command:
        record_command(folder)
    write_text(folder / REPORT, Page(folder, Path(run) if run else None, training).render())
    return folder / REPORT


class Page:
    """The sections of report.html, in order. Each number from a metrics.json goes through `num`, which tags it with
    its key (data-key="split:path.in.metrics") and remembers it, so the numbers no table showed are listed at the end."""

    def __init__(self, folder: Path, run: Path | None, training: bool):
        self.folder, self.training = folder, training
        self.run = run or folder  # where config.json and the training files are
        self.config = read_json(self.run / "config.json")
        self.history = read_csv(self.run / "history.csv")
        if run is None:
            self.splits = {name: folder / name for name in SPLITS if (folder / name).is_dir()}
        else:  # a predict.py output: one set of images, named after its folder
            self.splits = {folder.name: folder}
        self.metrics = {name: read_json(d / "metrics.json") for name, d in self.splits.items()}
        self.shown = {name: set() for name in self.splits}

    def num(self, split: str, *path) -> str:
        value = self.metrics[split]
        for key in path:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return "–"
        self.shown[split].add(path)
        key = ".".join(map(str, path))
        return f'<span class="n" data-key="{esc(split)}:{esc(key)}">{esc(fmt(value))}</span>'

    def render(self) -> str:
        name = self.config.get("out") and Path(self.config["out"]).name or self.folder.resolve().name
        sections = [("run", "What was run", self.what_was_run()), ("curves", "Training curves", self.curves()),
                    ("summary", "Test summary", self.summary()),
                    ("plots", "ROC, precision-recall and calibration", self.figures_by_split(CURVE_FIGURES)),
                    ("embeddings", "Embeddings", self.figures_by_split({"embeddings.png": "embeddings"}, wide=True)),
                    ("gallery", "Error gallery", self.figures_by_split({"gallery.png": "gallery"}, wide=True))]
        optional = [("similar", "Similar lesions", self.similar()), ("other", "Other figures", self.other_figures()),
                    ("numbers", "Other numbers in metrics.json", self.other_numbers())]
        sections += [s for s in optional if s[2]]  # last: other_numbers needs every table drawn
        nav = "".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
        body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>'
                       for key, title, content in sections)
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                f"<title>{esc(name)}: report</title><style>{CSS.read_text()}</style></head><body>"
                f"<h1>Run <code>{esc(name)}</code></h1>{self.status()}<nav>{nav}</nav>{body}"
                f'<p class="note">Written by webreport.py from the files in {esc(self.folder.resolve())} at '
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}.</p></body></html>\n")

    def status(self) -> str:
        done, epochs = len(self.history), self.config.get("epochs", "?")
        if self.training:
            return (f'<p class="status training">Still training: {done} of {epochs} epochs done. This page is '
                    f"rewritten as the history plots are redrawn; val/test results appear when training ends.</p>")
        evaluated = [name for name, m in self.metrics.items() if m]
        text = f"{done} of {epochs} epochs trained" if self.history else "scored with a trained run"
        text += f"; evaluated: {', '.join(evaluated)}" if evaluated else "; not evaluated"
        return f'<p class="status">{esc(text)}.</p>'

    # ---------------------------------------------------------------- what was run

    def what_was_run(self) -> str:
        parts = []
        commands = [self.run / COMMANDS] + ([self.folder / COMMANDS] if self.folder != self.run else [])
        lines = [line for path in commands if path.is_file() for line in path.read_text().splitlines()]
        parts.append("<h3>Command line</h3>" + (f"<pre>{esc(chr(10).join(lines))}</pre>" if lines else
                                               '<p class="note">not recorded (a run from before commands.txt)</p>'))
        if self.run != self.folder:
            parts.append(f"<p>Model: the run in <code>{esc(self.run.resolve())}</code>.</p>")
        if self.config:
            parts.append(self.settings_table())
            versions = self.config.get("versions", {})
            parts.append("<h3>Library versions</h3>" + table(["library", "version"],
                                                             [[esc(k), esc(v)] for k, v in versions.items()]))
        parts.append(self.data_summary())
        return "".join(parts)

    def settings_table(self) -> str:
        """Settings that differ from the defaults, with where each value came from (the profile or the command)."""
        defaults = dataclasses.asdict(Settings())
        profile = PROFILES.get(self.config.get("profile", "default"), {})
        rows = []
        for key, value in self.config.items():
            if key in HIDDEN_SETTINGS or key not in defaults or value == defaults[key]:
                continue
            source = f"profile {self.config['profile']}" if key in profile and profile[key] == value else "given"
            rows.append([f"<code>{esc(key)}</code>", esc(value), esc(defaults[key]), esc(source)])
        return "<h3>Settings that differ from the defaults</h3>" + table(
            ["setting", "this run", "default", "from"], rows, numeric_from=9)

    def data_summary(self) -> str:
        report = self.run / "data_report.txt"
        if self.run == self.folder and report.is_file():
            text = report.read_text()
            counts = [int(n) for n in re.findall(r"in more than one split: (\d+)", text)]
            verdict = ('<span class="ok">passed</span>: no patient or leakage group in more than one split'
                       if counts and not any(counts) else
                       '<span class="bad">FAILED</span>: see the counts below' if counts else "not found")
            return f"<h3>Data and split</h3><p>Leakage check {verdict}.</p><pre>{esc(text)}</pre>"
        m = next(iter(self.metrics.values()), {})
        if "dataset" in m:
            return (f"<h3>Data</h3><p><code>{esc(m['dataset'])}</code>: {self.num(self.folder.name, 'n')} images, "
                    f"{self.num(self.folder.name, 'n_positive')} malignant.</p>")
        return ""

    # ---------------------------------------------------------------- training

    def curves(self) -> str:
        if not self.history:
            return '<p class="note">No history.csv in the run folder.</p>'
        metric = self.config.get("select_metric", "pauc")
        column = f"val_{'pauc' if metric == 'last' else metric}"
        best, score = len(self.history) - 1, -math.inf  # as train.TrainingState.record picks best.pt
        for i, r in enumerate(self.history if metric != "last" else []):
            if float(r.get(column) or "nan") > score or not math.isfinite(score):
                best, score = i, float(r.get(column) or "nan")
        header = [*HISTORY_COLUMNS, f"best.pt ({metric})"]
        rows = [[esc(r["epoch"]), *(esc(fmt(float(r[c]))) if r.get(c) else "–" for c in HISTORY_COLUMNS[1:]),
                 "best" if i == best else ""] for i, r in enumerate(self.history)]
        shown = rows[-SHOWN_ROWS:]
        note = (f'<p class="note">The last {len(shown)} of {len(rows)} epochs; every epoch is in history.csv.</p>'
                if len(shown) < len(rows) else "")
        figures = {f: figure(self.run / f, c) for f, c in HISTORY_FIGURES.items() if (self.run / f).is_file()}
        wide = figures.pop("pairs.png", "")  # two panels: full width
        return table(header, shown) + note + f'<div class="grid">{"".join(figures.values())}</div>' + wide

    # ---------------------------------------------------------------- results

    def summary(self) -> str:
        cards = [self.card(name) for name, m in self.metrics.items() if m]
        if not cards:
            predictions = self.predictions()
            return predictions or '<p class="note">Not evaluated yet: no val/ or test/ metrics.json.</p>'
        return f'<div class="grid">{"".join(cards)}</div>'

    def views(self, split: str) -> list[tuple[str, tuple]]:
        return [("", ())] + ([(", TTA", ("tta",))] if "tta" in self.metrics[split] else [])

    def card(self, split: str) -> str:
        m = self.metrics[split]
        views = self.views(split)
        scorer_rows = []
        for suffix, at in views:
            part = m.get(at[0], {}) if at else m
            for name, r in part.get("scorers", {}).items():
                label = {"knn": "kNN", "head": "head"}.get(name, name) + suffix
                if "k" in r:
                    label = f"kNN (k={self.num(split, *at, 'scorers', name, 'k')}){suffix}"
                scorer_rows.append([label, self.with_ci(split, *at, "scorers", name, "auroc"),
                                    self.with_ci(split, *at, "scorers", name, "pauc")])
        b = m.get("bootstrap", {})
        ci_note = (f'<p class="note">95% CIs: {self.num(split, "bootstrap", "resamples")} bootstrap resamples by '
                   f'{esc(b.get("unit"))}, stratified by {esc(b.get("stratified_by"))} (seed '
                   f'{self.num(split, "bootstrap", "seed")}, level {self.num(split, "bootstrap", "level")}).</p>'
                   if b else "")
        columns = ["", *("TTA" if suffix else "plain" for suffix, _ in views)]
        at_threshold = [[f"{name} [95% CI]", *(self.with_ci(split, *at, key) for _, at in views)]
                        for key, name in (("auroc", "AUROC"), ("pauc", "pAUC")) if key in m]
        at_threshold += [[esc(k.replace("_", " ")), *(self.num(split, *at, k) for _, at in views)]
                         for k in THRESHOLD_ROWS if k in m]
        chosen = f'<p class="note">Threshold chosen on {esc(m.get("threshold_chosen_on", "?"))}.</p>'
        return (f"<div><h3>{esc(split)}</h3>"
                + (table(["scorer", "AUROC [95% CI]", "pAUC [95% CI]"], scorer_rows) if scorer_rows else "") + ci_note
                + table(columns, at_threshold) + chosen
                + "".join(self.confusion(split, at, suffix) for suffix, at in views)
                + self.calibration(split, views) + self.retrieval(split, views) + "</div>")

    def with_ci(self, split: str, *path) -> str:
        *parent, name = path
        return (f"{self.num(split, *path)} <span class=ci>[{self.num(split, *parent, name + '_ci95', 0)}, "
                f"{self.num(split, *parent, name + '_ci95', 1)}]</span>")

    def confusion(self, split: str, at: tuple, suffix: str) -> str:
        def cell(i, j):
            return self.num(split, *at, "confusion_matrix", i, j)
        rows = [["actual benign", cell(0, 0), cell(0, 1)], ["actual malignant", cell(1, 0), cell(1, 1)]]
        return f"<p>Confusion matrix{esc(suffix)}:</p>" + table(["", "predicted benign", "predicted malignant"], rows)

    def calibration(self, split: str, views) -> str:
        if "calibration" not in self.metrics[split]:
            return ""
        rows = [[name, *(self.num(split, *at, "calibration", key) for _, at in views)]
                for key, name in CALIBRATION_ROWS.items()]
        return "<p>Calibration:</p>" + table(["", *("TTA" if suffix else "plain" for suffix, _ in views)], rows)

    def retrieval(self, split: str, views) -> str:
        """Retrieval metrics of the embedding (metrics.json "retrieval"): one row per group of queries."""
        parts = []
        for suffix, at in views:
            r = (self.metrics[split].get("tta", {}) if at else self.metrics[split]).get("retrieval")
            if not isinstance(r, dict):
                continue
            groups = list(number_groups(r))
            columns = list(dict.fromkeys(c for _, v in groups for c in v))
            rows = [[esc(" ".join(path).replace("_", " ")), *(self.num(split, *at, "retrieval", *path, c)
                                                                 if c in v else "" for c in columns)]
                    for path, v in groups]
            about = "; ".join(f"{esc(k)}: {self.num(split, *at, 'retrieval', k)}" for k, v in r.items()
                              if not isinstance(v, dict))
            parts.append(f"<p>Retrieval{esc(suffix)} ({about}):</p>"
                         + table(["queries", *(esc(c.replace("_", " ")) for c in columns)], rows))
        return "".join(parts)

    def predictions(self) -> str:
        """Unlabelled images (predict.py --images): the predictions.csv, most probable melanomas first."""
        rows = read_csv(self.folder / "predictions.csv")
        column = next((c for c in ("probability", "rank_score") if rows and c in rows[0]), None)  # rank: an ensemble's
        if column is None:
            return ""
        rows.sort(key=lambda r: -float(r[column]))
        flagged = sum(r.get("predicted_malignant") == "1" for r in rows)
        return csv_table(rows, f"{len(rows)} unlabelled images, {flagged} above the run's threshold (predictions.csv, "
                               f"the most probable first)")

    # ---------------------------------------------------------------- figures

    def figures_by_split(self, names: dict, wide: bool = False) -> str:
        """Each figure for every split, side by side (wide figures one under the other)."""
        blocks = []
        for file, caption in names.items():
            found = [figure(d / file, f"{split}: {caption}") for split, d in self.splits.items()
                     if (d / file).is_file()]
            if found:
                blocks.append("".join(found) if wide else f'<div class="grid">{"".join(found)}</div>')
        return "".join(blocks) or '<p class="note">Not drawn yet.</p>'

    def similar(self) -> str:
        parts = [self.figures_by_split({"similar.png": "similar lesions"}, wide=True)] if any(
            (d / "similar.png").is_file() for d in self.splits.values()) else []
        for split, d in self.splits.items():
            rows = read_csv(d / "neighbours.csv")
            if rows:
                parts.append(csv_table(rows, f"{split}: neighbours.csv"))
        return "".join(parts)

    def other_figures(self) -> str:
        """Figures this page does not know yet: shown rather than silently left out."""
        places = [("", self.run)] + [(f"{split}: ", d) for split, d in self.splits.items() if d != self.run]
        found = [figure(p, prefix + p.name) for prefix, d in places for p in sorted(d.glob("*.png"))
                 if p.name not in KNOWN]
        return f'<div class="grid">{"".join(found)}</div>' if found else ""

    def other_numbers(self) -> str:
        """Every number in metrics.json that no table above showed (e.g. metrics added after this page was written)."""
        rows = []
        for split, m in self.metrics.items():
            for path, value in leaves(m):
                if path not in self.shown[split] and is_number(value):
                    rows.append([esc(split), f"<code>{esc('.'.join(map(str, path)))}</code>", self.num(split, *path)])
        return table(["set", "key", "value"], rows, numeric_from=2) if rows else ""
