"""Figures, always written to PNG files (a headless GPU box has no screen for plt.show())."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # ids and folder names are drawn as written: "a$_$b" is no formula
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from utils import atomic_path  # noqa: E402

CLASSES = ["benign", "malignant"]


def save(fig, path, tight: bool = True) -> None:
    """tight=False for figures laid out by hand (a colour bar, a legend or gaps placed in figure coordinates)."""
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


MARKERS_UP_TO = 30  # epochs: with more points, markers merge into a rope


def below(ax, ncol: int = 1) -> None:
    """The axes' legend under the axes, where it covers no data (tight_layout makes room for it)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=8, frameon=False)


def best_line(ax, best: dict | None) -> None:
    """best: {"epoch": e, "metric": name} of the epoch best.pt holds, drawn as a dotted vertical line."""
    if best and best.get("epoch"):
        chosen = "the last" if best["metric"] == "last" else f"val {best['metric']}"
        ax.axvline(best["epoch"], color="0.35", ls=":", lw=1.2, label=f"best.pt: epoch {best['epoch']} ({chosen})")


def _curves(history, columns: dict, ylabel: str, path, title: str, best: dict | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    marker = "o" if len(history) <= MARKERS_UP_TO else None
    for column, label in columns.items():
        if column in history:
            ax.plot(history["epoch"], history[column], marker=marker, ms=4, label=label)
    best_line(ax, best)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    below(ax, ncol=2)
    save(fig, path)


def history_plots(history, out_dir, run: str = "", best: dict | None = None) -> None:
    """loss.png, accuracy.png, auroc.png, pauc.png and pairs.png of one run (its folder's name: `run`); `best`:
    {"epoch", "metric"} of best.pt, marked on each."""
    named = f": run {run}" if run else ""
    losses = {"train_loss": "train (BCE + contrastive)", "train_bce": "train BCE",
              "train_contrastive": "train contrastive", "val_loss": "validation (BCE + contrastive)"}
    if "train_instance" in history and history["train_instance"].any():  # --w-instance
        losses.update(train_loss="train (BCE + contrastive + instance)", train_instance="train instance (NT-Xent)")
    _curves(history, losses, "loss", out_dir / "loss.png", f"Loss, train and val splits{named}", best)
    _curves(history, {"train_accuracy": "train (balanced batches, threshold 0.5)",
                      "val_accuracy": "validation (Youden threshold)"}, "accuracy", out_dir / "accuracy.png",
            f"Accuracy, train and val splits{named}", best)
    _curves(history, {"val_auroc": "validation"}, "AUROC", out_dir / "auroc.png", f"AUROC, val split{named}", best)
    _curves(history, {"val_pauc": "validation"}, "pAUC above 80% TPR (max 0.2)", out_dir / "pauc.png",
            f"Partial AUC, val split{named}", best)
    pairs_plot(history, out_dir / "pairs.png", named)


def pairs_plot(history, path, named: str = "") -> None:
    """What the contrastive term does, per epoch, over the training batches' pairs (losses.pair_stats).

    The loss averages only the active pairs (non-zero loss), separately for positives and negatives: it can stay flat
    while fewer pairs remain active; the fractions and distances show the change it hides."""
    if "train_pos_active" not in history:  # a history from before these were logged
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9))
    marker = "o" if len(history) <= MARKERS_UP_TO else None
    for ax, kind, ylabel in ((left, "active", "fraction of pairs with non-zero loss"),
                             (right, "distance", "mean distance (L2, normalised: 0 to 2)")):
        ax.plot(history["epoch"], history[f"train_pos_{kind}"], marker=marker, ms=4,
                label="positive pairs (same label)")
        ax.plot(history["epoch"], history[f"train_neg_{kind}"], marker=marker, ms=4, label="negative pairs")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        below(ax, ncol=2)
    left.set(title="Active pairs, train split batches", ylim=(-0.02, 1.02))
    right.set(title="Distances, train split batches")
    if named:
        fig.suptitle(f"Contrastive pairs{named}", fontsize=10)
    save(fig, path)


def roc_plot(y, p, threshold: float, metrics: dict, path, subject: str) -> None:
    """subject: what was scored, in the title (e.g. "test split", or an ensemble's description)."""
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 6.2))
    ax.plot(fpr, tpr, label=f"AUROC {metrics['auroc']:.3f}, pAUC {metrics['pauc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.axhspan(0.8, 1.0, color="tab:orange", alpha=0.1, label="TPR ≥ 0.8 (pAUC region)")
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "ro",
            label=f"threshold {threshold:.3f} (chosen on validation)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)", title=f"ROC: {subject}",
           xlim=(0, 1), ylim=(0, 1.01))
    below(ax)
    save(fig, path)


def confusion_plot(matrix, threshold: float, path, subject: str) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=CLASSES).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"Confusion matrix: {subject}\n(threshold {threshold:.3f})")
    save(fig, path)


TSNE_POINTS = 1000  # t-SNE's cost grows faster than the points: a larger set is drawn as a fixed-size sample


def tsne_sample(y, points: int = TSNE_POINTS, seed: int = 0) -> np.ndarray:
    """Indices of at most `points` images: every malignant one up to half of them, benign ones filling the rest."""
    y = np.asarray(y)
    if len(y) <= points:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    malignant, benign = np.flatnonzero(y == 1), np.flatnonzero(y != 1)
    malignant = rng.choice(malignant, min(len(malignant), points // 2), replace=False)
    benign = rng.choice(benign, min(len(benign), points - len(malignant)), replace=False)
    return np.sort(np.concatenate([malignant, benign]))


def embeddings_plot(embeddings, y, path, subject: str, seed: int = 0, tsne: bool = True) -> None:
    """PCA of the embeddings of `subject` (e.g. "val split") and t-SNE of at most TSNE_POINTS of them, coloured by
    class; malignant drawn on top so they stay visible. The axes are the projection's own: only nearness in the
    picture means anything."""
    y = np.asarray(y)
    panels = [("PCA", PCA(n_components=2, random_state=seed).fit_transform(embeddings), np.arange(len(y)))]
    if tsne and len(embeddings) > 5:
        rows = tsne_sample(y, seed=seed)
        perplexity = min(30.0, (len(rows) - 1) / 3)
        panels.append(("t-SNE", TSNE(n_components=2, perplexity=perplexity, init="pca",
                                     random_state=seed).fit_transform(embeddings[rows]), rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (name, points, rows) in zip(axes[0], panels):
        for label, colour in ((0, "tab:blue"), (1, "tab:red")):
            chosen = y[rows] == label
            ax.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.6, c=colour,
                       label=f"{CLASSES[label]} ({chosen.sum()})")
        sampled = f"\n(a sample of {len(rows)} of {len(y)})" if len(rows) < len(y) else ""
        axis = "component" if name == "PCA" else "dimension"
        ax.set(title=f"{name} of the embeddings: {subject}{sampled}", xlabel=f"{name} {axis} 1",
               ylabel=f"{name} {axis} 2")
        ax.legend()
    save(fig, path)


def pr_plot(y, p, threshold: float, metrics: dict, path, subject: str) -> None:
    precision, recall, _ = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 6))
    ax.plot(recall, precision, drawstyle="steps-post", label=f"average precision {average_precision_score(y, p):.3f}")
    ax.axhline(np.mean(y), color="k", ls="--", lw=0.8, label=f"chance (prevalence {np.mean(y):.3f})")
    ax.plot(metrics["sensitivity"], metrics["precision"], "ro", label=f"threshold {threshold:.3f} (chosen on validation)")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision-recall: {subject}", xlim=(0, 1),
           ylim=(0, 1.01))
    below(ax)
    save(fig, path)


def calibration_plot(y, probabilities: dict, path, subject: str, bins: int = 10) -> None:
    """Reliability diagram (observed malignant rate per probability bin) above a histogram of the probabilities."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 7.4), height_ratios=[3, 1.2], sharex=True)
    top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for label, p in probabilities.items():
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        top.plot(predicted, observed, marker="o", label=label)
        bottom.hist(p, bins=bins, range=(0, 1), histtype="step", lw=1.5, label=label)
    top.set(ylabel="observed malignant rate", title=f"Reliability diagram:\n{subject}", xlim=(0, 1),
            ylim=(0, 1.01))  # two lines: a run's name makes the title wider than this narrow figure
    bottom.set(xlabel="predicted probability of melanoma", ylabel="images")
    bottom.set_yscale("symlog", linthresh=1)  # a log scale for the counts, where an empty bin still draws (at 0)
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda count, _: f"{count:g}"))  # 10, not mathtext 10^1:
    bottom.set_ylim(bottom=0)  # text.parse_math is off, so a log axis's default labels would print as raw TeX
    handles, labels = top.get_legend_handles_labels()  # one legend for both: the histogram's lines share the colours
    bottom.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.45), fontsize=8, frameon=False)
    save(fig, path)


FRAMES = {True: ("tab:red", 3.0, "training lesion: malignant"), False: ("tab:blue", 1.5, "training lesion: benign")}


def similar_plot(rows: list, path, title: str) -> None:
    """rows: (heading, query, neighbours). query: (image, caption); neighbours: (image, caption, malignant, warning),
    nearest first; warning: "" or a line shown on a yellow band. Images (H, W, 3) in [0, 1]. A line separates each
    query from its neighbours; a neighbour's frame colour is its training label (the legend says which), and its
    caption names it too. The query's label is in its caption alone: one colour, one meaning."""
    columns = max([len(n) for _, _, n in rows] + [1])
    height = 2.05 * len(rows) + 1.0  # inches: a row of images with its heading, then the title and legend on top
    fig = plt.figure(figsize=(1.7 * (columns + 1.3), height))
    grid = fig.add_gridspec(len(rows), columns + 2, width_ratios=[1, 0.3] + [1] * columns, left=0.01, right=0.99,
                            top=1 - 0.95 / height, bottom=0.1 / height, hspace=0.3, wspace=0.06)
    for r, (heading, query, neighbours) in enumerate(rows):
        ax = _picture(fig.add_subplot(grid[r, 0]), *query, frame=("black", 1.5))
        ax.text(0, 1.03, heading, transform=ax.transAxes, fontsize=8, fontweight="bold", va="bottom")
        divider = fig.add_subplot(grid[r, 1])
        divider.axis("off")
        divider.add_line(Line2D([0.5, 0.5], [0.02, 0.98], color="0.35", lw=1.2))
        for c, (image, caption, malignant, warning) in enumerate(neighbours):
            ax = _picture(fig.add_subplot(grid[r, c + 2]), image, f"{c + 1}. {caption}", frame=FRAMES[malignant][:2])
            if warning:
                ax.text(0.03, 0.03, warning, transform=ax.transAxes, va="bottom", fontsize=6, fontweight="bold",
                        bbox=dict(facecolor="yellow", alpha=0.9, pad=1, lw=0))
    fig.suptitle(title, fontsize=8, y=1 - 0.08 / height, va="top")
    handles = [Patch(facecolor="none", edgecolor=colour, lw=lw, label=label) for colour, lw, label in FRAMES.values()]
    fig.legend(handles=handles + [Patch(facecolor="none", edgecolor="black", lw=1.5, label="query (label in caption)")],
               loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), ncol=3, fontsize=7, frameon=False)
    save(fig, path, tight=False)


def _picture(ax, image, caption: str, frame: tuple):
    """An image without ticks, framed (colour, line width), its caption on a dark band in the top-left corner."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(color=frame[0], linewidth=frame[1])
    ax.text(0.03, 0.97, caption, transform=ax.transAxes, va="top", fontsize=6, color="white",
            bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
    return ax


def gallery_plot(rows: dict, path, title: str, caption: str) -> None:
    """rows: heading -> list of (image (H, W, 3) in [0, 1], Grad-CAM (H, W) in [0, 1], caption). Each case as its image,
    then its heat map over it; a colour bar under the rows, `caption` (how coarse the maps are) under it."""
    columns = 2 * max([len(cases) for cases in rows.values()] + [1])
    height = 2.1 * len(rows) + 1.5  # inches: the rows, then the title on top and the colour bar and caption below
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.8 * columns, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / height, bottom=1.0 / height, hspace=0.3, wspace=0.05)
    for ax in axes.flat:
        ax.axis("off")
    for r, (heading, cases) in enumerate(rows.items()):
        axes[r, 0].set_title(heading if cases else f"{heading}: none", loc="left", fontsize=9, fontweight="bold")
        for c, (image, cam, text) in enumerate(cases):
            axes[r, 2 * c].imshow(image)
            axes[r, 2 * c].text(0.02, 0.98, text, transform=axes[r, 2 * c].transAxes, va="top", fontsize=7,
                                color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
            axes[r, 2 * c + 1].imshow(image)
            axes[r, 2 * c + 1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    bar = fig.add_axes((0.3, 0.62 / height, 0.4, 0.12 / height))
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), cax=bar, orientation="horizontal",
                 label="how much the region raised the melanoma score (1: the most in this image)")
    bar.tick_params(labelsize=7)
    bar.xaxis.label.set_fontsize(8)
    fig.text(0.5, 0.08 / height, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    save(fig, path, tight=False)
