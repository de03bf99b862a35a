"""Which space should the nearest training lesions come from? Every candidate is read off one finished run's network
(no retraining), for its val and test splits against its training split, plain and with TTA (docs/similarity.md):

    python -m experiments.retrieval_spaces --runs runs/cv/fold1/joint --out runs/retrieval-spaces.csv

Candidates: the class embedding (what the classifier and kNN use), the trunk's pooled features, the channel means and
standard deviations of some of the trunk's stages (the statistics style transfer matches), the class embedding beside
them, and the class embedding's nearest re-ordered by them. Each block is L2-normalised; blocks share equal weight.
None uses the visual-agreement metric's own features.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset import image_loader, prepare_data
from engine.augment import to_float
from isic.tabular import with_metadata
from modules import trunk_stages
from scoring.inference import load_run
from scoring.references import train_references
from scoring.retrieval import retrieval_metrics
from scoring.visual_similarity import dataset_features, retrieval_quality
from utils import write_csv


@torch.inference_mode()
def network_features(model, dataset, s, tta: bool) -> dict:
    """Per image: the class embedding, the trunk's pooled output, and every stage's channel means and stds; with
    tta, each the mean over the 8 flips and quarter turns (as DihedralTTA averages the embedding)."""
    captured = {}
    stages = trunk_stages(model.trunk)
    hooks = [m.register_forward_hook(lambda _, __, out, i=i: captured.__setitem__(i, out))
             for i, m in enumerate(stages)]
    hooks.append(model.trunk.register_forward_hook(lambda _, __, out: captured.__setitem__("pooled", out)))
    turns = [(flip, k) for flip in (False, True) for k in range(4)] if tta else [(False, 0)]
    parts: dict[str, list] = {}
    try:
        for images, _, _, metadata in image_loader(dataset, s.eval_batch_size, torch.device("cpu"), 0, shuffle=False):
            images, sums = to_float(images), {}
            for flip, k in turns:
                view = torch.rot90(images.flip(3) if flip else images, k, dims=(2, 3))
                embedding, _ = model(view, metadata)
                found = {"embedding": embedding, "pooled": captured["pooled"]}
                for i in range(len(stages)):
                    x = captured[i].float()
                    found[f"mean{i + 1}"], found[f"std{i + 1}"] = x.mean((2, 3)), x.std((2, 3), correction=0)
                for name, value in found.items():
                    sums[name] = sums.get(name, 0) + value.float() / len(turns)
            for name, value in sums.items():
                parts.setdefault(name, []).append(value.numpy())
    finally:
        for h in hooks:
            h.remove()
    return {name: np.concatenate(v) for name, v in parts.items()}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def space(features: dict, groups: list[list[str]]) -> np.ndarray:
    """Each group of equal weight, each block of a group an equal share of it, every block of unit length."""
    return np.concatenate([unit(features[b]) / np.sqrt(len(groups) * len(group))
                           for group in groups for b in group], axis=1)


STATS = {f"{a}-{b}": [f"{kind}{i}" for i in range(a, b + 1) for kind in ("mean", "std")] for a, b in
         ((1, 4), (2, 4), (3, 4))}
CANDIDATES = {
    "class embedding": [["embedding"]],
    "trunk pooled": [["pooled"]],
    **{f"stage stats {r}": [blocks] for r, blocks in STATS.items()},
    **{f"class embedding | stage stats {r}": [["embedding"], blocks] for r, blocks in STATS.items()},
}
SHORTLIST = 25  # re-ranking: the class embedding's nearest, ordered by the look


def reranked_quality(train: dict, query: dict, train_y, y, look: list, refs, visual) -> dict:
    """precision@1 and visual agreement when the class embedding's SHORTLIST nearest are ordered by `look`."""
    from scoring.retrieval import nearest
    from scoring.visual_similarity import visual_agreement
    a, b = space(train, [["embedding"]]), space(query, [["embedding"]])
    _, shortlist = nearest(a, b, SHORTLIST)
    la, lb = space(train, [look]), space(query, [look])
    distance = np.linalg.norm(la[shortlist] - lb[:, None, :], axis=2)
    order = np.take_along_axis(shortlist, distance.argsort(axis=1, kind="stable"), axis=1)
    same = np.asarray(train_y)[order[:, 0]] == np.asarray(y)
    p1 = np.mean([same[np.asarray(y) == c].mean() for c in (0, 1)])
    return {"precision_at_1": p1, "map_at_r": np.nan,
            "visual_agreement": visual_agreement(refs.visual, train_y, visual, y, order[:, :5]),
            "hub_share": np.nan, "hub_max": np.nan}


def measure(run_dir: Path) -> list[dict]:
    s, model = load_run(run_dir, torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)
    data = with_metadata(prepare_data(s, splits_path=run_dir / "splits.csv"), s, run_dir)
    refs = train_references(run_dir, model, s, torch.device("cpu"), tta=False, data=data)
    rows = []
    for tta in (False, True):
        train = network_features(model, data.dataset("train", s.img_size), s, tta)
        for split in ("val", "test"):
            dataset = data.dataset(split, s.img_size)
            y = data.frame.loc[data.frame["split"] == split, "target"].to_numpy()
            query, visual = network_features(model, dataset, s, tta), dataset_features(dataset, s)
            found = {}
            for name, groups in CANDIDATES.items():
                a, b = space(train, groups), space(query, groups)
                r = {**retrieval_metrics(a, refs.targets, b, y),
                     **retrieval_quality(a, refs.targets, b, y, refs.visual, visual)}
                found[name] = {"precision_at_1": r["mean_of_classes"]["precision_at_1"],
                               "map_at_r": r["mean_of_classes"]["mean_average_precision_at_r"],
                               "visual_agreement": r["visual_agreement@5"], "hub_share": r["hub_share@5"],
                               "hub_max": r["hub_max@5"]}
            for r, blocks in STATS.items():
                found[f"class shortlist {SHORTLIST}, by stage stats {r}"] = reranked_quality(
                    train, query, refs.targets, y, blocks, refs, visual)
            rows += [{"run": str(run_dir), "view": "tta" if tta else "plain", "split": split, "space": name, **v}
                     for name, v in found.items()]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished run folders (e.g. the folds of a crossval)")
    p.add_argument("--out", required=True, help="CSV of every run, split and space")
    args = p.parse_args(argv)
    table = pd.DataFrame([row for run in args.runs for row in measure(Path(run))])
    write_csv(args.out, table)
    means = table.groupby(["view", "split", "space"], sort=False).mean(numeric_only=True)
    print(means.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
