"""The files of an evaluated set of labelled images: metrics.json, predictions.csv, the classification report, the
plots, and the printed summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from engine import timings
from reporting import plots
from scoring.inference import Predictions
from scoring.metrics import (all_metrics, auroc, bootstrap_ci, calibration_metrics, classification_report, partial_auc,
                             prior_corrected_logits, sigmoid, size_caveat)
from scoring.retrieval import embedding_space
from utils import write_csv, write_json, write_text

BOOTSTRAP = 1000  # resamples behind each 95% confidence interval


@dataclass
class Scoring:
    """One scoring of a labelled set (plain or TTA) and the choices made on validation."""
    pred: Predictions
    threshold: float
    embedding_scores: dict = field(default_factory=dict)  # "knn", "prototype" → one score per image
    k: int | None = None
    retrieval: dict = field(default_factory=dict)  # retrieval.retrieval_metrics against the training split
    is_probability: bool = True  # False for a score that only ranks (a rank ensemble's): no calibration then


def prior_probability(pred: Predictions, prevalence: float) -> np.ndarray:
    return sigmoid(prior_corrected_logits(pred.logits, prevalence))


def labelled_metrics(sc: Scoring, groups, prevalence: float, s, resamples: int) -> dict:
    """Threshold metrics of the head, AUROC and pAUC with 95% CIs for every scorer, and calibration."""
    y, p = sc.pred.targets, sc.pred.probabilities
    scores = {"head": p, **sc.embedding_scores}
    with timings.phase("evaluation.bootstrap", note=f"{resamples} resamples, {len(y)} images, {len(scores)} scorers"):
        ci = bootstrap_ci(y, scores, groups, resamples, seed=s.seed)
    m = {**all_metrics(y, p, sc.threshold), "auroc_ci95": ci["head"]["auroc"], "pauc_ci95": ci["head"]["pauc"]}
    m["scorers"] = {name: {"auroc": auroc(y, v), "pauc": partial_auc(y, v), "auroc_ci95": ci[name]["auroc"],
                           "pauc_ci95": ci[name]["pauc"]} for name, v in scores.items()}
    if sc.k is not None:
        m["scorers"]["knn"]["k"] = int(sc.k)
    if sc.retrieval:
        m["retrieval"] = sc.retrieval
    if len(np.unique(y)) == 2:
        m["average_precision"] = float(average_precision_score(y, p))
    if len(np.unique(y)) == 2 and sc.is_probability:
        m["calibration"] = calibration_metrics(y, p, prior_probability(sc.pred, prevalence), prevalence)
    return m


def write_labelled(scorings: dict, ids, out_dir, s, extra: dict, groups=None, prevalence: float = 0.5,
                   resamples: int = BOOTSTRAP) -> dict:
    """metrics.json, predictions.csv, classification_report.txt and the plots for one labelled set of images.

    `scorings` holds "plain" and, with --tta, "tta"; the top-level metrics are the plain head's.
    """
    out_dir = Path(out_dir)
    plain = scorings["plain"]
    y, p, threshold = plain.pred.targets, plain.pred.probabilities, plain.threshold
    has_patients = groups is not None and pd.Series(groups).notna().any()
    metrics = {**labelled_metrics(plain, groups, prevalence, s, resamples), **extra,
               "bootstrap": {"resamples": resamples, "level": 0.95, "seed": s.seed,
                             "unit": "patient" if has_patients else "image", "stratified_by": "class"}}
    caveat = size_caveat(y, groups if has_patients else None)
    if caveat:
        metrics["small_set"] = caveat  # shown wherever these numbers are
    columns = {"isic_id": ids, "target": y}
    for view, sc in scorings.items():
        suffix = "_tta" if view == "tta" else ""
        columns[f"{'probability' if sc.is_probability else 'rank_score'}{suffix}"] = sc.pred.probabilities
        if sc.is_probability:
            columns[f"probability_prior_corrected{suffix}"] = prior_probability(sc.pred, prevalence)
        columns[f"predicted_malignant{suffix}"] = (sc.pred.probabilities >= sc.threshold).astype(int)
        columns.update({f"{name}_score{suffix}": v for name, v in sc.embedding_scores.items()})
        if view == "tta":
            metrics["tta"] = {**labelled_metrics(sc, groups, prevalence, s, resamples),
                              "threshold_chosen_on": "val with TTA (Youden's J)"}
    write_csv(out_dir / "predictions.csv", pd.DataFrame(columns))
    write_text(out_dir / "classification_report.txt", classification_report(y, p, threshold))
    subject = figure_subject(extra, "" if "ensemble" in extra else run_name(s))
    with timings.phase("evaluation.plots", note="roc, pr, calibration, confusion matrix"):
        if len(np.unique(y)) == 2:
            plots.roc_plot(y, p, threshold, metrics, out_dir / "roc.png", subject)
            plots.pr_plot(y, p, threshold, metrics, out_dir / "pr.png", subject)
        if len(np.unique(y)) == 2 and plain.is_probability:
            plots.calibration_plot(y, {"raw (50% training prior)": p, f"prior-corrected ({100 * prevalence:.1f}%)":
                                       prior_probability(plain.pred, prevalence)}, out_dir / "calibration.png", subject)
        plots.confusion_plot(metrics["confusion_matrix"], threshold, out_dir / "confusion_matrix.png", subject)
    if plain.pred.embeddings.shape[1]:  # an ensemble of runs has no one embedding space
        with timings.phase("evaluation.tsne" if s.tsne else "evaluation.pca", note="embeddings.png"):
            plots.embeddings_plot(embedding_space(plain.pred.embeddings, s), y, out_dir / "embeddings.png", subject,
                                  seed=s.seed, tsne=s.tsne)  # the space the contrastive loss shaped
    write_json(out_dir / "metrics.json", metrics)  # last: its presence means the evaluation finished
    return metrics


def run_name(s) -> str:
    """The run a figure's model comes from, as its titles name it: its folder's name."""
    return Path(s.out).name if s.out else ""


def figure_subject(extra: dict, run: str = "") -> str:
    """What the figures of a labelled set show, for their titles: "val split", "test split", another dataset's folder
    (each followed by ", run NAME" when `run` is given), or an ensemble of runs (with the split when known)."""
    if "split" in extra:
        scored = f"{extra['split']} split"
    elif "dataset" in extra:
        scored = Path(extra["dataset"]).parent.name or str(extra["dataset"])
    else:
        scored = ""
    if "ensemble" not in extra:
        return (scored or "scored images") + (f", run {run}" if run else "")
    runs = f"ensemble of {len(extra['ensemble']['runs'])} runs ({extra['ensemble']['how']})"
    return f"{runs}, {scored}" if scored else runs


def summary_line(m: dict, out_dir) -> str:
    """One line of threshold metrics, then a table of AUROC and pAUC with 95% CIs per scorer, then calibration."""
    line = (f"AUROC {m['auroc']:.4f}  pAUC {m['pauc']:.4f}  at threshold {m['threshold']:.4f}: "
            f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
            f"balanced accuracy {m['balanced_accuracy']:.3f}  (n={m['n']}, {m['n_positive']} malignant) → {out_dir}")
    line += "".join(f"\n  note: {text}" for text in set_notes(m))
    if "scorers" not in m:
        return line
    rows = [f"  {'scorer':<18} {'AUROC [95% CI]':<24} pAUC [95% CI]"]
    for view, part in (("", m), (", TTA", m.get("tta"))):
        for name, r in (part or {}).get("scorers", {}).items():
            label = f"kNN (k={r['k']})" if name == "knn" else name
            rows.append(f"  {label + view:<18} {_with_ci(r['auroc'], r['auroc_ci95']):<24} "
                        f"{_with_ci(r['pauc'], r['pauc_ci95'])}")
    for view, part in (("", m), (", TTA", m.get("tta"))):
        if (part or {}).get("retrieval"):
            rows.append(retrieval_line(part["retrieval"], view))
    b = m.get("bootstrap", {})
    rows.append(f"  95% CIs: {b.get('resamples')} bootstrap resamples by {b.get('unit')}, stratified by class")
    if "calibration" in m:
        c = m["calibration"]
        rows.append(f"  calibration: Brier {c['brier']:.4f} (prior-corrected {c['brier_prior_corrected']:.4f})  "
                    f"ECE {c['ece']:.4f} (prior-corrected {c['ece_prior_corrected']:.4f})  "
                    f"training prevalence {100 * c['train_prevalence']:.2f}%")
    return "\n".join([line, *rows])


def set_notes(m: dict) -> list[str]:
    """What a reader must know before trusting a labelled set's numbers: images left out, and a set too small."""
    notes = []
    if m.get("left_out_seen_in_training"):
        notes.append(f"{m['left_out_seen_in_training']} more images left out: the run trained or validated on them "
                     "(seen_in_training.csv; --include-seen counts them)")
    if m.get("small_set"):
        notes.append(m["small_set"])
    return notes


def retrieval_line(r: dict, view: str = "") -> str:
    """Precision@1, R-precision and MAP@R: the mean of the benign and malignant queries' values, then malignant's."""
    names = {"precision_at_1": "precision@1", "r_precision": "R-precision", "mean_average_precision_at_r": "MAP@R"}
    mean, malignant = r["mean_of_classes"], r["per_class"].get("malignant", {})
    both = "  ".join(f"{label} {mean[key]:.3f}" + (f" ({malignant[key]:.3f})" if malignant else "")
                     for key, label in names.items())
    by = f" by {r['neighbours_by']}" if "neighbours_by" in r else ""
    line = (f"  retrieval{by}{view} vs {r['references']} training lesions: {both}  "
            f"(mean of benign and malignant queries; malignant in brackets)")
    return line + (visual_line(r) if "visual_agreement@5" in r else "")


def visual_line(r: dict) -> str:
    """Visual agreement and hubness of the 5 nearest (visual_similarity.retrieval_quality)."""
    return (f"\n  5 nearest training lesions: visual agreement {r['visual_agreement@5']:.3f} (0: random lesions of the "
            f"class, 1: the nearest in colour/texture)  share of training lesions retrieved {r['hub_share@5']:.3f} "
            f"({r['hub_share@5_if_random']:.3f} if random)  most queries served by one {r['hub_max@5']}")


def _with_ci(value: float, ci) -> str:
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
