"""What the figures say: which split (or ensemble) each shows, labelled axes, integer epochs, similar.png's headings,
legend, query/neighbour divider and same-image flag, the typical-case sample, and Grad-CAM's colour bar and caption.
Figures are caught before they are written (plots.save) and read back through matplotlib's objects."""
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from engine.config import Settings
from modules import build_model
from reporting import explain, plots
from reporting.reports import Scoring, figure_subject, write_labelled
from scoring.inference import Predictions
from scoring.references import References


@pytest.fixture
def figures(monkeypatch):
    """{file name: figure} of every figure saved while the test runs."""
    caught = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, tight=True: caught.__setitem__(path.name, fig))
    yield caught
    for fig in caught.values():
        plots.plt.close(fig)


def texts(fig) -> list[str]:
    """Every piece of text on the figure: titles, axis labels, texts, legends, suptitle."""
    found = [t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text"))]
    return [t for t in found if t]


@pytest.mark.parametrize("epochs", [1, 3])
def test_history_plots_have_integer_epoch_ticks(figures, tmp_path, epochs):
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7], "train_accuracy": [0.6, 0.7, 0.8],
                            "val_accuracy": [0.6, 0.6, 0.7], "val_loss": [1.1, 0.9, 0.8],
                            "val_auroc": [0.6, 0.7, 0.8], "val_pauc": [0.03, 0.05, 0.06],
                            "train_pos_active": [1, 0.9, 0.8], "train_neg_active": [0.5, 0.4, 0.3],
                            "train_pos_distance": [0.5, 0.4, 0.3], "train_neg_distance": [1.0, 1.1, 1.2]})
    plots.history_plots(history.head(epochs), tmp_path)
    assert {"loss.png", "auroc.png", "pauc.png", "pairs.png"} <= set(figures)
    for fig in figures.values():
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


class QuickProjection:
    def __init__(self, **kwargs):
        pass

    def fit_transform(self, x):
        return x[:, :2]


def labelled_scoring(n=40, seed=0) -> Scoring:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    logits = (y + rng.normal(size=n)).astype(np.float32)
    return Scoring(Predictions(y, 1 / (1 + np.exp(-logits)), logits, rng.normal(size=(n, 4)).astype(np.float32), 0.5),
                   0.5)


@pytest.mark.parametrize("extra, subject", [
    ({"split": "val"}, "val split"),
    ({"dataset": "/data/other-clinic/train.csv"}, "other-clinic"),
    ({"ensemble": {"how": "mean", "runs": ["a", "b", "c"]}}, "ensemble of 3 runs (mean)"),
])
def test_every_figure_of_a_labelled_set_names_what_it_shows(figures, monkeypatch, tmp_path, extra, subject):
    monkeypatch.setattr(plots, "TSNE", QuickProjection)  # its layout is not under test, and it is slow
    scoring = labelled_scoring()
    if "ensemble" in extra:  # an ensemble has no one embedding space: no embeddings.png
        scoring.pred.embeddings = np.zeros((len(scoring.pred.targets), 0), np.float32)
    write_labelled({"plain": scoring}, [f"ISIC_{i}" for i in range(40)], tmp_path, Settings(tsne=True), extra,
                   resamples=10)
    expected = {"roc.png", "pr.png", "calibration.png", "confusion_matrix.png"}
    assert expected | ({"embeddings.png"} if "ensemble" not in extra else set()) == set(figures)
    for name, fig in figures.items():
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert any(subject in t for t in titles), (name, titles)
        assert figure_subject(extra) == subject
    if "embeddings.png" in figures:
        labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in figures["embeddings.png"].axes]
        assert labels == [("PCA component 1", "PCA component 2"), ("t-SNE dimension 1", "t-SNE dimension 2")]
        assert all("test" not in ax.get_title() for ax in figures["embeddings.png"].axes)


def test_similar_cases_add_a_seeded_random_sample_of_each_class():
    y = np.array([0] * 30 + [1] * 10)
    confident = {"malignant, called malignant (true positives)": [35, 36, 37, 38],
                 "benign, called malignant (false positives)": [1, 2], "malignant, called benign (false negatives)": []}
    cases = explain.similar_cases(confident, y, seed=7)
    assert list(cases) == ["malignant, called malignant", "benign, called malignant", "malignant, called benign",
                           "benign, at random", "malignant, at random"]
    assert cases["malignant, called malignant"] == [35, 36] and cases["malignant, called benign"] == []
    assert len(cases["benign, at random"]) == len(cases["malignant, at random"]) == explain.TYPICAL
    assert all(y[i] == 0 for i in cases["benign, at random"]) and all(y[i] == 1 for i in cases["malignant, at random"])
    assert explain.similar_cases(confident, y, seed=7) == cases  # fixed by the seed
    draws = {tuple(explain.similar_cases(confident, y, seed)["benign, at random"]) for seed in range(5)}
    assert len(draws) > 1  # random, not the first few


class Images:
    """A stand-in dataset: item i is (uint8 image, ...)."""

    def __getitem__(self, i):
        return torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), 0


def test_similar_png_for_new_images(figures, monkeypatch, tmp_path):
    """--images: a heading per image, the query apart from its neighbours, a legend for the frame colours, and the
    neighbour at distance 0 flagged as the same image as a training image."""
    refs = References(np.array(["T0", "T1", "T2"], dtype=object), np.array([0, 1, 0]), np.array(["", "", ""], object),
                      {}, "", "float32")
    monkeypatch.setattr(explain, "training_images", lambda s, ids: {i: np.zeros((8, 8, 3)) for i in ids})
    distances = np.array([[0.0, 0.2, 0.3], [0.05, 0.1, 0.4]])
    rows = np.array([[1, 0, 2], [2, 1, 0]])
    explain.write_similar(Images(), ["new0\nP(melanoma) 0.900", "new1\nP(melanoma) 0.100"], None,
                          explain.image_cases(2), distances, rows, refs, Settings(), tmp_path / "similar.png")
    fig = figures["similar.png"]
    found = texts(fig)
    assert "new image 1 of 2" in found and "new image 2 of 2" in found
    assert not any(t.startswith("first") for t in found)
    assert found.count("same image as this\ntraining image") == 1
    assert "1. T1\nmalignant\nd=0.000" in found and "new0\nP(melanoma) 0.900\nlabel unknown" in found
    assert {"training lesion: malignant", "training lesion: benign"} <= set(found)
    dividers = [line for ax in fig.axes for line in ax.lines]
    assert len(dividers) == 2  # one line between each query and its neighbours
    frames = {ax.texts[0].get_text().split("\n")[0]: ax.spines["top"].get_edgecolor() for ax in fig.axes if ax.texts}
    assert frames["1. T1"] != frames["2. T0"]  # malignant and benign neighbours framed apart


def test_gallery_has_a_colour_bar_a_plain_title_and_says_which_map(figures, tmp_path):
    image, cam = np.zeros((64, 64, 3)), np.zeros((64, 64))
    rows = {"malignant, called malignant (true positives)": [(image, cam, "ISIC_1\nP(melanoma) 0.900")],
            "benign, called malignant (false positives)": []}
    plots.gallery_plot(rows, tmp_path / "gallery.png", "Where the model looked", explain.cam_note(64))
    fig = figures["gallery.png"]
    colour_bars = [ax for ax in fig.axes if ax.get_xlabel().startswith("how much the region raised")]
    assert len(colour_bars) == 1
    caption = next(t for t in texts(fig) if t.startswith("Grad-CAM at trunk."))
    assert "trunk.layer2" in caption and "8 x 8 cells" in caption and "64 px" in caption
    assert "benign, called malignant (false positives): none" in texts(fig)


@pytest.mark.parametrize("size, layer, cells", [(32, "layer1", 8), (64, "layer2", 8), (128, "layer3", 8),
                                                (224, "layer4", 7), (256, "layer4", 8)])
def test_grad_cam_uses_the_deepest_map_of_at_least_7_by_7(size, layer, cells):
    """The CPU profile's 64 px gets layer2's 8 x 8 map, not layer3's 4 x 4; a real ResNet18's map has that shape."""
    assert explain.cam_layer(size) == (layer, size // cells)
    trunk = torchvision.models.resnet18().eval()
    seen = {}
    getattr(trunk, layer).register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    trunk(torch.zeros(1, 3, size, size))
    assert seen["shape"][-2:] == (cells, cells)


def test_grad_cam_maps_of_a_64px_image_have_7_by_7_cells_or_more(monkeypatch):
    """grad_cam on a real (untrained) ResNet18 at 64 px: the map it weighs and draws has 8 x 8 cells, 8 px apart."""
    drawn, upsample = {}, explain.upsample_aligned
    monkeypatch.setattr(explain, "upsample_aligned", lambda cam, size, stride, offset=0.0: drawn.update(
        cells=tuple(cam.shape[-2:]), stride=stride) or upsample(cam, size, stride, offset))
    model = build_model(Settings(backbone="resnet18", img_size=64)).eval()
    cam = explain.grad_cam(model, torch.rand(2, 3, 64, 64))
    assert cam.shape == (2, 64, 64) and drawn == {"cells": (8, 8), "stride": 8}


def history(epochs: int) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "train_loss": 1 / e, "train_bce": 0.5 / e, "train_contrastive": 0.5 / e,
                         "train_accuracy": 1 - 0.5 / e, "val_accuracy": 1 - 0.6 / e, "val_loss": 1.1 / e,
                         "val_auroc": 1 - 0.4 / e, "val_pauc": 0.2 - 0.1 / e, "train_pos_active": 0.5 / e,
                         "train_neg_active": 0.4 / e, "train_pos_distance": 0.5 / e, "train_neg_distance": 1 + 0 * e})


def legend_covers_data(ax) -> bool:
    """Whether the axes' legend lies over its plotting area (where the data is drawn)."""
    legend = ax.get_legend()
    ax.figure.canvas.draw()
    return legend is not None and legend.get_window_extent().overlaps(ax.get_window_extent())


@pytest.mark.parametrize("epochs", [15, 300])
def test_history_plots_read_at_15_and_300_epochs(figures, tmp_path, epochs):
    """Markers only with few points, the legend under the axes, best.pt's epoch marked, split and run in the title."""
    plots.history_plots(history(epochs), tmp_path, "demo", {"epoch": 7, "metric": "pauc"})
    splits = {"loss.png": "train and val splits", "accuracy.png": "train and val splits", "auroc.png": "val split",
              "pauc.png": "val split"}
    for name, split in splits.items():
        ax = figures[name].axes[0]
        assert split in ax.get_title() and "run demo" in ax.get_title(), ax.get_title()
        curves = [line for line in ax.lines if line.get_label().startswith(("train", "validation"))]
        assert curves and {line.get_marker() for line in curves} == ({"o"} if epochs <= 30 else {"None"})
        best = [line for line in ax.lines if line.get_label() == "best.pt: epoch 7 (val pauc)"]
        assert len(best) == 1 and list(best[0].get_xdata()) == [7, 7]
        assert not legend_covers_data(ax), name
    assert "run demo" in figures["pairs.png"].get_suptitle() and "train split" in figures["pairs.png"].axes[0].get_title()


def test_roc_pr_calibration_legends_outside_and_run_named(figures, monkeypatch, tmp_path):
    """Legends under the axes; every title names the split and the run; the histogram's empty bins stay on the axes
    (a log scale drops a zero count far below them and the line looks broken)."""
    scoring = labelled_scoring()
    scoring.pred.probabilities[:] = np.where(scoring.pred.targets == 1, 0.95, 0.05)  # bins 2 to 8 empty
    scoring.pred.embeddings = np.zeros((40, 0), np.float32)
    write_labelled({"plain": scoring}, [f"ISIC_{i}" for i in range(40)], tmp_path,
                   Settings(out=str(tmp_path / "demo")), {"split": "val"}, resamples=10)
    for name in ("roc.png", "pr.png", "calibration.png", "confusion_matrix.png"):
        assert "val split, run demo" in figures[name].axes[0].get_title(), name
    for name in ("roc.png", "pr.png", "calibration.png"):
        assert not any(legend_covers_data(ax) for ax in figures[name].axes), name
    histogram = figures["calibration.png"].axes[1]
    bottom = histogram.get_window_extent().y0
    for patch in histogram.patches:
        drawn = patch.get_transform().transform(patch.get_path().vertices)
        assert np.isfinite(drawn).all() and drawn[:, 1].min() >= bottom - 1
    figures["calibration.png"].canvas.draw()
    counts = [label.get_text() for label in histogram.get_yticklabels() if label.get_text()]
    assert counts and all(text.isdigit() for text in counts), counts  # not "$\\mathdefault{10^{1}}$"
    title = figures["calibration.png"].axes[0].title
    assert title.get_window_extent().x1 <= figures["calibration.png"].bbox.x1  # the run's name is not cut off


def test_similar_cases_at_random_never_repeat_a_case_shown_above():
    y = np.array([0] * 5 + [1] * 5)
    confident = {"malignant, called malignant (true positives)": [9, 8],
                 "benign, called malignant (false positives)": [1, 2], "malignant, called benign (false negatives)": [5]}
    for seed in range(5):
        cases = explain.similar_cases(confident, y, seed)
        above = {i for found in list(cases.values())[:3] for i in found}
        assert set(cases["benign, at random"]) == {0, 3, 4}
        assert set(cases["malignant, at random"]) <= {6, 7} and not above & set(cases["malignant, at random"])


def test_gallery_and_similar_name_their_split_in_the_picture(figures, monkeypatch, tmp_path):
    model = build_model(Settings(backbone="resnet18", img_size=32)).eval()
    dataset = Images()
    dataset.metadata = np.zeros((4, 0), np.float32)
    pred = Predictions(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.1, 0.2]), np.zeros(4, np.float32),
                       np.zeros((4, 2), np.float32), 0.5)
    explain.write_gallery(model, dataset, ["a", "b", "c", "d"], pred, 0.5, tmp_path / "gallery.png", "cpu",
                          subject="test split, run demo")
    assert figures["gallery.png"].get_suptitle().startswith("test split, run demo: ")
    refs = References(np.array(["T0", "T1"], dtype=object), np.array([0, 1]), np.array(["", ""], object), {}, "",
                      "float32")
    monkeypatch.setattr(explain, "training_images", lambda s, ids: {i: np.zeros((8, 8, 3)) for i in ids})
    explain.write_similar(Images(), ["q0", "q1"], np.array([1, 0]), {"malignant, called malignant": [0, 1]},
                          np.array([[0.1, 0.2], [0.1, 0.3]]), np.array([[0, 1], [1, 0]]), refs, Settings(),
                          tmp_path / "similar.png", "val split, run demo")
    assert figures["similar.png"].get_suptitle().startswith("val split, run demo: ")
