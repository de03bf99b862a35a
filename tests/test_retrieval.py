"""Similar-lesion retrieval on known answers: exact nearest neighbours, PML retrieval metrics, the stored training
embeddings (computed once, invalidated by other weights), and predict.py --images writing neighbours.csv/similar.png."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine import devices
from engine.checkpoints import load_checkpoint, save_checkpoint
from engine.config import Settings
import predict
from scoring import inference
from workflow import evaluation
from modules import SiameseNet
from scoring.inference import Predictions
from scoring.references import STORE, References, load_references, save_references, weights_fingerprint
from scoring.retrieval import fit_look_basis, nearest, project_looks, retrieval_metrics


def test_an_embedding_equal_to_a_training_one_is_its_nearest_at_distance_0():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    query = np.r_[train[[7, 123]], rng.normal(size=(40, 16))].astype(np.float32)  # > 25 rows: cdist's matmul path
    distances, indices = nearest(train, query, 5)
    assert list(indices[:2, 0]) == [7, 123] and (distances[:2, 0] == 0).all()
    assert (np.diff(distances, axis=1) >= 0).all()  # nearest first
    brute = np.linalg.norm(query[:, None] - train[None], axis=2)
    assert np.allclose(distances, np.sort(brute, axis=1)[:, :5], atol=1e-5)
    assert nearest(train[:3], query, 5)[0].shape == (42, 3)  # k is capped at the training set size


def test_separated_clusters_give_perfect_retrieval():
    rng = np.random.default_rng(1)
    train_y, y = np.r_[np.zeros(40, int), np.ones(10, int)], np.r_[np.zeros(12, int), np.ones(5, int)]
    centre = lambda labels: labels[:, None] * np.array([5.0, 0, 0, 0])  # noqa: E731
    train = rng.normal(size=(50, 4)) * 0.1 + centre(train_y)
    query = rng.normal(size=(17, 4)) * 0.1 + centre(y)
    m = retrieval_metrics(train, train_y, query, y)
    for part in (m["mean_of_classes"], m["all_queries"], *m["per_class"].values()):
        assert part["precision_at_1"] == 1.0 and part["r_precision"] == 1.0
        assert part["mean_average_precision_at_r"] == pytest.approx(1.0)
    assert m["per_class"]["benign"]["R"] == 40 and m["per_class"]["malignant"]["queries"] == 5


def test_retrieval_metrics_match_a_hand_computation():
    # query 0.9 (malignant): neighbours 1 (m), 0 (b), 2 (m), 10 (b); R = 2 → R-precision 1/2, MAP@R (1/1 + 0)/2
    # query 9.0 (benign):    neighbours 10 (b), 2 (m), 1 (m), 0 (b); R = 2 → the same
    m = retrieval_metrics(np.array([[0.0], [1.0], [2.0], [10.0]]), [0, 1, 1, 0], np.array([[0.9], [9.0]]), [1, 0])
    for part in m["per_class"].values():
        assert part == {"precision_at_1": 1.0, "r_precision": 0.5, "mean_average_precision_at_r": 0.5,
                        "queries": 1, "R": 2}


@pytest.mark.parametrize("by", ["look", "embedding"])
def test_retrieval_metrics_are_computed_on_the_cpu_for_a_run_on_an_apple_gpu(monkeypatch, by):
    # The model's scores are stood in for (no MPS here); what is tested is that nothing after scoring is sent to the
    # run's device: PML's AccuracyCalculator works in float64, which MPS rejects (and this PyTorch has no MPS at all).
    train_y, y = np.r_[np.zeros(20, int), np.ones(20, int)], np.array([0, 0, 1, 1])
    train = np.c_[train_y * 4.0, np.ones(40)].astype(np.float32)
    jitter = np.random.default_rng(1).normal(scale=0.1, size=(40, 2)).astype(np.float32)  # distinct looks: a basis
    query = np.c_[y * 4.0, np.ones(4)].astype(np.float32)
    pred = Predictions(y, np.array([0.1, 0.2, 0.8, 0.9]), np.zeros(4, np.float32), query, float("nan"), query)
    monkeypatch.setattr(evaluation, "score", lambda *args: pred)
    visual = np.random.default_rng(0).normal(size=(44, 38)).astype(np.float32)  # colour/texture stand-ins
    monkeypatch.setattr(evaluation, "dataset_features", lambda dataset, s: visual[40:])
    basis = fit_look_basis(train + jitter)
    refs = References(np.arange(40).astype(str).astype(object), train_y, np.full(40, "", dtype=object),
                      {"plain": train}, "sha", "float32", visual[:40], {"plain": project_looks(train + jitter, basis)},
                      {"plain": basis})
    run = evaluation.LoadedRun(Path("run"), Settings(neighbours_by=by), None, torch.device("mps"))
    scored = evaluation.score_views(run, range(4), refs, val=None)
    assert scored["plain"].retrieval["mean_of_classes"]["precision_at_1"] == 1.0


def test_other_weights_or_another_precision_invalidate_stored_embeddings(tmp_path):
    torch.manual_seed(0)
    model = SiameseNet("resnet18", embedding_dim=8)
    refs = References(np.array(["a", "b"], dtype=object), np.array([0, 1]), np.array(["", "nevus"], dtype=object),
                      {"plain": np.ones((2, 8), np.float32)}, weights_fingerprint(model), "bfloat16")
    save_references(tmp_path / STORE, refs)
    loaded = load_references(tmp_path / STORE, weights_fingerprint(model), "bfloat16")
    assert list(loaded.ids) == ["a", "b"] and list(loaded.diagnosis) == ["", "nevus"]
    assert load_references(tmp_path / STORE, weights_fingerprint(model), "float32") is None
    with torch.no_grad():
        model.head.bias += 1e-6
    assert load_references(tmp_path / STORE, weights_fingerprint(model), "bfloat16") is None


@pytest.mark.slow
def test_predict_images_lists_neighbours_and_embeds_the_training_split_once(run_copy, tiny_data, tmp_path,
                                                                            monkeypatch):
    """Once per weights and precision: references embedded in bf16 are not used for float32 queries."""
    run = run_copy
    splits = pd.read_csv(run / "splits.csv")
    known = splits.loc[splits["split"] == "train", "isic_id"].iloc[3]
    folder = tmp_path / "new"
    folder.mkdir()
    for name in (known, *splits.loc[splits["split"] == "test", "isic_id"].iloc[:2]):
        shutil.copy(tiny_data / "train-image" / "image" / f"{name}.jpg", folder)
    passes = []
    evaluate = inference.evaluate
    monkeypatch.setattr(inference, "evaluate", lambda *a, **kw: passes.append(1) or evaluate(*a, **kw))
    (run / STORE).unlink()  # written by the training run: make predict.py compute it
    args = ["--run", str(run), "--images", str(folder), "--out", str(tmp_path / "out"), "--workers", "0",
            "--neighbours", "3"]

    def scored() -> int:
        """Passes over a set of images: each is scored twice, plainly and with TTA, as the run was trained with --tta."""
        passes.clear()
        assert predict.main(args) == 0
        assert len(passes) % 2 == 0
        return len(passes) // 2

    assert scored() == 2  # the training split, then the folder
    assert scored() == 1  # the folder only: the training embeddings come from RUN/train_embeddings.pt
    table = pd.read_csv(tmp_path / "out" / "neighbours.csv")
    assert list(table.columns) == ["query_id", "rank", "isic_id", "label", "distance"] and len(table) == 3 * 3
    first = table[table["query_id"] == known].iloc[0]
    assert first["rank"] == 1 and first["isic_id"] == known and first["distance"] < 1e-4
    assert (tmp_path / "out" / "similar.png").stat().st_size > 1000
    with monkeypatch.context() as bf16:  # as on a bf16 GPU: CPU autocast computes in bf16 too
        for module in (devices, inference):
            bf16.setattr(module, "autocast_dtype", lambda device: torch.bfloat16)
        assert scored() == 2
    assert scored() == 2  # the stored bf16 references are embedded again in float32
    table = pd.read_csv(tmp_path / "out" / "neighbours.csv")
    assert table[table["query_id"] == known].iloc[0]["distance"] < 1e-4
    assert {"knn_score", "prototype_score"} <= set(pd.read_csv(tmp_path / "out" / "predictions.csv").columns)
    checkpoint = load_checkpoint(run / "best.pt")
    for weights in (checkpoint["model"], checkpoint.get("ema") or {}):
        if "head.bias" in weights:
            weights["head.bias"] += 0.5
    save_checkpoint(run / "best.pt", checkpoint)
    assert scored() == 2  # other weights: the stored embeddings no longer count
