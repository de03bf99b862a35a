"""Scores from the embedding alone: the space the contrastive loss shaped, kNN and distance-to-prototype."""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors


def embedding_space(embeddings, s) -> np.ndarray:
    """The space the contrastive loss shaped: L2-normalised embeddings unless the run turned that off."""
    if not s.normalize_embeddings:
        return embeddings
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)


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
