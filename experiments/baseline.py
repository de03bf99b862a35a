"""The baselines a network has to beat: logistic regression on simple colour features, or on patient metadata.

Colour features per image: mean and std of R, G, B, H, S, V, and an 8-bin brightness histogram of the central half.
Metadata features: age, sex and anatomic site encoded exactly as the network's metadata branch reads them
(tabular.MetadataEncoder, fitted on the training split).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import rgb_to_hsv
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from isic.tabular import MetadataEncoder


def colour_features(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 3, H, W) → (N, 20) features."""
    rgb = images.transpose(0, 2, 3, 1).astype(np.float32) / 255
    hsv = rgb_to_hsv(rgb)
    channels = np.concatenate([rgb, hsv], axis=3).reshape(len(images), -1, 6)
    h, w = images.shape[2:]
    centre = hsv[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4, 2].reshape(len(images), -1)
    histogram = np.stack([np.histogram(v, bins=8, range=(0, 1))[0] for v in centre]) / centre.shape[1]
    return np.concatenate([channels.mean(1), channels.std(1), histogram], axis=1)


def fit_colour_baseline(images: np.ndarray, targets: np.ndarray):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    return model.fit(colour_features(images), targets)


def score_colour_baseline(model, images: np.ndarray) -> np.ndarray:
    return model.predict_proba(colour_features(images))[:, 1]


def metadata_baseline_scores(train: pd.DataFrame, test: pd.DataFrame, fields=("age", "sex", "site")) -> np.ndarray:
    """P(melanoma) of the test rows from a logistic regression on the training rows' encoded metadata."""
    encoder = MetadataEncoder.fit(train, list(fields))
    model = LogisticRegression(max_iter=2000, class_weight="balanced")
    model.fit(encoder.transform(train), train["target"].to_numpy())
    return model.predict_proba(encoder.transform(test))[:, 1]
