"""The embedding space the contrastive loss shaped: kNN and distance-to-prototype scores, the nearest training
lesions of an image, and retrieval metrics (precision@1, R-precision, MAP@R)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors


def embedding_space(embeddings, s) -> np.ndarray:
    """The space the contrastive loss shaped: L2-normalised embeddings unless the run turned that off."""
    if not s.normalize_embeddings:
        return embeddings
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)


LOOK_DIMENSIONS = 256  # the looks' principal components kept: a resnet50's looks have 7,168 numbers


def fit_look_basis(train_looks: np.ndarray) -> dict:
    """The training split's looks' mean and principal components (at most LOOK_DIMENSIONS): distances between
    looks kept in a few hundred numbers, so that train_embeddings.pt stays small at ISIC scale."""
    from sklearn.decomposition import PCA
    pca = PCA(n_components=min(LOOK_DIMENSIONS, *train_looks.shape), random_state=0).fit(train_looks)
    return {"mean": pca.mean_.astype(np.float32), "components": pca.components_.astype(np.float32)}


def project_looks(looks: np.ndarray, basis: dict) -> np.ndarray:
    """Looks in the training split's principal components (fit_look_basis): the space neighbours by look are in."""
    return ((looks - basis["mean"]) @ basis["components"].T).astype(np.float32)


def knn_scores(train_embeddings, train_y, embeddings, ks) -> dict:
    """For each k: the fraction of malignant images among the k nearest training embeddings."""
    ks = sorted({min(k, len(train_y)) for k in ks})
    _, nearest = NearestNeighbors(n_neighbors=ks[-1]).fit(train_embeddings).kneighbors(embeddings)
    malignant = np.asarray(train_y)[nearest]
    return {k: malignant[:, :k].mean(1) for k in ks}


def prototype_scores(train_embeddings, train_y, embeddings) -> np.ndarray:
    """Distance to the benign centroid minus distance to the malignant centroid: higher is closer to melanoma."""
    benign, malignant = (train_embeddings[np.asarray(train_y) == c].mean(0) for c in (0, 1))
    return np.linalg.norm(embeddings - benign, axis=1) - np.linalg.norm(embeddings - malignant, axis=1)


def nearest(train_embeddings, embeddings, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest training embeddings by L2 distance: (distances, indices), each (N, k), nearest first.

    torch.cdist's matrix-product shortcut picks the candidates; their distances are then recomputed directly, so an
    embedding equal to a training one is at distance 0, not at the shortcut's rounding error (~1e-4)."""
    train = torch.as_tensor(np.asarray(train_embeddings), dtype=torch.float32)
    query = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    k = min(k, len(train))
    distances, indices = [], []
    for start in range(0, len(query), chunk):
        q = query[start:start + chunk]
        candidates = torch.cdist(q, train).topk(k, largest=False).indices
        exact = (q[:, None, :] - train[candidates]).norm(dim=2)
        order = exact.argsort(dim=1, stable=True)
        distances.append(exact.gather(1, order))
        indices.append(candidates.gather(1, order))
    if not distances:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
CLASS_NAMES = ("benign", "malignant")
KNN_CELLS = 4_000_000  # queries x references per call of the calculator: bounds its float64 work tensors (~32 MB)
MAX_QUERIES = 1000  # per class: each query ranks its whole class, so the cost is queries x references; a fixed
                    # random sample of a larger class estimates the per-query means within about ±0.02


def retrieval_metrics(train_embeddings, train_y, embeddings, y) -> dict:
    """pytorch-metric-learning's precision@1, R-precision and MAP@R of labelled queries against the training split.

    With two classes, R (the number of same-class references) is the whole class: every benign query ranks all
    references (exact, k = R). The calculator runs one class at a time in chunks of queries, so its (queries x R)
    work tensors stay small; per-sample means are then pooled. Reported per class, as the mean of the two classes
    (a benign majority would otherwise decide the pooled numbers: 98% of ISIC queries) and pooled over all queries.
    Always on the CPU, whatever the run's device: the calculator works in float64, which Apple GPUs (MPS) lack.
    A class with more than MAX_QUERIES queries is measured on a fixed random sample of them ("sampled_queries").
    """
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(include=RETRIEVAL_METRICS, k="max_bin_count", device=torch.device("cpu"),
                                    knn_func=CustomKNN(LpDistance(normalize_embeddings=False)))
    train = torch.as_tensor(np.asarray(train_embeddings), dtype=torch.float32)
    train_y, y = np.asarray(train_y), np.asarray(y)
    query = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    per_class, rng = {}, np.random.default_rng(0)
    for c, name in enumerate(CLASS_NAMES):
        rows, r = np.flatnonzero(y == c), int((train_y == c).sum())
        if len(rows) == 0 or r == 0:
            continue
        of = len(rows)
        if of > MAX_QUERIES:
            rows = np.sort(rng.choice(rows, MAX_QUERIES, replace=False))
        step = max(1, KNN_CELLS // len(train))
        sums = dict.fromkeys(RETRIEVAL_METRICS, 0.0)
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            found = calculator.get_accuracy(query[chunk], y[chunk], train, train_y, ref_includes_query=False)
            for metric in RETRIEVAL_METRICS:
                sums[metric] += found[metric] * len(chunk)
        per_class[name] = {**{m: v / len(rows) for m, v in sums.items()}, "queries": of, "R": r}
        if of > len(rows):
            per_class[name]["sampled_queries"] = len(rows)
    queries = sum(v["queries"] for v in per_class.values())
    pooled = lambda m: sum(v[m] * v["queries"] for v in per_class.values()) / queries  # noqa: E731
    return {"reference": "training split", "references": len(train), "distance": "L2 in the embedding space",
            "per_class": per_class,
            "mean_of_classes": {m: float(np.mean([v[m] for v in per_class.values()])) for m in RETRIEVAL_METRICS},
            "all_queries": {m: pooled(m) for m in RETRIEVAL_METRICS}}
