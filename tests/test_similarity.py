"""Instance-level similarity: neighbours by look (the trunk's feature statistics, --neighbours-by), the instance term
(NT-Xent between two augmented views, --w-instance), and the retrieval quality measures beside them (visual agreement
and hubness, visual_similarity.py)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss
from torch import nn

from conftest import in_process, tiny
from dataset import prepare_data
from engine.augment import BatchAugment, DihedralTTA
from engine.losses import JointLoss
from modules import SiameseNet, stage_statistics
from scoring.inference import evaluate, load_run, score
from scoring.references import STORE
from scoring.retrieval import embedding_space, nearest
from scoring.visual_similarity import feature_space, hubness, image_features, visual_agreement
from test_faults import CHILD, assert_same_results, finish, start
from train import forward_views


# ---------------------------------------------------------------- neighbours by look

def test_stage_statistics_are_each_channels_mean_and_spread_in_any_layout():
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0] = torch.tensor([0.0, 2.0]).repeat(8).view(4, 4)  # channel 0: mean 1, standard deviation 1
    x[0, 1] = 3.0  # channel 1: mean 3, standard deviation 0
    means, stds = torch.tensor([1.0, 3.0]) / math.sqrt(10), torch.tensor([1.0, 0.0])  # each half of unit length
    expected = torch.cat([means, stds])[None] / math.sqrt(2)
    torch.testing.assert_close(stage_statistics(x), expected)
    torch.testing.assert_close(stage_statistics(x.permute(0, 2, 3, 1), channels_last=True), expected)
    torch.testing.assert_close(stage_statistics(x.flatten(2).transpose(1, 2)), expected)  # (B, tokens, C)


def test_the_tta_look_is_the_mean_of_the_eight_views_looks():
    torch.manual_seed(0)
    net = SiameseNet("resnet18", embedding_dim=8).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)  # layer4's map 2 x 2: each stage has spread
    batch = lambda x: [(x, torch.zeros(3), torch.zeros(3), torch.zeros(3, 0))]  # noqa: E731
    cpu = torch.device("cpu")
    views = [torch.rot90(x, k, dims=(2, 3)) for x in (images, images.flip(3)) for k in range(4)]
    each = np.stack([evaluate(net, batch(v), cpu, look_of=net).looks for v in views])
    plain, tta = (evaluate(m, batch(images), cpu, look_of=net).looks for m in (net, DihedralTTA(net)))
    np.testing.assert_allclose(plain, each[0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(tta, each.mean(0), atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-3  # the views differ: the mean is no copy of the first
    assert evaluate(net, batch(images), cpu).looks is None  # not asked for


@pytest.mark.slow
def test_neighbours_by_embedding_are_the_nearest_class_embeddings(finished_run, run_copy):
    look = json.loads((finished_run[0] / "test" / "metrics.json").read_text())["retrieval"]
    assert look["neighbours_by"] == "look" and "between looks" in look["distance"]  # the default
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "neighbours_by": "embedding"}))
    assert in_process("predict.py", "--run", run_copy, "--split", "test", "--workers", 0) == 0
    retrieval = json.loads((run_copy / "test" / "metrics.json").read_text())["retrieval"]
    assert retrieval["neighbours_by"] == "embedding" and "class embeddings" in retrieval["distance"]
    assert retrieval["visual_agreement@5"] != look["visual_agreement@5"]
    s, model = load_run(run_copy, torch.device("cpu"))
    data = prepare_data(s, splits_path=run_copy / "splits.csv")
    pred = score(model, data.dataset("test", s.img_size), s, torch.device("cpu"))
    refs = torch.load(run_copy / STORE, weights_only=True)
    _, rows = nearest(embedding_space(refs["embeddings"]["plain"].numpy(), s), embedding_space(pred.embeddings, s), 5)
    table = pd.read_csv(run_copy / "test" / "neighbours.csv")
    assert table["isic_id"].tolist() == np.asarray(refs["ids"], dtype=object)[rows].ravel().tolist()


def nt_xent(a, b, temperature):
    """SimCLR's NT-Xent written out: each of the 2N views against its partner, every other view a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = (z @ z.T / temperature).fill_diagonal_(-torch.inf)
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return -(similarity[torch.arange(2 * n), partner] - similarity.logsumexp(dim=1)).mean()


def test_instance_term_is_nt_xent_over_the_two_views():
    first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    second = torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y, logits = torch.tensor([0, 1, 0, 1]), torch.zeros(4)
    loss, _, _, _, instance = JointLoss(w_bce=0.0, w_cl=0.0, w_instance=2.0, temperature=0.5)(
        first, logits, y, None, second)
    assert instance.item() == pytest.approx(nt_xent(first, second, 0.5).item(), rel=1e-5)
    assert instance.item() == pytest.approx(SelfSupervisedLoss(NTXentLoss(temperature=0.5))(first, second).item(),
                                            rel=1e-6)
    assert loss.item() == pytest.approx(2 * instance.item(), rel=1e-6)
    # without a second view (validation) the term is absent
    assert JointLoss(w_instance=2.0)(first, logits, y)[4].item() == 0


class TinyNet(nn.Module):
    """images → (embedding, logit), the interface of modules.SiameseNet, small enough for a few CPU steps."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, images, metadata=None):
        embedding = self.features(images)
        return embedding, self.head(embedding).squeeze(1)


def views_apart(model, images, augment) -> float:
    """Mean distance between the two views of one image over that between views of different images
    (normalised embeddings)."""
    torch.manual_seed(1)  # the same pair of views every time
    with torch.no_grad():
        first, _, second = forward_views(model.eval(), images, torch.zeros(len(images), 0), augment, True)
    distances = torch.cdist(F.normalize(second, dim=1), F.normalize(first, dim=1))
    others = ~torch.eye(len(images), dtype=torch.bool)
    return (distances.diagonal().mean() / distances[others].mean()).item()


def test_instance_term_pulls_two_views_of_one_image_together(w_instance=1.0):
    torch.manual_seed(0)
    # 32 toy "lesions": smooth random colour patterns, each unlike the others, that survive rotation and zoom
    images = F.interpolate(torch.rand(32, 3, 4, 4), size=32, mode="bilinear", align_corners=False)
    model, augment = TinyNet(), BatchAugment()
    loss_fn = JointLoss(w_bce=0.0, w_cl=0.0, w_instance=w_instance)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = views_apart(model, images, augment)
    for _ in range(30):
        embeddings, logits, second = forward_views(model.train(), images, torch.zeros(32, 0), augment, True)
        loss = loss_fn(embeddings, logits, torch.zeros(32), None, second)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert views_apart(model, images, augment) < 0.6 * before


def test_visual_agreement_is_0_for_random_same_class_lesions_and_1_for_the_nearest_in_feature_space():
    # eight training lesions of two classes, two queries near lesions 0 and 3
    rng = np.random.default_rng(0)
    train_features = rng.normal(size=(8, 38)).astype(np.float32)
    train_y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    query_features, y = train_features[[0, 3]] + 0.01, np.array([0, 1])
    train, query = feature_space(train_features, query_features)  # where the scale measures distances
    nearest = torch.cdist(query, train).topk(4, largest=False).indices.numpy()
    assert visual_agreement(train_features, train_y, query_features, y, nearest) == pytest.approx(1.0)
    # all four same-class lesions: the mean distance to a random lesion of the query's class
    same_class = np.array([np.flatnonzero(train_y == c) for c in y])
    assert visual_agreement(train_features, train_y, query_features, y, same_class) == pytest.approx(0.0, abs=1e-6)
    farthest = torch.cdist(query, train).topk(4).indices.numpy()
    assert visual_agreement(train_features, train_y, query_features, y, farthest) < 0


def test_hubness_counts_how_retrievals_spread_over_the_training_lesions():
    retrieved = np.array([[0, 1], [0, 2], [0, 1]])
    assert hubness(retrieved, references=5) == {"hub_share@2": 3 / 5, "hub_max@2": 3}


def test_image_features_tell_colours_apart_at_any_image_size():
    dark, pale = torch.full((1, 3, 64, 64), 40, dtype=torch.uint8), torch.full((1, 3, 128, 128), 220, dtype=torch.uint8)
    features = image_features(torch.cat([dark, F.interpolate(pale.float(), size=64).to(torch.uint8)]))
    assert features.shape == (2, 38)
    assert np.allclose(image_features(pale), features[1:], atol=1e-6)  # the side is fixed before describing
    assert features[0, :3] == pytest.approx([40 / 255] * 3, abs=1e-6) and features[1, :3] == pytest.approx(
        [220 / 255] * 3, abs=1e-6)


@pytest.mark.slow
def test_resume_is_exact_with_the_instance_term(tmp_path):
    """Killed halfway through writing last.pt of epoch 2 and resumed (epoch 2 replayed by a new process): the same
    files as an uninterrupted run."""
    from isic.demo import make_dataset
    data = make_dataset(tmp_path / "data", n_images=120, malignant_rate=0.2, size=40, seed=1)
    given = ["--data-dir", data, "--cache-dir", tmp_path / "cache", *tiny(2), "--w-instance", "0.5"]
    killed = start("-c", CHILD, "kill-in-save", 2, "-", *given, "--out", tmp_path / "killed")
    assert in_process("driver.py", *given, "--out", tmp_path / "reference") == 0  # meanwhile, on the other core
    assert finish(killed).returncode != 0
    finish(start("driver.py", "--resume", tmp_path / "killed"), check=0)
    assert_same_results(tmp_path / "killed", tmp_path / "reference")
    history = (tmp_path / "reference" / "history.csv").read_text()
    assert "train_instance" in history


def test_crossval_table_shows_each_methods_retrieval_from_metrics_json():
    import pandas as pd
    from experiments.crossval import COLUMNS, markdown, retrieval_values
    view = {"retrieval": {"mean_of_classes": {"precision_at_1": 0.7, "mean_average_precision_at_r": 0.3},
                          "visual_agreement@5": 0.4, "hub_share@5": 0.5, "hub_max@5": 9}}
    assert retrieval_values(view) == [0.7, 0.3, 0.4, 0.5, 9.0]
    assert all(np.isnan(retrieval_values({})))  # runs made before these metrics existed
    rows = [("BCE only", fold, 0.8, 0.1, *retrieval_values(view)) for fold in (1, 2)]
    rows += [("joint + instance term 0.5", fold, 0.8, 0.1, 0.7, 0.3, 0.4 + fold / 10, 0.5, 9) for fold in (1, 2)]
    text = markdown(pd.DataFrame(rows, columns=COLUMNS))
    assert "| precision@1 | MAP@R | visual agreement@5 | hub share@5 | hub max@5 | folds |" in text
    assert "| joint + instance term 0.5 | 0.700 ± 0.000 | 0.300 ± 0.000 | 0.550 ± 0.071 | 0.500 ± 0.000 | " \
           "9.000 ± 0.000 | 2 |" in text


def test_the_neighbours_table_pairs_look_with_embedding_on_each_fold(tmp_path):
    from experiments.neighbours_cv import main

    def metrics(precision_at_1, agreement):
        view = {"scorers": {"head": {"auroc": 0.8, "pauc": 0.1}},
                "retrieval": {"mean_of_classes": {"precision_at_1": precision_at_1, "mean_average_precision_at_r": 0.5},
                              "visual_agreement@5": agreement, "hub_share@5": 0.7, "hub_max@5": 9}}
        return {**view, "tta": view}
    for fold, (embedding, look) in enumerate([((0.70, 0.40), (0.72, 0.65)), ((0.80, 0.50), (0.79, 0.70))], start=1):
        for name, values in (("joint", embedding), ("look", look)):
            (tmp_path / f"fold{fold}" / name / "test").mkdir(parents=True)
            (tmp_path / f"fold{fold}" / name / "test" / "metrics.json").write_text(json.dumps(metrics(*values)))
            (tmp_path / f"fold{fold}" / name / "config.json").write_text(json.dumps({"neighbours_by": "look"}))
    assert main(["--cv-out", str(tmp_path)]) == 0  # the look folders are there: nothing is evaluated again
    text = (tmp_path / "neighbours.md").read_text()
    assert "| embedding | 0.800 ± 0.000 | 0.100 ± 0.000 | 0.750 ± 0.071 | 0.500 ± 0.000 | 0.450 ± 0.071 |" in text
    assert "| mean | +0.000 | +0.000 | +0.005 | +0.000 | +0.225 |" in text
    assert "| fold 2 | +0.000 | +0.000 | -0.010 | +0.000 | +0.200 |" in text
