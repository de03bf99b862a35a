"""The one page of a run: report.html, every number and figure of a run folder in one file a browser opens from disk.

It is written from the files the run already holds (commands.txt, config.json, data_report.txt, history.csv, the
history plots, timings.json, val/ and test/ metrics.json and figures) and recomputes nothing: each number on the page
is the one in metrics.json, history.csv or timings.json, formatted. The page's layout is templates/report.html.j2;
this module gathers what each section shows. Figures are embedded as data URIs and there is no script, so a copied
folder opens on a machine without network, in a narrow window and on paper. Written after each epoch that redraws the
history plots (the page then says the run is still training), at the end of training, and by predict.py.
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

import jinja2
from markupsafe import Markup

from engine.config import PROFILES, Settings
from reporting.reports import set_notes
from utils import write_text
from reporting.webreport_html import (CI, Code, Grid, Link, Num, Parts, Table, csv_table, dig, figure, fmt,
                                      history_cell, is_number, leaves, number_groups, plural, read_csv, read_json,
                                      readable, same_as_default, timings)

REPORT, COMMANDS, TIMINGS, SKIPPED = "report.html", "commands.txt", "timings.json", "skipped_images.csv"
SPLITS = ("test", "val")  # test first: the headline (and first when the columns stack in a narrow window)
HISTORY_FIGURES = {"loss.png": "loss", "accuracy.png": "accuracy", "auroc.png": "validation AUROC",
                   "pauc.png": "validation pAUC", "pairs.png": "contrastive pairs"}
CURVE_FIGURES = {"roc.png": "ROC", "pr.png": "precision-recall", "calibration.png": "calibration",
                 "confusion_matrix.png": "confusion matrix"}
OWN_SECTION = {"embeddings.png": "embeddings", "gallery.png": "error gallery", "similar.png": "similar lesions"}
KNOWN = {**HISTORY_FIGURES, **CURVE_FIGURES, **OWN_SECTION}
HIDDEN_SETTINGS = {"out", "versions", "resume", "given"}  # the folder itself; versions have their own table
HISTORY_COLUMNS = {"epoch": "epoch", "train_loss": "train loss", "val_loss": "val loss", "val_auroc": "val AUROC",
                   "val_pauc": "val pAUC", "val_accuracy": "val accuracy", "lr": "learning rate", "seconds": "seconds"}
THRESHOLD_ROWS = ("threshold", "sensitivity", "specificity", "precision", "f1", "accuracy", "balanced_accuracy",
                  "average_precision", "n", "n_positive")
CALIBRATION_ROWS = {"brier": "Brier (raw: 50% training prior)", "brier_prior_corrected": "Brier, prior-corrected",
                    "ece": "ECE (raw)", "ece_prior_corrected": "ECE, prior-corrected",
                    "train_prevalence": "training prevalence", "ece_bins": "ECE bins"}
# In the template's order: how good it is first (results, then the curves), then the figures, then the details.
SECTIONS = {"summary": "Test summary", "ensemble": "Ensemble members", "predictions": "Predictions",
            "skipped": "Skipped images", "curves": "Training curves", "plots": "ROC, precision-recall and calibration",
            "embeddings": "Embeddings", "gallery": "Error gallery", "similar": "Similar lesions",
            "details": "Results in detail", "run": "What was run", "timings": "Timings", "other": "Other figures",
            "numbers": "Other numbers in metrics.json"}
RULES = {"mean": "the mean of the members' probabilities",
         "rank": "the mean over the members of where each member's probability falls among its own validation "
                 "probabilities (0: below all, 1: above all): a rank score, not a probability"}
CSS = Path(__file__).with_name("webreport.css")  # inlined into each page
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                               autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}."


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
    write_text(folder / REPORT, render(folder, Path(run) if run else None, training))
    return folder / REPORT


def render(folder: Path, run: Path | None = None, training: bool = False) -> str:
    return TEMPLATES.get_template("report.html.j2").render(Page(folder, run, training).context())


class Page:
    """What each section of report.html shows, as plain data for the template. Each number from a metrics.json goes
    through `num`, which tags it with its key and remembers it, so the numbers no table showed are listed at the end."""

    def __init__(self, folder: Path, run: Path | None, training: bool):
        self.folder, self.training = folder, training
        self.run = run or folder  # where config.json and the training files are
        self.config = read_json(self.run / "config.json")
        self.history = read_csv(self.run / "history.csv")
        if training:  # val/test and the figures drawn from them come when training ends
            self.splits = {}
        elif run is None:
            self.splits = {name: folder / name for name in SPLITS if (folder / name).is_dir()}
        else:  # a predict.py output: one set of images, named after its folder
            self.splits = {folder.name: folder}
        self.metrics = {name: read_json(d / "metrics.json") for name, d in self.splits.items()}
        self.evaluated = [name for name, m in self.metrics.items() if m]
        self.predictions = read_csv(folder / "predictions.csv") if not self.evaluated else []
        self.skipped = read_csv(folder / SKIPPED)
        self.shown = {name: set() for name in self.splits}
        self.about = read_json(folder / "ensemble.json") or next(
            (m["ensemble"] for m in self.metrics.values() if "ensemble" in m), {})  # an ensemble of runs: how

    def context(self) -> dict:
        """Everything the template shows, section by section; `sections` names those that have something to show."""
        predict = self.run != self.folder
        named = self.config.get("out") and not predict
        c = dict(name=Path(self.config["out"]).name if named else self.folder.resolve().name, predict=predict,
                 kind="Ensemble" if self.about else "Predictions" if predict else "Run",
                 css=Markup(CSS.read_text()), status=self.status(), ensemble=self.ensemble(),
                 run=self.what_was_run(), curves=self.curves(), summary=[self.card(s) for s in self.evaluated],
                 predictions=self.prediction_table(), skipped=self.skipped_table(),
                 plots=self.curve_figures(),
                 embeddings=self.figures_by_split({"embeddings.png": "embeddings"}, wide=True),
                 gallery=self.figures_by_split({"gallery.png": "gallery"}, wide=True), similar=self.similar(),
                 timings=timings(read_json(self.folder / TIMINGS)), other=self.other_figures(),
                 folder=str(self.folder.resolve()), written=time.strftime("%Y-%m-%d %H:%M:%S"))
        c["details"] = c["summary"]  # the same cards: their headline numbers first, the rest after the figures
        c["numbers"] = self.other_numbers()  # last: it needs every table drawn
        titles = {**SECTIONS, "summary": "Results"} if c["predict"] or self.about else SECTIONS
        c["sections"] = {key: title for key, title in titles.items() if c[key]}
        return c

    def num(self, split: str, *path) -> Num | str:
        value = self.metrics[split]
        for key in path:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return "–"
        self.shown[split].add(path)
        return Num(f"{split}:{'.'.join(map(str, path))}", fmt(value))

    def status(self) -> dict:
        done, epochs = len(self.history), self.config.get("epochs", "?")
        if self.training:
            return dict(training=True, text=f"Still training: {done} of {epochs} epochs done. This page is rewritten "
                                            "as the history plots are redrawn; val/test results appear when "
                                            "training ends.")
        model = f"the model of run {self.run.resolve().name}"
        if self.about:
            model = f"an ensemble of {len(self.about.get('runs', []))} runs ({self.about.get('how')})"
        threshold = "the ensemble's threshold" if self.about else "the run's threshold"
        skipped = f"; {plural(len(self.skipped), 'unreadable file')} skipped" if self.skipped else ""
        if self.predictions:
            flagged = sum(r.get("predicted_malignant") == "1" for r in self.predictions)
            text = (f"{plural(len(self.predictions), 'unlabelled image')} scored by {model}: {flagged} above "
                    f"{threshold}{skipped}.")
        elif self.folder != self.run or self.about:
            n = self.metrics[self.evaluated[0]].get("n", "?") if self.evaluated else 0
            text = f"{n} labelled images evaluated by {model}{skipped}." if n else f"Nothing scored yet by {model}."
            text += "".join(f" {sentence(note)}" for note in self.set_notes())
        else:
            text = f"{done} of {epochs} epochs trained" if self.history else "No training history"
            text += f"; evaluated: {', '.join(self.evaluated)}." if self.evaluated else "; not evaluated."
        return dict(training=False, text=text)

    def set_notes(self) -> list[str]:
        """Images left out of a labelled set's metrics, and a set too small for them (reports.set_notes)."""
        if not self.evaluated:
            return []
        self.shown[self.evaluated[0]].add(("left_out_seen_in_training",))  # said here, not in the leftover table
        return set_notes(self.metrics[self.evaluated[0]])

    # ---------------------------------------------------------------- what was run

    def what_was_run(self) -> dict:
        files = [self.run / COMMANDS] + ([self.folder / COMMANDS] if self.folder != self.run else [])
        return dict(commands=[line for path in files if path.is_file() for line in path.read_text().splitlines()],
                    model=str(self.run.resolve()) if self.folder != self.run else "",
                    settings=self.settings_table() if self.config else None,
                    versions=Table(["library", "version"], [[k, str(v)] for k, v in
                                                            self.config.get("versions", {}).items()]),
                    data=self.data_summary())

    def settings_table(self) -> Table:
        """Settings that differ from the defaults, with where each value came from: typed by the user (config.json
        "given"), the profile, or chosen by the program (e.g. the loader workers for this machine)."""
        defaults = dataclasses.asdict(Settings())
        rows = [[Code(key), str(value), str(defaults[key]), self.source(key, value)]
                for key, value in self.config.items()
                if key not in HIDDEN_SETTINGS and key in defaults and not same_as_default(value, defaults[key])]
        return Table(["setting", "this run", "default", "from"], rows, numeric_from=9)

    def source(self, key: str, value) -> str:
        given, profile = self.config.get("given"), self.config.get("profile", "default")
        if given is not None and key in given:
            return "given"
        if key in PROFILES.get(profile, {}) and PROFILES[profile][key] == value:
            return f"profile {profile}"
        return "not recorded" if given is None else "chosen by the program"  # e.g. loader workers for this machine

    def data_summary(self) -> dict:
        """A run's data_report.txt and its leakage check, or the labelled dataset a predict.py folder scored."""
        none = dict(report="", leakage="", dataset="", n="", n_positive="")
        report = self.run / "data_report.txt"
        if self.run == self.folder and report.is_file():
            text = report.read_text()
            counts = [int(n) for n in re.findall(r"in more than one split: (\d+)", text)]
            return {**none, "report": text,
                    "leakage": "passed" if counts and not any(counts) else "failed" if counts else "not found"}
        m = next(iter(self.metrics.values()), {})
        if "dataset" in m:
            return {**none, "dataset": m["dataset"], "n": self.num(self.folder.name, "n"),
                    "n_positive": self.num(self.folder.name, "n_positive")}
        return none

    # ---------------------------------------------------------------- training

    def curves(self) -> dict:
        drawn = [f for f in HISTORY_FIGURES if (self.run / f).is_file()]
        figures = Grid([figure(self.run / f, HISTORY_FIGURES[f]) for f in drawn if f != "pairs.png"],
                       [figure(self.run / f, HISTORY_FIGURES[f]) for f in drawn if f == "pairs.png"])  # two panels
        if not self.history:
            return dict(table=None, note="", figures=figures) if figures.figures or figures.wide else {}
        metric = self.config.get("select_metric", "pauc")
        column = f"val_{'pauc' if metric == 'last' else metric}"
        best, score = len(self.history) - 1, -math.inf  # as train.TrainingState.record picks best.pt
        for i, r in enumerate(self.history if metric != "last" else []):
            if float(r.get(column) or "nan") > score or not math.isfinite(score):
                best, score = i, float(r.get(column) or "nan")
        columns = self.history_columns()
        rows = [[r["epoch"], *(history_cell(c, r.get(c)) for c in list(columns)[1:]),
                 "best" if i == best else ""] for i, r in enumerate(self.history)]
        best_row = self.history[best]
        chosen = "the last one, --select-metric last" if metric == "last" else f"by val {metric}"
        note = (f"best.pt holds epoch {best_row['epoch']} ({chosen}): val AUROC "
                f"{history_cell('val_auroc', best_row.get('val_auroc'))}, val pAUC "
                f"{history_cell('val_pauc', best_row.get('val_pauc'))}.")
        return dict(table=Table([*columns.values(), f"best.pt ({metric})"], rows), note=note, figures=figures,
                    epochs=len(rows))

    def history_columns(self) -> dict:
        """HISTORY_COLUMNS; with the instance term, its share of the training loss, and the validation loss saying
        it has none (validation sees one view of each image)."""
        if not float(self.config.get("w_instance") or 0):
            return HISTORY_COLUMNS
        columns = {}
        for key, title in HISTORY_COLUMNS.items():
            columns[key] = "val loss (no instance term)" if key == "val_loss" else title
            if key == "train_loss":
                columns["train_instance"] = "train instance term"
        return columns

    # ---------------------------------------------------------------- an ensemble of runs

    def ensemble(self) -> dict:
        """An ensemble's members (linked to their reports, with their numbers), its rule, threshold and gain."""
        if not self.about:
            return {}
        split = next((s for s in self.evaluated if "ensemble" in self.metrics[s]), None)
        value = (lambda *path: self.num(split, "ensemble", *path)) if split else (lambda *path: fmt(dig(self.about,
                                                                                                         path)))
        rows = [[str(k), Code(Path(r.get("run", "?")).name), self.member_link(r), value("members", k - 1, "val_auroc"),
                 value("members", k - 1, "val_pauc"), value("members", k - 1, "threshold"),
                 *([value("members", k - 1, "auroc"), value("members", k - 1, "pauc")] if split else [])]
                for k, r in enumerate(self.about.get("members", []), 1)]
        header = ["", "run", "report", "val AUROC", "val pAUC", "threshold (chosen on its val)",
                  *(["AUROC here", "pAUC here"] if split else [])]
        if split:
            rows.append(["", "ensemble", "this page", "", "", value("threshold"), self.num(split, "auroc"),
                         self.num(split, "pauc")])
        gain = self.about.get("gain_over_best_member")
        return dict(members=Table(header, rows, numeric_from=3), rule=RULES.get(self.about.get("how"), "?"),
                    view="test-time-augmented (TTA)" if self.about.get("view") == "tta" else "plain",
                    threshold=value("threshold"), how=self.about.get("how"), runs=self.about.get("runs", []),
                    gain=Parts(["AUROC ", value("gain_over_best_member", "auroc"), ", pAUC ",
                                value("gain_over_best_member", "pauc")]) if gain else None,
                    seen=value("left_out_seen_in_training") if "left_out_seen_in_training" in self.about else "")

    def member_link(self, record: dict) -> Link | str:
        folder = record.get("folder")
        if folder and (self.folder / folder / REPORT).is_file():
            return Link(Path(folder, REPORT).as_posix(), f"{folder}/{REPORT}")
        return "no report"

    # ---------------------------------------------------------------- results

    def views(self, split: str) -> list[tuple[str, tuple]]:
        return [("", ())] + ([(", TTA", ("tta",))] if "tta" in self.metrics[split] else [])

    def card(self, split: str) -> dict:
        m, views = self.metrics[split], self.views(split)
        columns = ["", *("TTA" if suffix else "plain" for suffix, _ in views)]
        rows = [[f"{name} [95% CI]", *(self.with_ci(split, *at, key) for _, at in views)]
                for key, name in (("auroc", "AUROC"), ("pauc", "pAUC")) if key in m]
        rows += [[readable(k), *(self.num(split, *at, k) for _, at in views)] for k in THRESHOLD_ROWS if k in m]
        return dict(split=split, scorers=self.scorers(split, views), bootstrap=self.bootstrap(split),
                    thresholds=Table(columns, rows), chosen_on=str(m.get("threshold_chosen_on", "?")),
                    confusions=[(suffix, self.confusion(split, at)) for suffix, at in views],
                    calibration=self.calibration(split, views), retrieval=self.retrieval(split, views))

    def scorers(self, split: str, views) -> Table | None:
        rows = []
        for suffix, at in views:
            part = self.metrics[split].get(at[0], {}) if at else self.metrics[split]
            for name, r in part.get("scorers", {}).items():
                label = readable(name) + suffix
                if "k" in r:
                    label = Parts(["kNN (k=", self.num(split, *at, "scorers", name, "k"), f"){suffix}"])
                rows.append([label, self.with_ci(split, *at, "scorers", name, "auroc"),
                             self.with_ci(split, *at, "scorers", name, "pauc")])
        return Table(["scorer", "AUROC [95% CI]", "pAUC [95% CI]"], rows) if rows else None

    def bootstrap(self, split: str) -> Parts | None:
        b, small = self.metrics[split].get("bootstrap"), self.metrics[split].get("small_set")
        if not b:
            return None
        return Parts(["95% CIs: ", self.num(split, "bootstrap", "resamples"), " bootstrap resamples by ",
                      str(b.get("unit")), ", stratified by ", str(b.get("stratified_by")), " (seed ",
                      self.num(split, "bootstrap", "seed"), ", level ", self.num(split, "bootstrap", "level"), ").",
                      *([f" Too few to trust: {small}."] if small else [])])

    def with_ci(self, split: str, *path) -> CI:
        *parent, name = path
        return CI(self.num(split, *path), self.num(split, *parent, name + "_ci95", 0),
                  self.num(split, *parent, name + "_ci95", 1))

    def confusion(self, split: str, at: tuple) -> Table:
        def cell(i, j):
            return self.num(split, *at, "confusion_matrix", i, j)
        rows = [["actual benign", cell(0, 0), cell(0, 1)], ["actual malignant", cell(1, 0), cell(1, 1)]]
        return Table(["", "predicted benign", "predicted malignant"], rows)

    def calibration(self, split: str, views) -> Table | None:
        if "calibration" not in self.metrics[split]:
            return None
        rows = [[name, *(self.num(split, *at, "calibration", key) for _, at in views)]
                for key, name in CALIBRATION_ROWS.items()]
        return Table(["", *("TTA" if suffix else "plain" for suffix, _ in views)], rows)

    def retrieval(self, split: str, views) -> list[dict]:
        """Retrieval metrics of the embedding (metrics.json "retrieval"), every key whatever it is: one row per group
        of queries (dicts of numbers), then the numbers and words that stand alone."""
        parts = []
        for suffix, at in views:
            r = (self.metrics[split].get("tta", {}) if at else self.metrics[split]).get("retrieval")
            if not isinstance(r, dict):
                continue
            groups = list(number_groups(r))
            columns = list(dict.fromkeys(c for _, v in groups for c in v))
            rows = [[" ".join(map(readable, path)), *(self.num(split, *at, "retrieval", *path, c) if c in v else ""
                                                       for c in columns)] for path, v in groups]
            single = [[readable(k), self.num(split, *at, "retrieval", k)] for k, v in r.items() if is_number(v)]
            about = "; ".join(f"{readable(k)}: {v}" for k, v in r.items() if isinstance(v, str))
            parts.append(dict(suffix=suffix, about=about, single=Table(["", "value"], single) if single else None,
                              groups=Table(["query group", *map(readable, columns)], rows)))
        return parts

    def prediction_table(self) -> Table | None:
        """Unlabelled images (predict.py --images): the predictions.csv, most probable melanomas first."""
        rows = self.predictions
        column = next((c for c in ("probability", "rank_score") if rows and c in rows[0]), None)  # rank: an ensemble's
        if column is None:
            return None
        rows = sorted(rows, key=lambda r: -float(r[column]))
        rows = [{k: {"1": "yes", "0": "no"}.get(v, v) if k.startswith("predicted_") else v for k, v in r.items()}
                for r in rows]
        return csv_table(rows, "predictions.csv, the most probable melanomas first")

    def skipped_table(self) -> Table | None:
        """The unreadable files predict.py --skip-bad-images left out."""
        if not self.skipped:
            return None
        return csv_table(self.skipped, f"{SKIPPED}: unreadable, left out (--skip-bad-images)", numeric_from=9)

    # ---------------------------------------------------------------- figures

    def figures_by_split(self, names: dict, wide: bool = False, shown: int = 1) -> list[Grid]:
        """Each figure for every split, side by side; wide figures one under the other, those after the first
        `shown` folded (a click opens them), so that a page with val and test stays a few screens long."""
        grids = []
        for file, caption in names.items():
            found = [figure(d / file, f"{split}: {caption}") for split, d in self.splits.items()
                     if (d / file).is_file()]
            if found:
                grids.append(Grid(wide=found[:shown], folded=found[shown:]) if wide else Grid(found))
        return grids

    def curve_figures(self) -> list[Grid]:
        """ROC, precision-recall and calibration of each split in a row (test first), then the confusion matrices."""
        rows = [Grid([figure(d / f, f"{split}: {CURVE_FIGURES[f]}") for f in CURVE_FIGURES if (d / f).is_file()
                      and f != "confusion_matrix.png"], kind="trio") for split, d in self.splits.items()]
        rows += [Grid(g.figures, kind="trio") for g in
                 self.figures_by_split({"confusion_matrix.png": CURVE_FIGURES["confusion_matrix.png"]})]
        return [g for g in rows if g.figures]

    def similar(self) -> dict:
        """similar.png and neighbours.csv of each split: folded beside a labelled set's results (each similar.png is
        several screens tall), shown for new images, where they are the result."""
        tables = [csv_table(rows, f"{split}: neighbours.csv") for split, d in self.splits.items()
                  if (rows := read_csv(d / "neighbours.csv"))]
        by = self.config.get("neighbours_by", Settings.neighbours_by)  # what evaluating the run now would use
        grids = self.figures_by_split({"similar.png": f"similar lesions (nearest by {by})"}, wide=True,
                                      shown=0 if self.evaluated else 1)
        return dict(figures=grids, tables=tables, folded=bool(self.evaluated)) if grids or tables else {}

    def other_figures(self) -> Grid | None:
        """Figures this page does not know yet: shown rather than silently left out."""
        places = [("", self.run)] + [(f"{split}: ", d) for split, d in self.splits.items() if d != self.run]
        found = [figure(p, prefix + p.name) for prefix, d in places for p in sorted(d.glob("*.png"))
                 if p.name not in KNOWN]
        return Grid(found) if found else None

    def other_numbers(self) -> Table | None:
        """Every number in metrics.json that no table above showed (e.g. metrics added after this page was written)."""
        rows = [[split, Code(".".join(map(str, path))), self.num(split, *path)] for split, m in self.metrics.items()
                for path, value in leaves(m) if path not in self.shown[split] and is_number(value)]
        return Table(["set", "key", "value"], rows, numeric_from=2) if rows else None
