"""report.html: every section in order, every number equal to metrics.json, figures embedded, a page for a run still
training, the hooks that write it (end of epoch, end of run, predict.py), and a real browser where one is installed."""
import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

import train
import webreport
from config import Settings
from conftest import cli, tiny
from webreport_html import is_number, leaves

SECTIONS = ["What was run", "Training curves", "Test summary", "ROC, precision-recall and calibration", "Embeddings",
            "Error gallery"]
SPLIT_FIGURES = ["roc.png", "pr.png", "calibration.png", "confusion_matrix.png", "embeddings.png", "gallery.png"]
HISTORY = "epoch,train_loss,val_loss,val_auroc,val_pauc,val_accuracy,lr,seconds\n"
# Shown in the test summary's tables, never only in the catch-all list at the end.
SUMMARY_KEYS = {"auroc", "pauc", "auroc_ci95", "pauc_ci95", "scorers", "threshold", "sensitivity", "specificity",
                "confusion_matrix", "calibration", "n", "n_positive", "bootstrap", "retrieval"}


class Page(HTMLParser):
    """What a reader sees: h2 headings, each tagged number with its section, image sources, and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.numbers, self.images, self.text = [], [], [], []
        self._h2, self._key, self._section = False, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
        self._h2 = tag == "h2"
        self._key = attrs.get("data-key") if tag == "span" else None
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._h2 = False
        if tag == "span":
            self._key = None

    def handle_data(self, data):
        self.text.append(data)
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
    assert page.headings == [*SECTIONS, "Other numbers in metrics.json"]
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
    assert page.headings == [*SECTIONS, "Similar lesions", "Other figures", "Other numbers in metrics.json"]
    assert "@media print" in html and "max-width:100%" in html


def test_report_of_a_run_still_training(tmp_path):
    run = fake_run(tmp_path / "run", epochs_done=1, evaluated=False)
    webreport.write_report(run, training=True)
    page = read_page(run)
    text = " ".join(page.text)
    assert page.headings == SECTIONS and page.numbers == []
    assert "Still training: 1 of 6 epochs done" in text and "Not evaluated yet" in text
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

@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = cli("driver.py", "--data-dir", tiny_data, "--out", out, "--cache-dir", tmp_path_factory.mktemp("cache"),
                 *tiny(2), "--tta")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_report_of_a_tiny_run(tiny_run):
    out, result = tiny_run
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    page = check_numbers(out)
    assert page.headings[:len(SECTIONS)] == SECTIONS
    text = "".join(page.text)
    assert "driver.py --data-dir" in text and "Leakage check passed" in text and "Still training" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert len(page.images) >= 4 + 2 * len(SPLIT_FIGURES)


@pytest.mark.slow
def test_predict_rewrites_the_report(tiny_run, tiny_data, tmp_path):
    out, _ = tiny_run
    result = cli("predict.py", "--run", out, "--split", "val", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out / 'report.html'}" in result.stdout
    assert "predict.py --run" in (out / "commands.txt").read_text().splitlines()[-1]
    check_numbers(out)  # the page holds the numbers of the new metrics.json
    images = tiny_data / "train-image" / "image"
    result = cli("predict.py", "--run", out, "--images", images, "--out", tmp_path / "new", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    page = read_page(tmp_path / "new")
    assert "160 unlabelled images" in " ".join(page.text) and "predict.py --run" in " ".join(page.text)
