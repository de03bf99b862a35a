"""A small synthetic dataset in the Kaggle "ISIC 2020 JPG 256x256 RESIZED" layout, for the demo and the tests.

Benign lesions are smooth, symmetric, evenly brown ovals; malignant ones have irregular borders and several colours
(the A, B and C of the dermatologists' ABCD rule), so the class is learnable from pixels within a few epochs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SKIN = np.array([225, 180, 150])
BROWN = np.array([120, 70, 40])
DARK = np.array([50, 30, 25])
BLUE_GREY = np.array([90, 100, 120])


def lesion(rng: np.random.Generator, malignant: bool, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    cx, cy = rng.normal(0, 0.05, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = np.hypot((xx - cx) / rng.uniform(0.8, 1.2), yy - cy)
    base = rng.uniform(0.18, 0.3)
    # Malignant borders are ragged and asymmetric; some benign ones are a little irregular too, so the classes overlap.
    roughness = rng.uniform(0.02, 0.09) if malignant else rng.uniform(0.0, 0.035)
    harmonics = sum(roughness * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5, 7))
    border = base * (1 + harmonics)
    inside = np.clip((border - radius) / 0.02, 0, 1)[..., None]
    skin = SKIN * rng.uniform(0.9, 1.05) + rng.normal(0, 6, (size, size, 3))
    colour = np.broadcast_to(BROWN * rng.uniform(0.85, 1.15), (size, size, 3)).copy()
    patch_chance = 0.7 if malignant else 0.15  # dark and blue-grey patches, mostly in malignant lesions
    for tint in (DARK, BLUE_GREY):
        if rng.random() < patch_chance:
            px, py = rng.uniform(-0.15, 0.15, 2)
            patch = np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / rng.uniform(0.004, 0.012)))[..., None]
            colour = colour * (1 - patch) + tint * patch
    colour += rng.normal(0, 8, (size, size, 3))
    return np.clip(skin * (1 - inside) + colour * inside, 0, 255).astype(np.uint8)


def make_dataset(root, n_images: int = 1000, malignant_rate: float = 0.15, size: int = 96, seed: int = 0) -> Path:
    """Write root/train-metadata.csv and root/train-image/image/*.jpg; returns root. Patients have 1-6 images."""
    root = Path(root)
    image_dir = root / "train-image" / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, patient = [], 0
    while len(rows) < n_images:
        patient += 1
        for _ in range(min(rng.integers(1, 7), n_images - len(rows))):
            isic_id = f"ISIC_{9000000 + len(rows):07d}"
            target = int(rng.random() < malignant_rate)
            Image.fromarray(lesion(rng, bool(target), size)).save(image_dir / f"{isic_id}.jpg", quality=90)
            rows.append({"isic_id": isic_id, "patient_id": f"IP_{patient:07d}", "target": target})
    pd.DataFrame(rows).to_csv(root / "train-metadata.csv")  # with the unnamed index column, as Kaggle's file has
    return root
