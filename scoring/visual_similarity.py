"""Do an image's nearest training lesions in the embedding look like it? Retrieval quality a person would recognise.

A fixed, model-free description of each image (colour statistics of the whole image and of the lesion centre, a
colour histogram and a texture measure of the centre) gives a yardstick that no training can bend. Against it:

- visual agreement@k: how close, in that feature space, the embedding's k nearest training lesions are to the
  query, on a scale where k random training lesions of the query's class score 0 and the query's k nearest in the
  feature space itself score 1 (negative: less alike than random lesions of the right class);
- hubness@k: the share of training lesions that are among anyone's k nearest, and the largest number of queries one
  training lesion is among the k nearest of. An embedding that pulls each class to a point serves every query the
  same few lesions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dataset import ImageDataset
from engine import timings
from isic.image_cache import cached_images
from scoring.retrieval import nearest

K = 5  # neighbours judged, as similar.png and neighbours.csv show them
FEATURE_SIDE = 64  # every image is decoded at this side to be described, whatever the run's --img-size: runs compare
BINS = 8  # histogram bins per colour channel
CHUNK = 512  # images or queries per step: bounds memory at any dataset size


def _centre(x: torch.Tensor) -> torch.Tensor:
    """The middle half of each side: dermoscopy images centre the lesion, the corners are mostly skin."""
    side = x.shape[-1]
    return x[..., side // 4: side - side // 4, side // 4: side - side // 4]


def _colour_statistics(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per channel, the share of pixels in each of BINS equal intervals of [0, 1]."""
    bins = (x * BINS).long().clamp_(0, BINS - 1)
    return F.one_hot(bins, BINS).float().mean(dim=(2, 3)).flatten(1)


def _texture(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring grey pixels, across and down."""
    grey = x.mean(dim=1)
    return torch.stack([(grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2)),
                        (grey[:, 1:] - grey[:, :-1]).abs().mean(dim=(1, 2))], dim=1)


BLOCKS = (6, 6, 3 * BINS, 2)  # widths: whole-image colour, centre colour, centre histogram, centre texture


def image_features(images: torch.Tensor) -> np.ndarray:
    """uint8 images (B, 3, H, W) → (B, sum(BLOCKS)) float32 colour/texture features, described at FEATURE_SIDE
    (area-resized to it: a no-op on dataset_features' images, decoded at that side)."""
    x = F.interpolate(images.float() / 255, size=(FEATURE_SIDE, FEATURE_SIDE), mode="area")
    centre = _centre(x)
    return torch.cat([_colour_statistics(x), _colour_statistics(centre), _histogram(centre), _texture(centre)],
                     dim=1).numpy()


def dataset_features(dataset: ImageDataset, s, phase: str = "evaluation.visual_features") -> np.ndarray:
    """image_features of every image of an ImageDataset, in its order, CHUNK images at a time, from the files decoded
    at FEATURE_SIDE (image_cache.decode): the same features whatever the run's --img-size. They come from an image
    cache at that side (built once per set of files, as a run's own; a run at FEATURE_SIDE reads its own cache),
    or with --no-cache from the files."""
    fixed = at_feature_side(dataset, s)
    with timings.phase(phase, note=f"{len(dataset)} images"):
        parts = [image_features(fixed.__getitems__(np.arange(start, min(start + CHUNK, len(fixed))))[0])
                 for start in range(0, len(fixed), CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, sum(BLOCKS)), np.float32)


def at_feature_side(dataset: ImageDataset, s) -> ImageDataset:
    """The same images decoded at FEATURE_SIDE."""
    if dataset.size == FEATURE_SIDE:
        return dataset
    cache = None
    if not s.no_cache and len(dataset):
        cache, _ = cached_images(dataset.paths, FEATURE_SIDE, s.cache_dir, s.workers or 0,
                                 phase="evaluation.feature_cache")  # unreadable files: left out of `dataset` already
    return ImageDataset(dataset.rows, dataset.targets, dataset.paths, FEATURE_SIDE, cache)


def feature_space(train_features: np.ndarray, features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets standardised by the training set's mean and spread, then each block scaled to the same total
    variance: 24 histogram bins would otherwise outweigh 2 texture measures."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    weights = np.concatenate([np.full(w, 1 / np.sqrt(w)) for w in BLOCKS])
    scale = lambda f: torch.as_tensor((f - mean) / std * weights, dtype=torch.float32)  # noqa: E731
    return scale(train_features), scale(features)


def visual_agreement(train_features, train_y, features, y, retrieved: np.ndarray) -> float:
    """The feature-space distance from each query to its `retrieved` training lesions (N, k), on the scale of
    random same-class lesions (0) to its k nearest in the feature space (1): one ratio of sums over every query,
    so that a query whose two ends nearly meet cannot dominate. NaN when no query has a same-class training lesion."""
    train, query = feature_space(np.asarray(train_features), np.asarray(features))
    train_y, y, retrieved = torch.as_tensor(np.asarray(train_y)), torch.as_tensor(np.asarray(y)), \
        torch.as_tensor(retrieved)
    k = retrieved.shape[1]
    random = best = found = 0.0
    for start in range(0, len(query), CHUNK):
        rows = slice(start, start + CHUNK)
        distances = torch.cdist(query[rows], train)
        same = (y[rows, None] == train_y[None, :]).float()
        usable = same.sum(1) > 0
        random += ((distances * same).sum(1)[usable] / same.sum(1)[usable]).sum().item()
        best += distances[usable].topk(k, largest=False).values.mean(1).sum().item()
        found += distances.gather(1, retrieved[rows])[usable].mean(1).sum().item()
    return (random - found) / (random - best) if random > best else float("nan")


def hubness(retrieved: np.ndarray, references: int) -> dict:
    """How the k nearest training lesions (N, k) of all queries spread over the `references` training lesions."""
    served = np.bincount(np.asarray(retrieved).ravel(), minlength=references)
    k = retrieved.shape[1]
    return {f"hub_share@{k}": float((served > 0).mean()), f"hub_max@{k}": int(served.max(initial=0))}


def retrieval_quality(train_embeddings, train_y, embeddings, y, train_features, features) -> dict:
    """Visual agreement and hubness of the K nearest training lesions in the embedding space, for metrics.json's
    "retrieval" section. hub_share@K_if_random: the expected share had every query drawn its K at random."""
    _, retrieved = nearest(train_embeddings, embeddings, K)
    k, references = retrieved.shape[1], len(train_y)
    return {f"visual_agreement@{k}": visual_agreement(train_features, train_y, features, y, retrieved),
            **hubness(retrieved, references),
            f"hub_share@{k}_if_random": float(1 - (1 - k / references) ** len(retrieved)) if references else 0.0}
