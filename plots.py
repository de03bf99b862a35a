"""Figures, always written to PNG files (a headless GPU box has no screen for plt.show())."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from utils import atomic_path  # noqa: E402

CLASSES = ["benign", "malignant"]


def save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _curves(history, columns: dict, ylabel: str, path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in columns.items():
        if column in history:
            ax.plot(history["epoch"], history[column], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def history_plots(history, out_dir) -> None:
    losses = {"train_loss": "train (BCE + contrastive)", "train_bce": "train BCE",
              "train_contrastive": "train contrastive", "val_loss": "validation (BCE + contrastive)"}
    if "train_instance" in history and history["train_instance"].any():  # --w-instance
        losses.update(train_loss="train (BCE + contrastive + instance)", train_instance="train instance (NT-Xent)")
    _curves(history, losses, "loss", out_dir / "loss.png", "Loss")
    _curves(history, {"train_accuracy": "train (balanced batches, threshold 0.5)",
                      "val_accuracy": "validation (Youden threshold)"}, "accuracy", out_dir / "accuracy.png", "Accuracy")
    _curves(history, {"val_auroc": "validation"}, "AUROC", out_dir / "auroc.png", "Validation AUROC")
    _curves(history, {"val_pauc": "validation"}, "pAUC above 80% TPR (max 0.2)", out_dir / "pauc.png",
            "Validation partial AUC")
    pairs_plot(history, out_dir / "pairs.png")


def pairs_plot(history, path) -> None:
    """What the contrastive term does, per epoch, over the training batches' pairs (losses.pair_stats).

    The loss averages only the active pairs (non-zero loss), separately for positives and negatives: it can stay flat
    while fewer pairs remain active; the fractions and distances show the change it hides."""
    if "train_pos_active" not in history:  # a history from before these were logged
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, ylabel in ((left, "active", "fraction of pairs with non-zero loss"),
                             (right, "distance", "mean distance (L2, normalised: 0 to 2)")):
        ax.plot(history["epoch"], history[f"train_pos_{kind}"], marker="o", label="positive pairs (same label)")
        ax.plot(history["epoch"], history[f"train_neg_{kind}"], marker="o", label="negative pairs")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if kind == "active" else "best")  # positives often sit at 1.0, top right
    left.set(title="Active pairs in training batches", ylim=(-0.02, 1.02))
    right.set(title="Distances in training batches")
    save(fig, path)


def roc_plot(y, p, threshold: float, metrics: dict, path) -> None:
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC {metrics['auroc']:.3f}, pAUC {metrics['pauc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.axhspan(0.8, 1.0, color="tab:orange", alpha=0.1, label="TPR ≥ 0.8 (pAUC region)")
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "ro",
            label=f"threshold {threshold:.3f} (chosen on validation)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    save(fig, path)


def confusion_plot(matrix, threshold: float, path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=CLASSES).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"Confusion matrix (threshold {threshold:.3f})")
    save(fig, path)


def embeddings_plot(embeddings, y, path, seed: int = 0, tsne: bool = True) -> None:
    """PCA (and t-SNE) of the embeddings, coloured by class; malignant drawn on top so they stay visible."""
    panels = [("PCA", PCA(n_components=2, random_state=seed).fit_transform(embeddings))]
    if tsne and len(embeddings) > 5:
        perplexity = min(30.0, (len(embeddings) - 1) / 3)
        panels.append(("t-SNE", TSNE(n_components=2, perplexity=perplexity, init="pca",
                                     random_state=seed).fit_transform(embeddings)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels):
        for label, colour in ((0, "tab:blue"), (1, "tab:red")):
            chosen = np.asarray(y) == label
            ax.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.6, c=colour,
                       label=f"{CLASSES[label]} ({chosen.sum()})")
        ax.set_title(f"{name} of test embeddings")
        ax.legend()
    save(fig, path)


def pr_plot(y, p, threshold: float, metrics: dict, path) -> None:
    precision, recall, _ = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.step(recall, precision, where="post", label=f"average precision {average_precision_score(y, p):.3f}")
    ax.axhline(np.mean(y), color="k", ls="--", lw=0.8, label=f"chance (prevalence {np.mean(y):.3f})")
    ax.plot(metrics["sensitivity"], metrics["precision"], "ro", label=f"threshold {threshold:.3f} (chosen on validation)")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper right", fontsize=8)
    save(fig, path)


def calibration_plot(y, probabilities: dict, path, bins: int = 10) -> None:
    """Reliability diagram (observed malignant rate per probability bin) above a histogram of the probabilities."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6.5), height_ratios=[3, 1.2], sharex=True)
    top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for label, p in probabilities.items():
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        top.plot(predicted, observed, marker="o", label=label)
        bottom.hist(p, bins=bins, range=(0, 1), histtype="step", lw=1.5, label=label)
    top.set(ylabel="observed malignant rate", title="Reliability diagram", xlim=(0, 1), ylim=(0, 1.01))
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted probability of melanoma", ylabel="images", yscale="log")
    save(fig, path)


def similar_plot(rows: list, path, note: str = "") -> None:
    """rows: (title, query, neighbours); query (image, caption, malignant or None when unknown); neighbours a list of
    (image, caption, malignant), nearest first. Images (H, W, 3) in [0, 1]; malignant ones get a red frame."""
    columns = 1 + max([len(n) for _, _, n in rows] + [1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.75 * columns + 0.4, 2.0 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (title, query, neighbours) in enumerate(rows):
        for c, (image, caption, malignant) in enumerate([query, *neighbours]):
            ax = axes[r, c]
            ax.axis("on")
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color="red" if malignant else "0.75", linewidth=3.5 if malignant else 0.8)
            ax.text(0.02, 0.98, caption, transform=ax.transAxes, va="top", fontsize=6, color="white",
                    bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
        axes[r, 0].set_title(title, loc="left", fontsize=8, fontweight="bold")
    fig.suptitle("Each image (left) beside its nearest training-split lesions" + (f"; {note}" if note else ""),
                 fontsize=8)
    save(fig, path)


def gallery_plot(rows: dict, path, title: str) -> None:
    """rows: title -> list of (image (H, W, 3) in [0, 1], Grad-CAM (H, W) in [0, 1], caption). Image, then overlay;
    `title` says how the heat maps were made (which block, how many cells)."""
    fig = _cam_rows(rows, title_space=0.3)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def _cam_rows(rows: dict, title_space: float = 0.0):
    """The figure both galleries draw: a row per title, each case as its image then its Grad-CAM overlay."""
    columns = 2 * max([len(cases) for cases in rows.values()] + [1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.8 * columns, 2.1 * len(rows) + title_space), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (title, cases) in enumerate(rows.items()):
        axes[r, 0].set_title(title if cases else f"{title}: none", loc="left", fontsize=9, fontweight="bold")
        for c, (image, cam, caption) in enumerate(cases):
            axes[r, 2 * c].imshow(image)
            axes[r, 2 * c].text(0.02, 0.98, caption, transform=axes[r, 2 * c].transAxes, va="top", fontsize=7,
                                color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
            axes[r, 2 * c + 1].imshow(image)
            axes[r, 2 * c + 1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    return fig
