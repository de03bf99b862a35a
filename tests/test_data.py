import numpy as np
import pandas as pd
import pytest
import torch

from engine.config import Settings
from conftest import METADATA, SAMPLE, needs
from dataset import eval_loader, prepare_data, train_loader
from engine.augment import BatchAugment
from isic.metadata import find_layout, load_duplicates, load_metadata
from isic.splits import leakage_groups, split_frame, write_splits
from utils import UserError


def settings(data_dir, tmp_path, **kw):
    return Settings(data_dir=str(data_dir), img_size=32, batch_size=16, workers=0, cache_dir=str(tmp_path / "cache"), **kw)


def test_kaggle_layout_loads_with_index_column(tiny_data, tmp_path):
    csv, images = find_layout(tiny_data)
    assert csv.name == "train-metadata.csv" and images == tiny_data / "train-image" / "image"
    frame = load_metadata(csv)
    assert list(frame.columns) == ["isic_id", "patient_id", "target"]
    assert len(frame) == 160 and set(frame["target"]) == {0, 1}
    data = prepare_data(settings(tiny_data, tmp_path))
    write_splits(data.frame, tmp_path / "splits.csv")
    image, target = data.dataset("train", 32)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert target.item() in (0.0, 1.0)
    saved = pd.read_csv(tmp_path / "splits.csv")
    assert list(saved.columns) == ["isic_id", "patient_id", "target", "split", "group", "split_by"]
    assert set(saved["split_by"]) == {"patient"} and (saved.groupby("group")["split"].nunique() == 1).all()


def test_cache_is_reused_and_matches_direct_decoding(tiny_data, tmp_path):
    s = settings(tiny_data, tmp_path)
    cached = prepare_data(s)
    built = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()}
    again = prepare_data(s)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()} == built  # nothing rewritten
    direct = prepare_data(settings(tiny_data, tmp_path, no_cache=True))
    a, b = cached.dataset("val", 32), direct.dataset("val", 32)
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(again.dataset("val", 32)[3][0], a[3][0])


def make_frame(n_patients=200, per_patient=3, rate=0.1, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for k in range(rng.integers(1, per_patient * 2)):
            rows.append((f"ISIC_{len(rows):07d}", f"IP_{p}", int(rng.random() < rate)))
    return pd.DataFrame(rows, columns=["isic_id", "patient_id", "target"])


def test_patient_split_proportions_stratification_and_isolation():
    frame = make_frame()
    split = split_frame(frame, "patient", 0.15, 0.10, seed=3)
    shares = split.value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.75, abs=0.04)
    assert shares["val"] == pytest.approx(0.15, abs=0.04)
    assert shares["test"] == pytest.approx(0.10, abs=0.04)
    assert (frame.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    for name in ("train", "val", "test"):
        assert frame["target"][split == name].sum() > 0


def test_split_is_reproducible_and_seed_dependent():
    frame = make_frame()
    a = split_frame(frame, "patient", seed=1)
    assert a.equals(split_frame(frame, "patient", seed=1))
    assert not a.equals(split_frame(frame, "patient", seed=2))


def test_image_split_is_plain_stratified():
    frame = make_frame(rate=0.2)
    split = split_frame(frame, "image", 0.15, 0.10, seed=0)
    for name, share in (("train", 0.75), ("val", 0.15), ("test", 0.10)):
        part = frame["target"][split == name]
        assert len(part) / len(frame) == pytest.approx(share, abs=0.01)
        assert part.mean() == pytest.approx(frame["target"].mean(), abs=0.02)


def test_duplicates_join_patients_into_one_group():
    frame = pd.DataFrame({"isic_id": ["a", "b", "c", "d"], "patient_id": ["P1", "P1", "P2", "P3"], "target": [0, 1, 0, 1]})
    groups = leakage_groups(frame, [("b", "c"), ("x", "y")])
    assert groups[0] == groups[1] == groups[2] != groups[3]


@needs(METADATA / "ISIC_2020_Training_GroundTruth.csv", METADATA / "ISIC_2020_Training_Duplicates.csv")
def test_real_metadata_split_is_leakage_free_and_balanced():
    frame = load_metadata(METADATA / "ISIC_2020_Training_GroundTruth.csv")
    pairs = load_duplicates(METADATA / "ISIC_2020_Training_Duplicates.csv")
    assert len(frame) == 33126 and frame["target"].sum() == 584 and len(pairs) == 425
    split = split_frame(frame, "patient", 0.15, 0.10, seed=42, duplicate_pairs=pairs)
    frame = frame.assign(split=split)
    for name, share in (("train", 0.75), ("val", 0.15), ("test", 0.10)):
        part = frame[frame["split"] == name]
        assert len(part) / len(frame) == pytest.approx(share, abs=0.01)
        assert part["target"].mean() == pytest.approx(frame["target"].mean(), abs=0.003)
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    where = dict(zip(frame["isic_id"], frame["split"]))
    assert all(where[a] == where[b] for a, b in pairs)
    assert split.equals(split_frame(frame, "patient", 0.15, 0.10, seed=42, duplicate_pairs=pairs))


@needs(SAMPLE / "train-metadata.csv")
def test_real_sample_loads(tmp_path):
    data = prepare_data(Settings(data_dir=str(SAMPLE), img_size=32, workers=0, cache_dir=str(tmp_path)))
    listed = pd.read_csv(SAMPLE / "train-metadata.csv")  # 740 images, 378 malignant in the development sample
    assert len(data.frame) == len(listed) and data.frame["target"].sum() == listed["target"].sum()
    assert data.frame.groupby("patient_id")["split"].nunique().max() == 1
    image, _ = data.dataset("test", 32)[0]
    assert image.shape == (3, 32, 32) and image.float().std() > 5  # a real picture, not a blank


def test_balanced_batches_and_epoch_length(tiny_data, tmp_path):
    s = settings(tiny_data, tmp_path)
    data = prepare_data(s)
    loader = train_loader(data, s, torch.device("cpu"))
    n_train = int((data.frame["split"] == "train").sum())
    assert n_train > 3 * s.batch_size
    batches = [targets for _, targets, *_ in loader]
    assert len(batches) == n_train // s.batch_size  # one epoch = the training split, not 100,000 samples
    for targets in batches:
        assert targets.sum().item() == s.batch_size // 2


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_the_global_torch_stream_alone(tiny_data, tmp_path, workers):
    """A persistent training loader drew its workers' seed in its first epoch only, from the global stream: that draw
    shifted the first epoch after a --resume against the uninterrupted run's."""
    s = settings(tiny_data, tmp_path)
    s.workers = workers
    data = prepare_data(s)
    device = torch.device("cpu")
    for loader in (train_loader(data, s, device), eval_loader(data, "val", s, device)):
        for epoch in range(2):
            before = torch.get_rng_state()
            next(iter(loader))
            assert torch.equal(torch.get_rng_state(), before), (loader.persistent_workers, epoch)


def test_odd_batch_size_is_refused(tiny_data, tmp_path):
    s = settings(tiny_data, tmp_path, )
    s.batch_size = 15
    with pytest.raises(UserError, match="even"):
        train_loader(prepare_data(s), s, torch.device("cpu"))


def test_batch_augment_keeps_shape_range_and_varies_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32).contiguous()
    y = BatchAugment()(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y[0], y[1])  # each image gets its own random transform
