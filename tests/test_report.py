"""report.html: every section in order, every number equal to metrics.json, figures embedded, a page for a run still
training, the hooks that write it (end of epoch, end of run, predict.py), and a real browser where one is installed."""
import base64
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from engine.config import Settings
from reporting import webreport
import train
from conftest import in_process
from reporting.webreport_html import is_number, leaves

SECTIONS = ["Test summary", "Training curves", "ROC, precision-recall and calibration", "Embeddings", "Error gallery"]
DETAILS = ["Results in detail", "What was run"]
SPLIT_FIGURES = ["roc.png", "pr.png", "calibration.png", "confusion_matrix.png", "embeddings.png", "gallery.png"]
HISTORY = "epoch,train_loss,val_loss,val_auroc,val_pauc,val_accuracy,lr,seconds\n"
# Shown in the test summary's tables (the headline) or in the results in detail, never only in the catch-all list.
SUMMARY_KEYS = {"auroc", "pauc", "auroc_ci95", "pauc_ci95", "scorers", "threshold", "sensitivity", "specificity",
                "n", "n_positive", "bootstrap"}
DETAIL_KEYS = {"confusion_matrix", "calibration", "retrieval"}


class Page(HTMLParser):
    """What a reader sees: h2 headings, each tagged number with its section, image sources, and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.numbers, self.images, self.text = [], [], [], []
        self.links, self.sections, self.tags, self.where = [], [], [], []
        self._h2, self._key, self._section = False, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self._section = attrs["id"]
            self.sections.append(attrs["id"])
        if tag == "a":
            self.links.append(attrs["href"])
        self._h2 = tag == "h2"
        self._key = attrs.get("data-key") if tag == "span" else None
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._h2 = False
        if tag == "span":
            self._key = None
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        self.text.append(data)
        self.where.append(self._section)
        if self._h2:
            self.headings.append(data)
        if self._key:
            split, path = self._key.split(":")
            self.numbers.append((split, tuple(int(p) if p.isdigit() else p for p in path.split(".")), data,
                                 self._section))


def read_page(folder) -> Page:
    return Page((folder / "report.html").read_text())


def formatted(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def numbers_in(metrics):
    return ((path, value) for path, value in leaves(metrics) if is_number(value))


def lookup(metrics, path):
    for key in path:
        metrics = metrics[key]
    return metrics


def check_numbers(folder, splits=("test", "val")) -> Page:
    """Every number of every metrics.json is on the page, as the page formats it; the main ones in the summary."""
    page = read_page(folder)
    for split in splits:
        metrics = json.loads((folder / split / "metrics.json").read_text())
        shown = {path: (text, section) for s, path, text, section in page.numbers if s == split}
        for path, value in numbers_in(metrics):
            assert path in shown, f"{split}: {path} not on the page"
            text, section = shown[path]
            assert text == formatted(lookup(metrics, path)), f"{split}: {path} shows {text}, metrics.json {value}"
            if path[path[0] == "tta"] in SUMMARY_KEYS:
                assert section == "summary", f"{split}: {path} only in section {section}"
            if path[path[0] == "tta"] in DETAIL_KEYS:
                assert section == "details", f"{split}: {path} only in section {section}"
    return page


# ---------------------------------------------------------------- a run folder with known files, no training

FIGURE_COLOUR = (200, 80, 40)


def png(path, colour=FIGURE_COLOUR):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (300, 200), colour).save(path)


def split_metrics(seed: int) -> dict:
    head = {"auroc": 0.8125 + seed / 100, "pauc": 0.0875, "auroc_ci95": [0.6, 0.95], "pauc_ci95": [0.03, 0.15]}
    part = {**head, "threshold": 0.4321, "accuracy": 0.75, "balanced_accuracy": 0.7, "sensitivity": 2 / 3,
            "specificity": 0.73333, "precision": 0.25, "f1": 0.36, "confusion_matrix": [[11, 4], [1, 2]], "n": 18,
            "n_positive": 3, "scorers": {"head": head, "knn": {**head, "auroc": 0.7, "k": 15},
                                         "prototype": {**head, "pauc": 0.05}},
            "average_precision": 0.41, "calibration": {"brier": 0.21, "ece": 0.3, "brier_prior_corrected": 0.12,
                                                       "ece_prior_corrected": 0.07, "train_prevalence": 0.2,
                                                       "ece_bins": 10}}
    return {**part, "split": "test", "threshold_chosen_on": "val (Youden's J)",
            "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 42, "unit": "patient", "stratified_by": "class"},
            "tta": {**part, "auroc": 0.83125, "confusion_matrix": [[12, 3], [1, 2]]},
            "retrieval": {"references": 121, "all_queries": {"precision_at_1": 0.75, "r_precision": 0.5},
                          "per_class": {"malignant": {"precision_at_1": 0.0, "queries": 3}}},
            "new_metric": {"value": 0.625}}  # a number the page has no table for yet


def fake_run(folder, epochs_done: int = 2, evaluated: bool = True):
    s = Settings(epochs=6, backbone="resnet18", img_size=64, profile="demo", demo=True, versions={"torch": "2.x"})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(s.to_dict()))
    (folder / "data_report.txt").write_text("patients in more than one split: 0\n"
                                            "leakage groups (split by patient): 46, in more than one split: 0\n")
    (folder / "history.csv").write_text(HISTORY + "".join(f"{e},1.5,1.4,0.{6 + e},0.05,0.7,0.001,2.5\n"
                                                          for e in range(1, epochs_done + 1)))
    for name in ("loss.png", "accuracy.png", "auroc.png", "pauc.png"):
        png(folder / name)
    if evaluated:
        for seed, split in enumerate(("test", "val")):
            (folder / split).mkdir()
            (folder / split / "metrics.json").write_text(json.dumps(split_metrics(seed)))
            for name in SPLIT_FIGURES:
                png(folder / split / name, (seed * 90, 120, 200))
    return folder


def test_every_number_shown_equals_metrics_json(tmp_path):
    run = fake_run(tmp_path / "run")
    webreport.write_report(run)
    page = check_numbers(run)
    assert page.headings == [*SECTIONS, *DETAILS, "Other numbers in metrics.json"]
    other = {(split, path) for split, path, _, section in page.numbers if section == "numbers"}
    assert other == {("test", ("new_metric", "value")), ("val", ("new_metric", "value"))}
    text = "".join(page.text)
    assert "kNN (k=15)" in text and "Leakage check passed" in text
    assert "Settings that differ from the defaults" in text and "resnet18" in text and "2.x" in text


def test_figures_are_embedded_and_missing_ones_skipped(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "val" / "roc.png").unlink()  # a figure that was not drawn
    png(run / "test" / "similar.png")  # a figure that arrives later...
    png(run / "test" / "future.png")  # ... or that the page does not know
    webreport.write_report(run)
    html = (run / "report.html").read_text()
    page = read_page(run)
    files = sorted(run.rglob("*.png"))
    assert len(page.images) == len(files) == 4 + 2 * len(SPLIT_FIGURES) - 1 + 2
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.images) == sorted(f.read_bytes()
                                                                                           for f in files)
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    assert page.headings == [*SECTIONS, "Similar lesions", *DETAILS, "Other figures", "Other numbers in metrics.json"]
    assert "@media print" in html and "max-width:100%" in html


def test_report_of_a_run_still_training(tmp_path):
    run = fake_run(tmp_path / "run", epochs_done=1, evaluated=False)
    webreport.write_report(run, training=True)
    page = read_page(run)
    text = " ".join(page.text)
    assert page.headings == ["Training curves", "What was run"] and page.numbers == []  # nothing empty
    assert "Still training: 1 of 6 epochs done" in text and "val/test results appear when training ends" in text
    assert len(page.images) == 4  # the history plots


def test_end_of_epoch_writes_the_report_while_training(tmp_path):
    """The hook in train.end_of_epoch: written with the history plots, marked as still training."""
    s = Settings(epochs=3)
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = train.TrainingState(model, None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                                torch.amp.GradScaler("cpu", enabled=False))
    row = {"epoch": 1, "train_loss": 1.0, "train_bce": 0.6, "train_contrastive": 0.4, "train_accuracy": 0.5,
           "val_loss": 0.9, "val_auroc": 0.625, "val_pauc": 0.04, "val_accuracy": 0.5, "lr": 1e-3, "seconds": 1.0}
    train.end_of_epoch(state, row, s, tmp_path, plotted=-math.inf)
    page = read_page(tmp_path)
    assert "Still training: 1 of 3 epochs done" in " ".join(page.text)
    assert "0.6250" in page.text  # val AUROC of the epoch, from history.csv


def section_text(page: Page, section: str) -> list[str]:
    """The text of one section, piece by piece (as parsed), without the whitespace between elements."""
    return [text.strip() for text, where in zip(page.text, page.where) if where == section and text.strip()]


def test_fields_cannot_break_the_page(tmp_path):
    """Text from the run's files is escaped: markup in a field shows as text and opens no element."""
    run = fake_run(tmp_path / "run")
    evil = "</table><script>alert(1)</script>"
    (run / "commands.txt").write_text(f"python driver.py --out '{evil}'\n")
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    metrics["threshold_chosen_on"] = evil
    metrics["retrieval"]["distance"] = '"><b>bold</b>'
    (run / "test" / "metrics.json").write_text(json.dumps(metrics))
    (run / "test" / "neighbours.csv").write_text(f"isic_id,neighbour\n{evil},ISIC_1\n")
    webreport.write_report(run)
    html = (run / "report.html").read_text()
    page = read_page(run)
    assert "<script" not in html and "<b>" not in html
    assert html.count("<table") == html.count("</table>") == page.tags.count("table")
    text = "".join(page.text)
    assert text.count(evil) == 3 and '"><b>bold</b>' in text  # shown as the text it is
    assert page.headings == [*SECTIONS, "Similar lesions", *DETAILS, "Other numbers in metrics.json"]


def test_sections_and_navigation_agree(tmp_path):
    run = fake_run(tmp_path / "run")
    webreport.write_report(run)
    page = read_page(run)
    assert page.links == [f"#{key}" for key in page.sections]
    assert page.sections == ["summary", "curves", "plots", "embeddings", "gallery", "details", "run", "numbers"]


def fake_predictions(tmp_path, skipped: bool = True):
    """A run and a predict.py --images folder scored with it: 3 images, one flagged; 2 unreadable files skipped."""
    run = fake_run(tmp_path / "run")
    out = tmp_path / "new"
    out.mkdir()
    (out / "predictions.csv").write_text("isic_id,probability,predicted_malignant,knn_score\n"
                                         "IMG_a,0.12345678901234567,0,0.2000000000000001\n"
                                         "IMG_b,0.9876543210987654,1,0.8\nIMG_c,0.00001234,0,0.0\n")
    (out / "neighbours.csv").write_text("isic_id,rank,neighbour,distance\nIMG_a,1,ISIC_9,0.31234567890123\n")
    png(out / "similar.png")
    if skipped:
        (out / "skipped_images.csv").write_text("file,error\n/data/new/bomb.png,ValueError: too many pixels\n"
                                                "/data/new/junk.jpg,UnidentifiedImageError: cannot identify\n")
    (out / "commands.txt").write_text("python predict.py --run run --images /data/new --skip-bad-images\n")
    webreport.write_report(out, run=run)
    return out


def test_report_of_unlabelled_images(tmp_path):
    """predict.py --images: predictions and skipped files in their own sections, nothing empty, no test summary."""
    page = read_page(fake_predictions(tmp_path))
    text = " ".join(page.text)
    assert page.headings == ["Predictions", "Skipped images", "Training curves", "Similar lesions", "What was run"]
    assert "3 unlabelled images scored by the model of run run: 1 above the run's threshold; 2 unreadable files " \
           "skipped." in text
    assert "not evaluated" not in text and "Not drawn" not in text and "Test summary" not in text
    predictions = section_text(page, "predictions")
    assert predictions.index("IMG_b") < predictions.index("IMG_a") < predictions.index("IMG_c")  # most probable first
    assert {"0.988", "0.123", "1.2e-05", "0.200", "yes"} <= set(predictions)
    assert not any(re.fullmatch(r"\d\.\d{5,}", t) for t in page.text)  # no 16-digit probabilities anywhere
    assert {"/data/new/bomb.png", "/data/new/junk.jpg"} <= set(section_text(page, "skipped"))
    assert "0.312" in section_text(page, "similar")


def test_no_skipped_section_without_skipped_files(tmp_path):
    page = read_page(fake_predictions(tmp_path, skipped=False))
    assert "Skipped images" not in page.headings and "unreadable" not in " ".join(page.text)


def test_report_of_another_labelled_dataset(tmp_path):
    """predict.py --data-dir: results under their own name, the dataset named, no run status."""
    run = fake_run(tmp_path / "run")
    out = tmp_path / "other"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({**split_metrics(0), "dataset": "/data/other.csv"}))
    png(out / "roc.png")
    webreport.write_report(out, run=run)
    page = read_page(out)
    text = " ".join(page.text)
    assert page.headings == ["Results", "Training curves", "ROC, precision-recall and calibration",
                             "Results in detail", "What was run", "Other numbers in metrics.json"]
    assert "18 labelled images evaluated by the model of run run." in text and "epochs trained" not in text
    assert "/data/other.csv" in section_text(page, "run")


def settings_rows(page: Page) -> dict:
    """setting -> (value, source), from the settings table's cells."""
    cells = section_text(page, "run")
    start = cells.index("Settings that differ from the defaults") + 1
    cells = cells[start + 4:cells.index("Library versions")]  # after the header row
    return {cells[i]: (cells[i + 1], cells[i + 3]) for i in range(0, len(cells), 4)}


def test_settings_say_which_were_given(tmp_path):
    """cache_dir is 'given' only when typed; a default made absolute is no difference; a profile's value says so."""
    run = fake_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.update(given=["demo", "img_size"], img_size=48, cache_dir=str(tmp_path / "cache"), workers=2)
    (run / "config.json").write_text(json.dumps(config))
    webreport.write_report(run)
    rows = settings_rows(read_page(run))
    assert "cache_dir" not in rows
    assert rows["img_size"] == ("48", "given") and rows["demo"] == ("True", "given")
    assert rows["backbone"] == ("resnet18", "profile demo") and rows["workers"] == ("2", "chosen by the program")
    config.update(given=["cache_dir"], cache_dir=str(tmp_path / "elsewhere"))
    (run / "config.json").write_text(json.dumps(config))
    webreport.write_report(run)
    assert settings_rows(read_page(run))["cache_dir"] == (str(tmp_path / "elsewhere"), "given")


def test_history_shows_the_learning_rate(tmp_path):
    run = fake_run(tmp_path / "run", evaluated=False)
    (run / "history.csv").write_text(HISTORY + "1,1.5,1.4,0.6,0.05,0.7,3e-06,2.5\n2,1.2,1.1,0.7,0.06,0.7,0.0003,2.5\n")
    webreport.write_report(run)
    cells = section_text(read_page(run), "curves")
    assert "learning rate" in cells and "3.00e-06" in cells and "3.00e-04" in cells and "0.0000" not in cells


def test_timings_by_phase_and_group(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "timings.json").write_text(json.dumps({"phases": [
        {"name": "data.cache", "seconds": 12.3, "note": "740 images, 61 images/s"},
        {"name": "data.split", "seconds": 0.25},
        {"name": "training.epochs", "seconds": 250.0, "note": "<b>6 epochs</b>"},
        {"name": "evaluation", "seconds": 40.0}], "total_seconds": 312.0}))
    webreport.write_report(run)
    page = read_page(run)
    assert page.headings[-2:] == ["Timings", "Other numbers in metrics.json"]
    cells = section_text(page, "timings")
    assert "Total: 312.0 s (5.2 min)." in cells and "<b>6 epochs</b>" in cells
    groups = cells[cells.index("By group (the part of a phase's name before the first dot):") + 4:]
    assert groups[:9] == ["data", "2", "12.6", "training", "1", "250.0", "evaluation", "1", "40.0"]
    assert ["data.cache", "740 images, 61 images/s", "1", "12.3", "12.3"] == cells[cells.index("data.cache"):][:5]


def test_every_retrieval_number_is_in_the_results_in_detail(tmp_path):
    """New retrieval keys appear in the results in detail with readable names, whatever they are."""
    run = fake_run(tmp_path / "run")
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    metrics["retrieval"].update({"visual_agreement@5": 0.6125, "hub_share@5": 0.25, "hub_max@5": 7,
                                 "per_patient": {"same_patient_at_5": 0.125}})
    (run / "test" / "metrics.json").write_text(json.dumps(metrics))
    webreport.write_report(run)
    page = check_numbers(run)  # every number shown, these ones in the details (DETAIL_KEYS holds "retrieval")
    cells = section_text(page, "details")
    assert {"visual agreement@5", "hub share@5", "hub max@5", "same patient@5", "precision@1", "R-precision",
            "per class malignant"} <= set(cells)
    assert cells[cells.index("visual agreement@5") + 1] == "0.6125"


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (chromium, chromium-browser, google-chrome)")
def test_headless_chromium_opens_the_page_narrow_and_printed(tmp_path):
    run = fake_run(tmp_path / "run")
    report = webreport.write_report(run)
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    shot, pdf = tmp_path / "narrow.png", tmp_path / "printed.pdf"
    for flags in ([f"--screenshot={shot}", "--window-size=420,9000"], [f"--print-to-pdf={pdf}"]):
        subprocess.run([*browser, *flags, report.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (420, 9000)
    colours = dict((colour, count) for count, colour in image.getcolors(420 * 9000))
    assert colours.get(FIGURE_COLOUR, 0) >= 4 * 300 * 200  # the four history plots, drawn from their data URIs
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 10_000


# ---------------------------------------------------------------- a real tiny run through the command lines

@pytest.mark.slow
def test_report_of_a_tiny_run(finished_run):
    out, result = finished_run
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    page = check_numbers(out)
    assert page.headings[:len(SECTIONS)] == SECTIONS
    text = "".join(page.text)
    assert "driver.py --data-dir" in text and "Leakage check passed" in text and "Still training" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert len(page.images) >= 4 + 2 * len(SPLIT_FIGURES)


@pytest.mark.slow
def test_predict_rewrites_the_report(run_copy, tiny_data, tmp_path, capsys):
    out = run_copy
    assert in_process("predict.py", "--run", out, "--split", "val", "--workers", "0") == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert "predict.py --run" in (out / "commands.txt").read_text().splitlines()[-1]
    check_numbers(out)  # the page holds the numbers of the new metrics.json
    images = tiny_data / "train-image" / "image"
    assert in_process("predict.py", "--run", out, "--images", images, "--out", tmp_path / "new", "--workers", "0") == 0
    page = read_page(tmp_path / "new")
    assert "160 unlabelled images" in " ".join(page.text) and "predict.py --run" in " ".join(page.text)
