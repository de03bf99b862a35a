"""The data a run reads: metadata, split and decoded images (isic/image_cache.py) as datasets and loaders."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from engine import timings
from engine.distributed import world_size
from isic.image_cache import cached_images, decode, decode_all
from isic.metadata import find_layout, join_columns, load_metadata, locate_images, pair_label_codes
from isic.splits import SPLITS, apply_saved_split, read_splits, require_both_classes, split_rows
from utils import UserError


class ImageDataset(Dataset):
    """Rows of one split → (uint8 images (B, 3, S, S), float targets (B,), int64 pair labels (B,), float metadata
    (B, F)), a whole batch per fetch. Pair labels are what the contrastive term pairs by: the targets unless given
    (e.g. diagnosis codes). Metadata are the encoded patient features (isic/tabular.py), F = 0 without --metadata, so every
    batch has the same four parts. One item, dataset[i], is (image, target).

    Fetching by batch (__getitems__) turns a batch from the cache into one sorted read of the memory-mapped array
    instead of B small ones, and skips the per-image collation; use it through `image_loader`. With `resident` (the
    whole cache as a tensor in the device's memory, Data.resident), image_loader draws the batches from there instead.
    """

    def __init__(self, rows, targets, paths, size: int, cache: np.ndarray | None, pair_labels=None, metadata=None,
                 resident: torch.Tensor | None = None):
        self.rows, self.targets, self.paths, self.size, self.cache = np.asarray(rows), targets, paths, size, cache
        self.pair_labels = np.asarray(targets if pair_labels is None else pair_labels)
        self.metadata = np.zeros((len(self.rows), 0), np.float32) if metadata is None else np.asarray(metadata)
        self.resident = resident

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        images, targets, *_ = self.__getitems__([i])
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
        return images, *self.labels(indices)

    def labels(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, pair labels, metadata) of the items at `indices`: the three small parts of a batch."""
        return (torch.as_tensor(np.asarray(self.targets)[indices], dtype=torch.float32),
                torch.as_tensor(self.pair_labels[indices], dtype=torch.int64),
                torch.as_tensor(self.metadata[indices], dtype=torch.float32))

    def _decode(self, row):
        try:
            return decode(self.paths[row], self.size)
        except Exception as e:
            raise UserError(f"cannot read image {self.paths[row]}: {e}") from None


def _whole_batch(batch):
    return batch  # ImageDataset.__getitems__ already returns a collated batch


def image_loader(dataset: ImageDataset, batch_size: int, device, workers: int, **kw):
    """A loader that never draws from the global torch random generator: a ResidentLoader when the dataset's images
    are held in the device's memory, else a DataLoader (both give the same batches in the same order).

    Every new iterator draws a base seed for its workers, from the loader's `generator` or else from the global one.
    A persistent loader draws it only when first iterated: in epoch 1 of an uninterrupted run but in the first epoch
    after a --resume, whose augmentations then came one draw later in the stream than the uninterrupted run's. With
    a generator of its own, every epoch's global stream belongs to train.seed_epoch and the training step alone, with
    any number of workers (the workers themselves draw no random numbers: ImageDataset is deterministic).
    """
    if dataset.resident is not None:
        return ResidentLoader(dataset, batch_size, device, kw.get("sampler"), kw.get("shuffle", False),
                              kw.get("drop_last", False))
    kw.setdefault("persistent_workers", workers > 0 and "sampler" in kw)  # training loaders live for many epochs
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_whole_batch,
                      pin_memory=device.type == "cuda", generator=torch.Generator(), **kw)


class ResidentLoader:
    """The batches a DataLoader with the same sampler would give, gathered by index from images in the device's memory:
    no worker processes, no pinning, no copies from the host. Batches come on `device` (a no-op when the images are
    there already)."""

    def __init__(self, dataset: ImageDataset, batch_size: int, device, sampler=None, shuffle=False, drop_last=False):
        if sampler is None:  # what DataLoader makes of shuffle=..., with a generator of its own (see image_loader)
            sampler = RandomSampler(dataset, generator=torch.Generator()) if shuffle else SequentialSampler(dataset)
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.images = dataset.resident
        self.parts = [t.to(self.images.device) for t in dataset.labels(np.arange(len(dataset)))]
        self.rows = torch.tensor(dataset.rows, device=self.images.device)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        batches = list(self.batch_sampler)  # the epoch's whole draw, made when a DataLoader would make it
        order = torch.as_tensor([i for batch in batches for i in batch], device=self.images.device)  # one copy
        start = 0
        for batch in batches:
            index = order[start:start + len(batch)]
            start += len(batch)
            yield tuple(t.to(self.device)
                        for t in (self.images[self.rows[index]], *(part[index] for part in self.parts)))


RESIDENT_SHARE = 0.5  # at most this share of the GPU's free memory goes to the images; the rest is for training
RESIDENT_CHUNK = 1024  # images copied at a time


def hold_on_device(data: "Data", choice: str, device) -> "Data":
    """The image cache copied into the device's memory (Data.resident) when `choice` is "on", or "auto" on a GPU whose
    free memory holds it RESIDENT_SHARE times over; `data` as it was otherwise. Copied in chunks, so that the host
    never holds a second copy of the whole cache."""
    if choice == "off" or choice == "auto" and device.type != "cuda":
        return data
    if data.cache is None:
        if choice == "on":
            raise UserError("--resident on holds the image cache in the device's memory: drop --no-cache")
        return data
    needed = data.cache.nbytes
    if choice == "auto":
        free = torch.cuda.mem_get_info(device)[0]
        if needed > RESIDENT_SHARE * free:
            print(f"images stay on the host: {needed / 2**30:.1f} GiB is more than {RESIDENT_SHARE:.0%} of the "
                  f"{free / 2**30:.1f} GiB free on {device}", flush=True)
            return data
    with timings.phase("data.resident", note=f"{needed / 2**30:.2f} GiB"):
        resident = torch.empty(data.cache.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(resident), RESIDENT_CHUNK):
            chunk = slice(start, start + RESIDENT_CHUNK)
            resident[chunk] = torch.from_numpy(np.array(data.cache[chunk]))
    print(f"images held in {device} memory: {needed / 2**30:.2f} GiB", flush=True)
    return dataclasses.replace(data, resident=resident)


# ---------------------------------------------------------------- the data a run uses

@dataclass
class Data:
    frame: pd.DataFrame          # isic_id, patient_id, target, pair_label, split, group, split_by, row (index into
                                 # paths and cache), + joined columns (metadata.join_columns) when asked for
    paths: list
    cache: np.ndarray | None
    bad_images: dict             # isic_id -> error, for unreadable images (skipped with --skip-bad-images)
    problems: list = field(default_factory=list)  # what makes the data unusable, found by --check-data
    source: str = ""             # the metadata CSV and the image folder
    metadata: np.ndarray | None = None  # encoded patient features (isic/tabular.py) per row of `frame`, with --metadata
    resident: torch.Tensor | None = None  # the cache in the device's memory (hold_on_device), or None

    def dataset(self, split: str, size: int) -> ImageDataset:
        chosen = (self.frame["split"] == split).to_numpy()
        part = self.frame[chosen]
        return ImageDataset(part["row"].to_numpy(), part["target"].to_numpy(), self.paths, size, self.cache,
                            part["pair_label"].to_numpy() if "pair_label" in part else None,
                            None if self.metadata is None else self.metadata[chosen], self.resident)


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
    if errors:
        print(_skipped(errors, paths), flush=True)
    return cache, {ids[i]: error for i, error in sorted(errors.items())}


def _skipped(errors: dict, paths, shown: int = 10) -> str:
    """--skip-bad-images: name what was left out (data_report.txt lists every one for a run)."""
    named = [f"  {paths[i]}: {error}" for i, error in sorted(errors.items())[:shown]]
    more = [f"  ... and {len(errors) - shown} more"] if len(errors) > shown else []
    return "\n".join([f"skipping {len(errors)} unreadable image(s):", *named, *more])


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


def prepare_data(s, splits_path=None) -> Data:
    """Everything a run needs from disk, checked in order of cost.

    With `splits_path`, that saved split is reused. With s.check_data, missing and unreadable images become
    Data.problems instead of errors, and images are decoded only with s.check_images.
    """
    with timings.phase("data.metadata") as timed:
        csv_path, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
        frame = load_metadata(csv_path)
        if s.extra_csv or s.pair_labels != "target" or s.metadata:
            frame = join_columns(frame, csv_path, s.extra_csv)
        source = f"{csv_path}" + (f" + {s.extra_csv}" if s.extra_csv else "")
        frame["pair_label"] = pair_label_codes(frame, s.pair_labels, source)  # what the contrastive term pairs by
        ids = list(frame["isic_id"])
        frame["row"] = np.arange(len(frame))  # position in `paths` and in the image cache
        paths, missing = locate_images(ids, image_dir)
        timed.note = f"{len(frame)} rows"
    if missing and not s.check_data:
        raise UserError(missing)
    problems = [missing] if missing else []
    # The split needs only the metadata: made before decoding, its errors come in seconds, not after an hour.
    with timings.phase("data.split"):
        frame = apply_saved_split(frame, read_splits(splits_path)) if splits_path is not None else split_rows(frame, s)
    cache, bad = None, {}
    if not s.check_data:
        cache, bad = read_images(ids, paths, s)
    elif s.check_images:
        bad, unreadable = check_images(ids, paths, s)
        problems += unreadable
    if bad and s.skip_bad_images:
        frame = frame[~frame["isic_id"].isin(bad)].reset_index(drop=True)
        require_both_classes(frame["target"], frame["split"])
    return Data(frame, paths, cache, bad, problems, f"{csv_path} with images in {image_dir}")


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
