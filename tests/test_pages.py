"""report.html's layout: results first, training curves next, then figures and details; a long run's page stays short
(per-epoch rows folded, timings summarised); an ensemble's page lists and links its members. Structure only, no pixels:
the page is parsed and its sections, tables and links are checked."""
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd

from engine.config import Settings
from reporting import webreport
from reporting.reports import figure_subject
from test_report import fake_run, png
from utils import write_csv, write_json
from workflow.ensemble import Member, write_ensemble

EPOCHS = 120


class Layout(HTMLParser):
    """The page's sections in order, each table (rows, section, folded in <details>), images and links by section."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.tables, self.images, self.links, self.text, self.h1 = [], [], [], [], [], []
        self.stack, self.section = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs["id"]
            self.sections.append(self.section)
        if tag == "table":
            self.tables.append(dict(rows=0, section=self.section, folded="details" in self.stack))
        if tag == "tr":
            self.tables[-1]["rows"] += 1
        if tag == "img":
            self.images.append((self.section, "div.curves" in self.stack))
        if tag == "a":
            self.links.append((self.section, attrs["href"]))
        if tag not in ("img", "meta", "br"):
            self.stack.append(f"{tag}.{attrs['class']}" if attrs.get("class") else tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop().split(".")[0] != tag:
            pass
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if "h1" in self.stack:
            self.h1.append(data.strip())
        if data.strip():
            self.text.append((self.section, data.strip()))

    def words(self, section="everywhere") -> str:
        """The text of one section (None: outside every section), pieces joined by spaces."""
        return " ".join(t for s, t in self.text if section == "everywhere" or s == section)


def long_run(folder):
    """A run folder as 120 epochs of the CPU profile leave it: 120 history rows, 360 per-epoch timing phases."""
    run = fake_run(folder, epochs_done=EPOCHS)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": EPOCHS}))
    phases = [{"name": "data.cache", "seconds": 2.0, "note": "740 images"}]
    for e in range(1, EPOCHS + 1):
        phases += [{"name": f"training.epoch{e}", "seconds": 9.0, "note": "18 steps"},
                   {"name": f"validation.epoch{e}", "seconds": 1.0, "note": "110 images"},
                   {"name": f"training.save.epoch{e}", "seconds": 0.5, "note": "checkpoints, history, plots"}]
    phases += [{"name": "evaluation.score.test", "seconds": 3.0}]
    (run / "timings.json").write_text(json.dumps({"phases": phases, "total_seconds": 1265.0}))
    webreport.write_report(run)
    return Layout((run / "report.html").read_text())


def test_results_come_first_then_the_curves_then_figures_then_details(tmp_path):
    page = long_run(tmp_path / "run")
    assert page.sections == ["summary", "curves", "plots", "embeddings", "gallery", "details", "run", "timings",
                             "numbers"]
    summary = page.words("summary")
    assert summary.index("test") < summary.index("val")  # validation beside the test numbers, test first
    assert page.images[:4] == [("curves", True)] * 4  # the first pictures: loss, accuracy, AUROC, pAUC, full size
    assert page.h1[0] == "Run" and "Command line" not in page.words(None)  # the header, then the results


def test_a_120_epoch_page_folds_the_epochs_and_summarises_the_timings(tmp_path):
    page = long_run(tmp_path / "run")
    history = [t for t in page.tables if t["section"] == "curves"]
    assert history == [dict(rows=EPOCHS + 1, section="curves", folded=True)]  # every epoch, folded away
    assert max(t["rows"] for t in page.tables if not t["folded"]) < 25
    timings = [t for t in page.tables if t["section"] == "timings"]
    assert sum(t["rows"] for t in timings) < 15  # not 360 rows: each epoch's phases are one row
    words = page.words("timings")
    assert "training.epochN 120 times; the first: 18 steps 120 1080.0 9.0" in words
    assert "training 240 1140.0" in words and "Total: 1265.0 s (21.1 min)." in words
    assert "best.pt holds epoch 1 (by val pauc)" in page.words("curves")


def test_tall_figures_of_a_labelled_page_are_folded(tmp_path):
    """Test's embeddings and gallery shown, val's behind a click; similar.png (several screens each) folded."""
    run = tmp_path / "run"
    fake_run(run)
    for split in ("test", "val"):
        png(run / split / "similar.png")
    webreport.write_report(run)
    page = Layout((run / "report.html").read_text())
    assert [(t["section"], t["folded"]) for t in page.tables if t["section"] in ("timings", "run")] == \
        [("run", True), ("run", True)]  # settings and library versions
    html = (run / "report.html").read_text()
    for caption in ("val: embeddings", "val: gallery", "test: similar lesions (nearest by look)",
                    "val: similar lesions (nearest by look)"):
        assert f"<details><summary>{caption}</summary>" in html
    for caption in ("test: embeddings", "test: gallery"):
        assert f"<details><summary>{caption}</summary>" not in html and f"<figcaption>{caption}</figcaption>" in html


def member_folder(folder, scores, targets, threshold: float, val_auroc: float):
    """A member as predict.py leaves it inside an ensemble's folder: its scores, its report, its val evaluation."""
    folder.mkdir(parents=True)
    ids = [f"ISIC_{i}" for i in range(len(scores))]
    write_csv(folder / "predictions.csv", pd.DataFrame({"isic_id": ids, "target": targets, "probability": scores}))
    (folder / "report.html").write_text("<!doctype html><title>member</title>")
    write_json(folder / "metrics.json", {"split": "test", "auroc": 0.5})  # the member's own evaluation
    write_json(folder / "val" / "metrics.json", {"threshold": threshold, "auroc": val_auroc, "pauc": 0.1})
    write_csv(folder / "val" / "predictions.csv", pd.DataFrame({"probability": scores}))
    return Member(folder, folder, folder / "val")


def test_an_ensemble_page_lists_and_links_its_members(tmp_path):
    out = tmp_path / "ensemble"
    y = np.array([0, 0, 0, 1, 0, 1, 0, 1])
    first = member_folder(out / "members" / "1-a", [0.1, 0.2, 0.6, 0.7, 0.3, 0.4, 0.5, 0.9], y, 0.4, 0.75)
    second = member_folder(out / "members" / "2-b", [0.2, 0.1, 0.3, 0.5, 0.6, 0.8, 0.2, 0.7], y, 0.6, 0.8125)
    m = write_ensemble([first, second], out, "mean", Settings(), resamples=10)
    webreport.write_report(out, run=out)
    page = Layout((out / "report.html").read_text())
    assert page.h1[0] == "Ensemble" and page.sections[:2] == ["summary", "ensemble"]
    assert "the model of run" not in page.words() and "scored by an ensemble of 2 runs" not in page.words()
    assert "labelled images evaluated by an ensemble of 2 runs (mean)" in page.words(None)
    assert [href for section, href in page.links if section == "ensemble"] == ["members/1-a/report.html",
                                                                               "members/2-b/report.html"]
    words = page.words("ensemble")
    members = m["ensemble"]["members"]
    for k, r in enumerate(members, 1):  # each member's val AUROC and pAUC, threshold, AUROC and pAUC on these images
        assert f"{k} {r['run'].split('/')[-1]} members/{k}-{'ab'[k - 1]}/report.html {r['val_auroc']:.4f} " \
               f"{r['val_pauc']:.4f} {r['threshold']:.4f} {r['auroc']:.4f} {r['pauc']:.4f}" in words
    assert f"Threshold {0.5:.4f} : the mean of the members' thresholds" in words
    gain = m["auroc"] - max(r["auroc"] for r in members)
    assert m["ensemble"]["gain_over_best_member"]["auroc"] == gain
    assert f"Gain over the best member on these images: AUROC {gain:.4f}" in words
    assert "the mean of the members' probabilities" in words
    assert figure_subject(m) == "ensemble of 2 runs (mean), test split"  # the figures name the members' split


def test_an_ensemble_of_new_images_names_its_threshold_and_members(tmp_path):
    out = tmp_path / "ensemble"
    members = [member_folder(out / "members" / f"{k}-{name}", [0.2, 0.7, 0.5], [0, 0, 0], t, 0.7)
               for k, name, t in ((1, "a", 0.3), (2, "b", 0.5))]
    for m in members:  # new images carry no label
        frame = pd.read_csv(m.scored / "predictions.csv").drop(columns="target")
        write_csv(m.scored / "predictions.csv", frame)
    assert write_ensemble(members, out, "rank", Settings(), resamples=10) is None
    webreport.write_report(out, run=out)
    page = Layout((out / "report.html").read_text())
    assert page.h1[0] == "Ensemble"
    assert "3 unlabelled images scored by an ensemble of 2 runs (rank)" in page.words(None)
    assert [href for section, href in page.links if section == "ensemble"] == ["members/1-a/report.html",
                                                                               "members/2-b/report.html"]
    about = json.loads((out / "ensemble.json").read_text())
    words = page.words("ensemble")
    assert f"Threshold {about['threshold']:.4f}: the mean of the members' thresholds" in words  # from ensemble.json
    assert "each placed among its validation probabilities" in words and "not a probability" in words
    assert "0.3000" in words and "0.5000" in words  # each member's own threshold
