"""The training split's embeddings, computed once per run and stored in the run folder (train_embeddings.pt).

kNN, prototype and retrieval compare every scored image with the training lesions (retrieval by look compares
looks, modules.look_vector, in the training looks' principal components, stored with them). Re-embedding ~25,000
training images for each folder of new images would cost more than scoring the folder, so the embeddings are stored
with the SHA-256 of the weights that made them and the precision they were computed in: a changed best.pt (or any
other weights), or another precision (references embedded by a bf16 GPU, queries in float32 on a CPU: an identical
image would no longer be at distance 0), no longer matches, and they are recomputed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dataset import prepare_data
from engine import timings
from engine.augment import DihedralTTA
from engine.checkpoints import save_checkpoint
from engine.devices import precision_name
from isic.image_cache import decoder_id
from isic.metadata import ID_COLUMNS, find_layout, read_csv
from isic.tabular import with_metadata
from scoring.inference import Predictions, score
from scoring.retrieval import embedding_space, fit_look_basis, project_looks
from scoring.visual_similarity import dataset_features

STORE = "train_embeddings.pt"
FORMAT = 3  # raise when the stored fields change


@dataclass
class References:
    """The training split as the embedding space sees it: one row per training image."""
    ids: np.ndarray         # isic_id
    targets: np.ndarray     # 0/1
    diagnosis: np.ndarray   # the metadata's `diagnosis` column, "" where it has none
    embeddings: dict        # view ("plain", "tta") → (N, D) float32 raw model embeddings
    weights_sha256: str
    precision: str          # what the embeddings were computed in: "float32", "bfloat16" or "float16" (autocast)
    visual: np.ndarray | None = None  # model-free colour/texture features (visual_similarity.py), (N, F)
    looks: dict = field(default_factory=dict)  # view → (N, K) looks in their principal components
    look_bases: dict = field(default_factory=dict)  # view → the components: retrieval.fit_look_basis


def views(model, tta: bool) -> dict:
    """The scorers of one model: plain, and the mean over the 8 dihedral views with TTA."""
    return {"plain": model, "tta": DihedralTTA(model)} if tta else {"plain": model}


def weights_fingerprint(model) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, values), whatever the device or memory format."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{flat.numel()}\n".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def diagnosis_column(s, ids) -> np.ndarray:
    """The `diagnosis` of each id from the run's metadata CSV, else from its --extra-csv (the official ground truth
    has one; the Kaggle file has not); "" where neither says."""
    sources = [find_layout(s.data_dir, s.csv, s.image_dir)[0], getattr(s, "extra_csv", None)]
    for csv_path in filter(None, sources):
        raw = read_csv(csv_path, "metadata CSV")
        id_col = next((c for c in ID_COLUMNS if c in raw.columns), None)
        if id_col is not None and "diagnosis" in raw.columns:
            found = dict(zip(raw[id_col].astype(str), raw["diagnosis"].fillna("").astype(str)))
            return np.array([found.get(i, "") for i in ids], dtype=object)
    return np.full(len(ids), "", dtype=object)


def load_references(path, fingerprint: str, precision: str) -> References | None:
    """The stored references when they were made by these weights in this precision; None when missing, stale or
    unreadable."""
    if not Path(path).is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged: recompute rather than fail
        return None
    if d.get("format") != FORMAT:
        print(f"{path} was written by an older version: embedding the training split again")
        return None
    if d["weights_sha256"] != fingerprint:
        print(f"{path} was made by other weights than this best.pt: embedding the training split again")
        return None
    if d.get("decoder") != decoder_id():
        print(f"{path} was made from images decoded otherwise ({d.get('decoder', 'unrecorded')}): embedding the "
              "training split again")
        return None
    if d["precision"] != precision:
        print(f"{path} was embedded in {d['precision']}, this device computes in {precision}: embedding the training "
              "split again")
        return None
    return References(np.array(d["ids"], dtype=object), d["targets"].numpy(), np.array(d["diagnosis"], dtype=object),
                      {view: e.numpy() for view, e in d["embeddings"].items()}, fingerprint, precision,
                      None if d.get("visual") is None else d["visual"].numpy(),
                      {view: x.numpy() for view, x in d["looks"].items()},
                      {view: {k: x.numpy() for k, x in basis.items()} for view, basis in d["look_bases"].items()})


def save_references(path, refs: References) -> None:
    save_checkpoint(path, {"format": FORMAT, "weights_sha256": refs.weights_sha256, "precision": refs.precision,
                           "decoder": decoder_id(),
                           "ids": list(refs.ids), "targets": torch.as_tensor(refs.targets),
                           "diagnosis": list(refs.diagnosis),
                           "embeddings": {view: torch.as_tensor(e) for view, e in refs.embeddings.items()},
                           "visual": None if refs.visual is None else torch.as_tensor(refs.visual),
                           "looks": {view: torch.as_tensor(x) for view, x in refs.looks.items()},
                           "look_bases": {view: {k: torch.as_tensor(x) for k, x in basis.items()}
                                          for view, basis in refs.look_bases.items()}})


def train_references(run_dir, model, s, device, tta: bool, data=None, store=None, visual: bool = True) -> References:
    """The training split's embeddings (plain, and TTA when asked) and colour/texture features, from
    RUN/train_embeddings.pt when it holds them for these weights in this device's precision, else computed (the run's
    data is read only then) and stored there, or in `store` (a folder that leaves the run untouched, e.g. an
    ensemble's member folder). visual=False: the features are not needed (unlabelled images), not computed."""
    fingerprint, precision = weights_fingerprint(model), precision_name(device)
    wanted = views(model, tta)

    by_look = s.neighbours_by == "look"

    def complete(refs: References) -> bool:
        return set(wanted) <= set(refs.embeddings) and (refs.visual is not None or not visual) and \
            (not by_look or set(wanted) <= set(refs.looks))

    refs = load_references(Path(run_dir) / STORE, fingerprint, precision)
    path = Path(store or run_dir) / STORE
    if store is not None and (refs is None or not complete(refs)):
        refs = load_references(path, fingerprint, precision) or refs
    if data is not None and refs is not None:
        train_ids = data.frame.loc[data.frame["split"] == "train", "isic_id"].to_numpy()
        if len(train_ids) != len(refs.ids) or (train_ids != refs.ids).any():
            refs = None  # another split (or --skip-bad-images dropped other images)
    if refs is not None and complete(refs):
        return refs
    data = data if data is not None else with_metadata(prepare_data(s, splits_path=Path(run_dir) / "splits.csv"),
                                                       s, run_dir)
    part = data.frame[data.frame["split"] == "train"]
    if refs is None:
        ids = part["isic_id"].to_numpy().astype(object)
        refs = References(ids, part["target"].to_numpy().astype(int), diagnosis_column(s, ids), {}, fingerprint,
                          precision)
    train = data.dataset("train", s.img_size)
    for view, scorer in wanted.items():
        if view not in refs.embeddings or (by_look and view not in refs.looks):
            print(f"embedding the {len(train)} training images ({view}) once; stored in {path}")
            with timings.phase("evaluation.train_embeddings" + ("_tta" if view == "tta" else ""),
                               note=f"{len(train)} images"):
                pred = score(scorer, train, s, device)
            refs.embeddings[view] = pred.embeddings
            if pred.looks is not None:
                refs.look_bases[view] = fit_look_basis(pred.looks)
                refs.looks[view] = project_looks(pred.looks, refs.look_bases[view])
    if visual and refs.visual is None:
        refs.visual = dataset_features(train, s, "evaluation.train_visual_features")
    save_references(path, refs)
    return refs


def neighbour_space(refs: References, view: str, pred: Predictions, s) -> tuple[np.ndarray, np.ndarray]:
    """The training split's and the scored images' vectors in the space where their nearest training lesions are
    found (s.neighbours_by): looks in the training looks' principal components, or the class embeddings."""
    if s.neighbours_by == "look":
        return refs.looks[view], project_looks(pred.looks, refs.look_bases[view])
    return embedding_space(refs.embeddings[view], s), embedding_space(pred.embeddings, s)


def neighbour_space_name(s) -> str:
    """What the distances between an image and its neighbours are measured in, in words."""
    if s.neighbours_by == "look":
        return "L2 distance between looks (the trunk's feature statistics; 0 = identical)"
    return f"L2 distance between {'L2-normalised ' if s.normalize_embeddings else ''}class embeddings (0 = " \
        f"identical{', 2 = opposite' if s.normalize_embeddings else ''})"
