"""Issue #14: what the contrastive term does (pair statistics), and the variants that give it a fairer chance
(cross-batch memory, pair miner, diagnosis pairs, --extra-csv), with crossval's paired differences."""
import inspect
import math

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import driver
from engine.checkpoints import load_checkpoint
from engine.config import Settings
import train
from conftest import tiny
from dataset import prepare_data
from engine.losses import JointLoss, epoch_pair_stats
from experiments.crossval import markdown, paired_differences
from isic.metadata import join_columns, pair_label_codes
from utils import UserError


def two_tight_classes(distance=0.5):
    """Benign pair at one point, malignant pair at another, `distance` apart once L2-normalised."""
    angle = 2 * math.asin(distance / 2)  # chord length of unit vectors at this angle
    a, b = [1.0, 0.0], [math.cos(angle), math.sin(angle)]
    return torch.tensor([a, a, b, b]), torch.tensor([0, 0, 1, 1])


def test_pair_stats_of_a_hand_made_batch():
    """Positives at distance 0 cost nothing (inactive); negatives at 0.5 < margin 1 all cost 0.5 (active)."""
    embeddings, y = two_tight_classes(0.5)
    loss, bce, contrastive, stats, _ = JointLoss(w_bce=0.0)(embeddings, torch.zeros(4), y)
    epoch = epoch_pair_stats(stats)
    assert stats[0] == 4 and stats[3] == 8  # ordered pairs: 2 positive per class, 2 x 2 x 2 negative
    assert epoch["train_pos_active"] == 0.0 and epoch["train_neg_active"] == 1.0
    assert epoch["train_pos_distance"] == pytest.approx(0.0, abs=1e-3)
    assert epoch["train_neg_distance"] == pytest.approx(0.5, abs=1e-6)
    assert contrastive.item() == pytest.approx(0.5, abs=1e-6)  # AvgNonZero: the empty positive side adds 0
    # Summed over two batches the epoch's figures weigh every pair once.
    far, _ = two_tight_classes(1.5)
    both = stats + JointLoss()(far, torch.zeros(4), y)[3]
    assert epoch_pair_stats(both)["train_neg_active"] == 0.5
    assert epoch_pair_stats(both)["train_neg_distance"] == pytest.approx(1.0, abs=1e-5)


def test_loss_with_stats_equals_the_plain_library_loss_bit_for_bit():
    torch.manual_seed(0)
    embeddings, logits, y = torch.randn(16, 8, requires_grad=True), torch.randn(16), torch.tensor([0, 1] * 8)
    loss, bce, contrastive, *_ = JointLoss(w_bce=0.7, w_cl=1.3)(embeddings, logits, y)
    expected_cl = ContrastiveLoss(pos_margin=0, neg_margin=1, distance=LpDistance(p=2))(embeddings, y)
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    assert torch.equal(contrastive, expected_cl.detach()) and torch.equal(bce, expected_bce)
    assert torch.equal(loss, 0.7 * expected_bce + 1.3 * expected_cl)


def test_cross_batch_memory_fills_and_travels_in_the_state_dict(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 8, requires_grad=True), torch.tensor([0, 0, 1, 1])) for _ in range(4)]
    loss_fn = JointLoss(memory_size=8, embedding_dim=8)
    for embeddings, y in batches[:3]:
        loss_fn(embeddings, torch.zeros(4), y)
    memory = loss_fn.memory
    assert memory.has_been_filled and memory.queue_idx == 4  # 12 embeddings through a memory of 8
    assert torch.equal(memory.embedding_memory[:4], batches[2][0].detach())
    torch.save(loss_fn.state_dict(), tmp_path / "loss.pt")
    restored = JointLoss(memory_size=8, embedding_dim=8)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    fresh = JointLoss(memory_size=8, embedding_dim=8)
    embeddings, y = batches[3]
    expected = loss_fn(embeddings, torch.zeros(4), y)[2]
    assert torch.equal(restored(embeddings, torch.zeros(4), y)[2], expected)
    assert not torch.equal(fresh(embeddings, torch.zeros(4), y)[2], expected)  # the memory matters
    # Validation (no gradient) neither reads nor fills the memory.
    with torch.inference_mode():
        plain = JointLoss()(embeddings.detach(), torch.zeros(4), y)[2]
        assert torch.equal(loss_fn(embeddings.detach(), torch.zeros(4), y)[2], plain)
    assert loss_fn.memory.queue_idx == 0


@pytest.mark.parametrize("miner", ["multisimilarity", "batchhard"])
def test_miner_keeps_fewer_pairs(miner):
    torch.manual_seed(0)
    embeddings, y = torch.randn(16, 8), torch.tensor([0, 1] * 8)
    loss_fn = JointLoss(miner=miner)
    mined = lmu.convert_to_pairs(loss_fn.miner(embeddings, y), y)
    every = lmu.get_all_pairs_indices(y)
    assert 0 < len(mined[0]) < len(every[0]) and 0 < len(mined[2]) < len(every[2])
    expected = loss_fn.contrastive(embeddings, y, mined)
    assert loss_fn(embeddings.requires_grad_(), torch.zeros(16), y)[2].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("miner", ["multisimilarity", "batchhard"])
@pytest.mark.parametrize("normalize", [True, False])
def test_miner_measures_the_losss_distance(miner, normalize):
    torch.manual_seed(0)
    embeddings = torch.randn(8, 4) * torch.arange(1, 9)[:, None]  # lengths differ: raw and normalised L2 disagree
    loss_fn = JointLoss(miner=miner, normalize_embeddings=normalize)
    assert torch.equal(loss_fn.miner.distance(embeddings), loss_fn.contrastive.distance(embeddings))


def test_batch_hard_miner_picks_the_farthest_positive_by_raw_distance():
    # Anchor 0's positives: 1 lies in its direction but 9 away, 2 at a right angle but only 1.4 away.
    embeddings, y = torch.tensor([[1.0, 0], [10, 0], [0, 1], [1.2, 0.2]]), torch.tensor([0, 0, 0, 1])
    anchors, positives, _ = JointLoss(miner="batchhard", normalize_embeddings=False).miner(embeddings, y)
    assert positives[anchors == 0].tolist() == [1]


def test_diagnosis_pair_labels_make_same_diagnosis_pairs_positive():
    frame = pd.DataFrame({"target": [0, 0, 0, 1, 0], "diagnosis": ["nevus", "unknown", "nevus", "melanoma", None]})
    codes = pair_label_codes(frame, "diagnosis")
    assert codes[0] == codes[2] and codes[1] == codes[4] and len(set(codes)) == 3  # empty = unknown
    assert list(pair_label_codes(frame, "target")) == [0, 0, 0, 1, 0]
    with pytest.raises(UserError, match="'diagnosis' column"):
        pair_label_codes(frame.drop(columns="diagnosis"), "diagnosis")
    # Two benign lesions of different diagnoses become a negative pair; the BCE term keeps the binary target.
    embeddings, y = torch.randn(4, 8), torch.tensor([0, 0, 1, 1])
    by_target = JointLoss()(embeddings, torch.zeros(4), y)
    by_diagnosis = JointLoss()(embeddings, torch.zeros(4), y, torch.tensor([5, 7, 2, 2]))
    assert by_target[3][[0, 3]].tolist() == [4, 8] and by_diagnosis[3][[0, 3]].tolist() == [2, 10]
    assert torch.equal(by_target[1], by_diagnosis[1])


def write(path, text):
    path.write_text(text)
    return path


def test_extra_csv_joins_by_image_id_and_refuses_images_it_lacks(tmp_path):
    metadata = write(tmp_path / "meta.csv", ",isic_id,patient_id,target\n0,A,p1,0\n1,B,p2,1\n2,C,p2,0\n")
    frame = pd.DataFrame({"isic_id": ["A", "B", "C"], "patient_id": ["p1", "p2", "p2"], "target": [0, 1, 0]})
    extra = write(tmp_path / "gt.csv", "image_name,patient_id,diagnosis,age_approx,target\n"
                  "Z,p9,nevus,30,0\nC,px,unknown,,0\nB,px,melanoma,70,1\nA,px,nevus,45,0\n")
    joined = join_columns(frame, metadata, extra)
    assert list(joined.columns) == ["isic_id", "patient_id", "target", "diagnosis", "age_approx"]
    assert list(joined["diagnosis"]) == ["nevus", "melanoma", "unknown"]
    assert list(joined["patient_id"]) == ["p1", "p2", "p2"]  # the metadata's own columns stay
    assert list(joined["age_approx"].fillna("?")) == ["45", "70", "?"]
    lacking = write(tmp_path / "short.csv", "isic_id,diagnosis\nA,nevus\nC,nevus\n")
    with pytest.raises(UserError, match=r"short.csv: 1 of 3 images have no row there \(joined by isic_id\), e.g. B"):
        join_columns(frame, metadata, lacking)


def test_loader_yields_diagnosis_pair_labels_from_extra_csv(tiny_data, tmp_path):
    ids = pd.read_csv(tiny_data / "train-metadata.csv")["isic_id"]
    names = np.array(["nevus", "lentigo", "unknown"])[np.arange(len(ids)) % 3]
    extra = tmp_path / "diagnosis.csv"
    pd.DataFrame({"image_name": ids, "diagnosis": names}).to_csv(extra, index=False)
    s = Settings(data_dir=str(tiny_data), img_size=32, batch_size=16, workers=0, cache_dir=str(tmp_path / "cache"),
                 extra_csv=str(extra), pair_labels="diagnosis")
    data = prepare_data(s)
    train_rows = data.frame[data.frame["split"] == "train"]
    _, targets, pair_labels, _ = data.dataset("train", 32).__getitems__(np.arange(6))
    expected = np.searchsorted(["lentigo", "nevus", "unknown"], train_rows["diagnosis"].to_numpy()[:6])
    assert pair_labels.tolist() == expected.tolist() and pair_labels.dtype == torch.int64
    assert targets.tolist() == train_rows["target"].to_numpy()[:6].tolist()


def test_paired_differences_of_a_hand_made_table():
    table = pd.DataFrame([("BCE only", 1, 0.80, 0.10), ("BCE only", 2, 0.70, 0.05),
                          ("joint", 1, 0.85, 0.12), ("joint", 2, 0.65, 0.06)],
                         columns=["method", "fold", "auroc", "pauc"])
    paired = paired_differences(table)
    assert paired["auroc_minus_bce"].tolist()[2:] == pytest.approx([0.05, -0.05])
    assert paired["pauc_minus_bce"].tolist()[2:] == pytest.approx([0.02, 0.01])
    assert paired["auroc_minus_bce"][:2].isna().all()
    text = markdown(table)
    assert "| joint | +0.000 ± 0.071 | + − | +0.0150 ± 0.0071 | + + | 2 |" in text


@pytest.mark.slow
def test_resume_restores_the_memory_and_replays_exactly(tiny_data, tmp_path, monkeypatch):
    flags = ["--data-dir", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), *tiny(2), "--xbm", "32",
             "--miner", "multisimilarity"]
    assert driver.main([*flags, "--out", str(tmp_path / "reference")]) == 0
    real_epoch = train.train_one_epoch

    def stop_before_epoch_2(*args, **kwargs):
        if inspect.signature(real_epoch).bind(*args, **kwargs).arguments["epoch"] == 2:
            raise train.Interrupted("SIGTERM")
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train, "train_one_epoch", stop_before_epoch_2)
    out = tmp_path / "resumed"
    assert driver.main([*flags, "--out", str(out)]) == 2
    memory = load_checkpoint(out / "last.pt")["loss"]
    assert memory["memory._extra_state"]["has_been_filled"] and memory["memory.embedding_memory"].abs().sum() > 0
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    assert driver.main(["--resume", str(out)]) == 0
    got, want = (pd.read_csv(run / "history.csv").drop(columns="seconds") for run in (out, tmp_path / "reference"))
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6)
