"""Metadata → validated table → leakage-free split → decoded-image cache → loaders and batch augmentation."""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_metric_learning.samplers import MPerClassSampler
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from utils import UserError, atomic_path, world_size, write_csv, write_json

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work and are 2x faster than PIL here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

ID_COLUMNS = ("isic_id", "image_name")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["isic_id", "patient_id", "target", "split", "group", "split_by"]  # splits.csv

# Known layouts: (metadata CSV, image folder), relative to --data-dir.
LAYOUTS = [
    ("train-metadata.csv", "train-image/image"),                                # Kaggle "ISIC 2020 JPG 256x256 RESIZED"
    ("train.csv", "jpeg/train"),                                                # Kaggle competition download
    ("ISIC_2020_Training_GroundTruth.csv", "ISIC_2020_Training_JPEG/train"),   # official ISIC download
    ("ISIC_2020_Training_GroundTruth.csv", "train"),
]


# ---------------------------------------------------------------- metadata

def find_layout(data_dir=None, csv=None, image_dir=None) -> tuple[Path, Path]:
    """Resolve (metadata CSV, image folder) from --data-dir or from --csv and --image-dir."""
    if csv or image_dir:
        if not (csv and image_dir):
            raise UserError("--csv and --image-dir go together: give both")
        return Path(csv), Path(image_dir)
    if not data_dir:
        raise UserError("no data given: use --data-dir DIR, or --csv FILE --image-dir DIR, or --demo")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    for csv_name, images in LAYOUTS:
        if (root / csv_name).is_file():
            return root / csv_name, root / images
    expected = ", ".join(sorted({c for c, _ in LAYOUTS}))
    raise UserError(f"no metadata CSV in {root}: expected one of {expected} (or use --csv and --image-dir)")


def _bad_rows(mask: pd.Series, limit: int = 5) -> str:
    rows = [str(i + 2) for i in np.flatnonzero(mask.to_numpy())[:limit]]  # +2: header line, 1-based lines
    more = f" and {int(mask.sum()) - limit} more" if mask.sum() > limit else ""
    return ", ".join(rows) + more


def read_csv(path, what: str, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with every way a file can fail to be a CSV turned into one clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        if b"\0" in f.read(4096):
            raise UserError(f"{path} is not a CSV: it holds binary data")
    try:
        with warnings.catch_warnings():
            # With index_col=False, a row longer than the header is a warning; here it is an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, index_col=False, **kwargs)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0][:200]})") from None


def load_metadata(csv_path) -> pd.DataFrame:
    """Read and validate a metadata CSV into columns isic_id, patient_id (may be NaN), target (0/1)."""
    raw = read_csv(csv_path, "metadata CSV", dtype={"patient_id": str})
    columns = str(list(raw.columns))[:300]
    id_col = next((c for c in ID_COLUMNS if c in raw.columns), None)
    if id_col is None:
        raise UserError(f"{csv_path} has no image id column (isic_id or image_name); columns: {columns}")
    if "target" not in raw.columns:
        raise UserError(f"{csv_path} has no 'target' column; columns: {columns}")
    if raw.empty:
        raise UserError(f"{csv_path} has a header but no rows")

    ids = raw[id_col].astype(str).str.strip()
    # Ids only ever look up names listed in the image folder, but a path-like id is a sign of a wrong or hostile CSV.
    unsafe = raw[id_col].isna() | (ids == "") | ids.str.contains(r"[/\\\0]|\.\.|^[A-Za-z]:", regex=True)
    if unsafe.any():
        example = "an empty id" if raw[id_col].isna()[unsafe].iloc[0] else repr(ids[unsafe].iloc[0])
        raise UserError(f"{csv_path}: image ids must be plain file names (no paths, no '..'); see line(s) "
                        f"{_bad_rows(unsafe)}, e.g. {example}")
    dup = ids.duplicated(keep=False)
    if dup.any():
        raise UserError(f"{csv_path}: duplicate image ids on line(s) {_bad_rows(dup)}, e.g. {ids[dup].iloc[0]!r}")

    target = pd.to_numeric(raw["target"], errors="coerce")
    bad_target = target.isna() | ~target.isin([0, 1])
    if bad_target.any():
        example = raw["target"][bad_target].iloc[0]
        example = "an empty cell" if pd.isna(example) else repr(str(example))
        raise UserError(f"{csv_path}: 'target' must be 0 or 1; {example} on line(s) {_bad_rows(bad_target)}")
    patients = raw["patient_id"].astype("string").str.strip() if "patient_id" in raw.columns else pd.NA
    frame = pd.DataFrame({"isic_id": ids, "patient_id": patients, "target": target.astype(int)})
    if frame["target"].nunique() < 2:
        only = "malignant" if frame["target"].iloc[0] == 1 else "benign"
        raise UserError(f"{csv_path}: all {len(frame)} rows are {only} (target {frame['target'].iloc[0]}); "
                        f"training needs both classes")
    return frame


def locate_images(ids, image_dir) -> tuple[list, str]:
    """Map each id to <image_dir>/<id>.jpg|.jpeg|.png (or to <id> itself, if it names a file there).

    One directory listing, fast for 33k files. Returns (paths, problem): paths hold None where the image is missing,
    problem is "" or a one-line message with how many are missing and the first few.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"image folder not found: {image_dir}")
    by_name = {}
    for entry in os.scandir(image_dir):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in IMAGE_EXTENSIONS and entry.is_file():
            by_name.setdefault(stem, entry.name)
            by_name[entry.name] = entry.name
    paths = [image_dir / by_name[i] if i in by_name else None for i in ids]
    missing = [i for i, path in zip(ids, paths) if path is None]
    if not missing:
        return paths, ""
    return paths, (f"{len(missing)} of {len(paths)} images missing from {image_dir}, e.g. {', '.join(missing[:5])} "
                   f"(expected <id>.jpg, .jpeg or .png)")


def load_duplicates(path) -> list[tuple[str, str]]:
    """Pairs of image ids, from the first two columns (the official file has image_name_1, image_name_2)."""
    pairs = read_csv(path, "duplicates CSV", dtype=str)
    if pairs.shape[1] < 2:
        raise UserError(f"{path}: expected two columns of image ids (image_name_1, image_name_2)")
    pairs = pairs.iloc[:, :2].dropna().apply(lambda column: column.str.strip())
    return list(pairs.itertuples(index=False, name=None))


# ---------------------------------------------------------------- split

def leakage_groups(frame: pd.DataFrame, duplicate_pairs=()) -> np.ndarray:
    """Group label per row: images of one patient, and images listed as duplicates, share a group."""
    n = len(frame)
    position = {image_id: i for i, image_id in enumerate(frame["isic_id"])}
    rows, cols = [], []
    patients = frame["patient_id"]
    known = patients.notna().to_numpy()
    if known.any():
        codes = pd.factorize(patients[known])[0]
        members = np.flatnonzero(known)
        first_of_patient = members[np.unique(codes, return_index=True)[1]][codes]
        rows += list(members)
        cols += list(first_of_patient)
    for a, b in duplicate_pairs:
        if a in position and b in position:
            rows.append(position[a])
            cols.append(position[b])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def split_frame(frame: pd.DataFrame, split_by="patient", val_frac=0.15, test_frac=0.10, seed=42,
                duplicate_pairs=()) -> pd.Series:
    """Stratified train/val/test labels. With split_by='patient', no patient or duplicate pair spans two splits."""
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise UserError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in (0, 1) and sum below 1")
    y = frame["target"].to_numpy()
    index = np.arange(len(frame))
    val_of_rest = val_frac / (1 - test_frac)
    if split_by == "image":
        need = math.ceil(1 / min(test_frac, val_frac))
        _require_positives(y, need, "images")
        rest, test = train_test_split(index, test_size=test_frac, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=val_of_rest, stratify=y[rest], random_state=seed)
    else:
        groups = leakage_groups(frame, duplicate_pairs)
        test_folds, val_folds = round(1 / test_frac), round(1 / val_of_rest)
        _require_positives(y, max(test_folds, val_folds), "patients", groups)
        rest, test = _one_group_fold(index, y, groups, test_folds, seed)
        train, val = _one_group_fold(rest, y[rest], groups[rest], val_folds, seed)
    split = np.empty(len(frame), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    split = pd.Series(split, index=frame.index, name="split")
    _require_both_classes(frame["target"], split)
    return split


def _require_both_classes(target: pd.Series, split: pd.Series) -> None:
    for name in SPLITS:
        if target[split == name].nunique() < 2:
            raise UserError(f"the {name} split got only one class; add malignant images or change the fractions")


def _one_group_fold(index, y, groups, n_folds, seed):
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    keep, held_out = next(folds.split(index, y, groups))
    return index[keep], index[held_out]


def _require_positives(y, need: int, unit: str, groups=None) -> None:
    have = int(y.sum()) if groups is None else len(np.unique(groups[y == 1]))
    if have < need:
        raise UserError(f"only {have} malignant {unit}: a stratified train/val/test split with these fractions "
                        f"needs at least {need}")


def split_unit(frame: pd.DataFrame, split_by: str, duplicate_pairs) -> str:
    """What no two splits may share: 'patient+duplicates', 'patient', 'duplicates' or 'image' (a plain split)."""
    if split_by == "image":
        return "image"
    parts = []
    if frame["patient_id"].notna().any():
        parts.append("patient")
    if len(duplicate_pairs):
        parts.append("duplicates")
    return "+".join(parts) or "image"


def split_rows(frame: pd.DataFrame, s) -> pd.DataFrame:
    """The frame with its split, its leakage group and the split unit: the columns splits.csv records."""
    pairs = load_duplicates(s.duplicates) if s.duplicates else []
    unit = split_unit(frame, s.split_by, pairs)
    by = "image" if unit == "image" else "patient"
    split = split_frame(frame, by, s.val_frac, s.test_frac, s.seed, pairs)
    groups = np.arange(len(frame)) if unit == "image" else leakage_groups(frame, pairs)
    return frame.assign(split=split, group=groups, split_by=unit)


def write_splits(frame: pd.DataFrame, path) -> None:
    write_csv(path, frame[[c for c in SPLIT_COLUMNS if c in frame.columns]])


def read_splits(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    splits = pd.read_csv(path, dtype={"isic_id": str, "patient_id": "string"})
    if not {"isic_id", "target", "split"} <= set(splits.columns):
        raise UserError(f"{path} is not a splits.csv written by this pipeline")
    return splits


# ---------------------------------------------------------------- images

def decode(path, size: int) -> torch.Tensor:
    """Any JPEG/PNG (greyscale, RGBA, CMYK, palette) → RGB uint8 (3, size, size); shorter side resized, centre-cropped."""
    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # formats libjpeg/libpng reject; PIL knows more of them
        with Image.open(path) as pil:
            pil.load()
            image = TF.pil_to_tensor(pil.convert("RGB"))
    image = TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16
    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])


class _DecodeAll(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, decode(self.paths[i], self.size), ""
        except Exception as e:  # report, don't crash: the caller lists every bad file at once
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}".splitlines()[0]


def decode_all(paths, size: int, workers: int, out: np.ndarray | None = None, desc="decoding images"):
    """Decode every image (in parallel workers) into `out`; returns {index: error} for files that failed."""
    loader = DataLoader(_DecodeAll(paths, size), batch_size=32, num_workers=workers,
                        collate_fn=lambda batch: batch)
    errors = {}
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        for i, image, error in batch:
            if error:
                errors[i] = error
            elif out is not None:
                out[i] = image.numpy()
    return errors


def cached_images(paths, size: int, cache_dir, workers: int):
    """Memory-mapped uint8 array (N, 3, size, size) of all images, built once and reused across runs.

    The cache key covers every file's name, size and modification time, and the image size: any change rebuilds it.
    Returns (array, {index: error}) — unreadable images stay zero in the array and are listed in the errors.
    """
    key = hashlib.sha1(str(size).encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    stem = Path(cache_dir) / f"images-{size}px-{len(paths)}-{key.hexdigest()[:16]}"
    array_path, index_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not index_path.is_file():  # written last: its presence means the array is complete
        with atomic_path(array_path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
            errors = decode_all(paths, size, workers, array, desc=f"caching {len(paths)} images at {size}px")
            array.flush()
            del array
        write_json(index_path, {"n": len(paths), "size": size, "errors": {str(k): v for k, v in errors.items()}})
    errors = {int(k): v for k, v in json.loads(index_path.read_text())["errors"].items()}
    return np.load(array_path, mmap_mode="r"), errors


class ImageDataset(Dataset):
    """Rows of one split → (uint8 images (B, 3, S, S), float targets (B,)), a whole batch per fetch.

    Fetching by batch (__getitems__) turns a batch from the cache into one sorted read of the memory-mapped array
    instead of B small ones, and skips the per-image collation; use it through `image_loader`.
    """

    def __init__(self, rows, targets, paths, size: int, cache: np.ndarray | None):
        self.rows, self.targets, self.paths, self.size, self.cache = np.asarray(rows), targets, paths, size, cache

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        images, targets = self.__getitems__([i])
        return images[0], targets[0]

    def __getitems__(self, indices):
        rows = self.rows[indices]
        if self.cache is not None:
            order = np.argsort(rows)
            images = np.empty((len(rows), *self.cache.shape[1:]), dtype=np.uint8)
            images[order] = self.cache[rows[order]]
            images = torch.from_numpy(images)
        else:
            images = torch.stack([self._decode(row) for row in rows])
        return images, torch.as_tensor(np.asarray(self.targets)[indices], dtype=torch.float32)

    def _decode(self, row):
        try:
            return decode(self.paths[row], self.size)
        except Exception as e:
            raise UserError(f"cannot read image {self.paths[row]}: {e}") from None


def _whole_batch(batch):
    return batch  # ImageDataset.__getitems__ already returns a collated batch


def image_loader(dataset: ImageDataset, batch_size: int, device, workers: int, **kw) -> DataLoader:
    kw.setdefault("persistent_workers", workers > 0 and "sampler" in kw)  # training loaders live for many epochs
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_whole_batch,
                      pin_memory=device.type == "cuda", **kw)


# ---------------------------------------------------------------- the data a run uses

@dataclass
class Data:
    frame: pd.DataFrame          # isic_id, patient_id, target, split, group, split_by, row (index into paths and cache)
    paths: list
    cache: np.ndarray | None
    bad_images: dict             # isic_id -> error, for unreadable images (skipped with --skip-bad-images)
    problems: list = field(default_factory=list)  # what makes the data unusable, found by --check-data
    source: str = ""             # the metadata CSV and the image folder

    def dataset(self, split: str, size: int) -> ImageDataset:
        part = self.frame[self.frame["split"] == split]
        return ImageDataset(part["row"].to_numpy(), part["target"].to_numpy(), self.paths, size, self.cache)


def _unreadable(errors: dict, paths) -> str:
    i = min(errors)
    return (f"{len(errors)} unreadable image(s), e.g. {paths[i]} ({errors[i]}); "
            f"fix or remove them, or pass --skip-bad-images")


def read_images(ids, paths, s):
    """Decode every image into the cache (or just check them with --no-cache); refuse bad ones unless told to skip."""
    if s.no_cache:
        cache, errors = None, decode_all(paths, s.img_size, s.workers, desc="checking images")
    else:
        cache, errors = cached_images(paths, s.img_size, s.cache_dir, s.workers)
    if errors and not s.skip_bad_images:
        raise UserError(_unreadable(errors, paths))
    return cache, {ids[i]: error for i, error in sorted(errors.items())}


def load_images(frame: pd.DataFrame, image_dir, s):
    """Locate and decode the images of `frame`: (paths, cache, {isic_id: error} of skipped ones)."""
    paths, missing = locate_images(list(frame["isic_id"]), image_dir)
    if missing:
        raise UserError(missing)
    return paths, *read_images(list(frame["isic_id"]), paths, s)


def check_images(ids, paths, s) -> tuple[dict, list]:
    """--check-data --check-images: decode the images that exist, without caching them."""
    present = [i for i, path in enumerate(paths) if path is not None]
    errors = decode_all([paths[i] for i in present], s.img_size, s.workers, desc="checking images")
    errors = {present[k]: error for k, error in errors.items()}
    problems = [_unreadable(errors, paths)] if errors and not s.skip_bad_images else []
    return {ids[i]: error for i, error in sorted(errors.items())}, problems


def prepare_data(s, out_dir=None, splits_path=None) -> Data:
    """Everything a run needs from disk, checked in order of cost; the split is saved to `out_dir`/splits.csv if given.

    With `splits_path`, that saved split is reused. With s.check_data, missing and unreadable images become
    Data.problems instead of errors, and images are decoded only with s.check_images.
    """
    csv_path, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
    frame = load_metadata(csv_path)
    ids = list(frame["isic_id"])
    frame["row"] = np.arange(len(frame))  # position in `paths` and in the image cache
    paths, missing = locate_images(ids, image_dir)
    if missing and not s.check_data:
        raise UserError(missing)
    problems = [missing] if missing else []
    # The split needs only the metadata: made before decoding, its errors come in seconds, not after an hour.
    frame = _apply_saved_split(frame, read_splits(splits_path)) if splits_path is not None else split_rows(frame, s)
    cache, bad = None, {}
    if not s.check_data:
        cache, bad = read_images(ids, paths, s)
    elif s.check_images:
        bad, unreadable = check_images(ids, paths, s)
        problems += unreadable
    if bad and s.skip_bad_images:
        frame = frame[~frame["isic_id"].isin(bad)].reset_index(drop=True)
        _require_both_classes(frame["target"], frame["split"])
    if out_dir is not None and splits_path is None:
        write_splits(frame, Path(out_dir) / "splits.csv")
    return Data(frame, paths, cache, bad, problems, f"{csv_path} with images in {image_dir}")


def _apply_saved_split(frame: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    splits = splits.drop(columns=["patient_id", "target"], errors="ignore")  # the metadata's own are used
    merged = splits.merge(frame, on="isic_id", how="left", validate="one_to_one")
    missing = merged["target"].isna()
    if missing.any():
        raise UserError(f"{int(missing.sum())} ids of the saved split are not in the metadata, "
                        f"e.g. {merged['isic_id'][missing].iloc[0]}: is this the dataset the run was trained on?")
    return merged.astype({"target": int, "row": int})


# ---------------------------------------------------------------- loaders

def train_loader(data: Data, s, device) -> DataLoader:
    """Balanced batches (half benign, half malignant); one epoch = as many samples as the training split holds.

    Under torchrun each rank has its own sampler drawing 1/world_size of the epoch, its random numbers seeded per rank
    (train.seed_epoch): the sampler draws every batch at random anyway, so independent ranks sample as one process does.
    """
    dataset = data.dataset("train", s.img_size)
    per_rank = len(dataset) // world_size()
    if s.batch_size % 2 or s.batch_size < 2:
        raise UserError(f"--batch-size must be even (half benign, half malignant); got {s.batch_size}")
    if per_rank < s.batch_size:
        raise UserError(f"the training split has {len(dataset)} images, fewer than --batch-size {s.batch_size}"
                        + (f" per process times {world_size()} processes" if world_size() > 1 else ""))
    sampler = MPerClassSampler(dataset.targets, m=s.batch_size // 2, batch_size=s.batch_size,
                               length_before_new_iter=per_rank)
    return image_loader(dataset, s.batch_size, device, s.workers, sampler=sampler, drop_last=True)


def eval_loader(data: Data, split: str, s, device) -> DataLoader:
    return image_loader(data.dataset(split, s.img_size), s.eval_batch_size, device, s.workers, shuffle=False)


# ---------------------------------------------------------------- augmentation

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float in [0, 1], channels_last for faster convolutions."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


class BatchAugment(torch.nn.Module):
    """Random rotation, flip, zoom-crop and mild colour jitter, drawn per image but applied to the whole batch at once.

    torchvision's transforms draw one set of parameters per call, so per-image randomness would need a Python loop;
    one affine_grid/grid_sample over the batch does it in two kernels, on the GPU when training there.
    """

    def __init__(self, min_scale=0.75, max_shift=0.05, brightness=0.15, contrast=0.15, saturation=0.15):
        super().__init__()
        self.min_scale, self.max_shift = min_scale, max_shift
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        u = lambda *shape: torch.rand(*shape, device=dev)  # noqa: E731
        angle = u(b) * 2 * math.pi
        zoom = self.min_scale + (1 - self.min_scale) * u(b)           # <1 samples a smaller area: a zoomed-in crop
        flip = torch.where(u(b) < 0.5, -1.0, 1.0)                      # mirror; with any rotation this covers flips
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        shift = (u(b, 2) * 2 - 1) * self.max_shift
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        jitter = lambda amount: 1 + (u(b, 1, 1, 1) * 2 - 1) * amount  # noqa: E731
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * jitter(self.saturation)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * jitter(self.contrast)
        x = x * jitter(self.brightness)
        return x.clamp_(0, 1).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- report

def data_report(data: Data) -> str:
    """Counts per split and class, patients per split, the leakage check and the problems found."""
    f = data.frame
    lines = [f"data: {data.source}",
             f"images: {len(f)}  malignant: {int(f['target'].sum())} ({100 * f['target'].mean():.2f}%)  "
             f"patients: {f['patient_id'].nunique()}  split by: {f['split_by'].iloc[0] if 'split_by' in f else '?'}",
             "", f"{'split':<6} {'images':>7} {'share':>7} {'benign':>7} {'malignant':>9} {'rate':>7} {'patients':>8}"]
    for name in SPLITS:
        part = f[f["split"] == name]
        lines.append(f"{name:<6} {len(part):>7} {100 * len(part) / len(f):>6.1f}% {int((part['target'] == 0).sum()):>7} "
                     f"{int(part['target'].sum()):>9} {100 * part['target'].mean():>6.2f}% {part['patient_id'].nunique():>8}")
    lines += ["", f"patients in more than one split: {_in_several_splits(f, 'patient_id')}"]
    if "group" in f:
        shared = _in_several_splits(f, "group")
        lines.append(f"leakage groups (split by {f['split_by'].iloc[0]}): {f['group'].nunique()}, "
                     f"in more than one split: {shared}")
    if data.bad_images:
        skipped = not f["isic_id"].isin(data.bad_images).any()
        lines.append(f"unreadable images: {len(data.bad_images)}" + (" (left out of the split)" if skipped else ""))
        lines += [f"  {isic_id}: {error}" for isic_id, error in data.bad_images.items()]
    lines.append("problems: " + ("none" if not data.problems else f"{len(data.problems)}"))
    lines += [f"  {problem}" for problem in data.problems]
    return "\n".join(lines) + "\n"


def _in_several_splits(frame: pd.DataFrame, column: str) -> int:
    return int((frame.dropna(subset=[column]).groupby(column)["split"].nunique() > 1).sum())
