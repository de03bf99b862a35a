"""Images from disk to pixels: decode any JPEG/PNG safely, and the memory-mapped cache of a dataset's decoded images.

The cache is built once per set of files and image size, under a lock that runs sharing a cache folder wait on, and
checked for damage before every read (dataset.py serves it to the loaders)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from engine import timings
from utils import UserError, atomic_path, require_free_space, write_json

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work and are 2x faster than PIL here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


# Largest image decoded: 100 megapixels (10,000 x 10,000; ISIC 2020's largest originals are 6000 x 4000 = 24 MP).
# A decompression bomb, a few-kilobyte file whose header claims 40,000 x 40,000 pixels, would need 4.8 GB once decoded.
MAX_MEGAPIXELS = 100


@contextlib.contextmanager
def open_header(path):
    """The image opened lazily (header read, no pixels decoded), refused when above MAX_MEGAPIXELS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL warns above 89 MP; the limit is ours
        try:
            pil = Image.open(path)
        except Image.DecompressionBombError as e:  # PIL's own refusal, above twice its 89-megapixel default
            raise ValueError(f"{str(e).rstrip('.')}; refused undecoded (limit {MAX_MEGAPIXELS} megapixels)") from None
    with pil:
        width, height = pil.size
        if width * height > MAX_MEGAPIXELS * 1_000_000:
            raise ValueError(f"its header claims {width}x{height} pixels ({width * height / 1e6:,.0f} megapixels), "
                             f"above the {MAX_MEGAPIXELS}-megapixel limit: refused undecoded (a possible "
                             "decompression bomb)")
        yield pil


def refuse_huge(path) -> None:
    """Read only the header's dimensions and refuse an image above MAX_MEGAPIXELS."""
    with open_header(path):
        pass


def dct_scale(pil: Image.Image, size: int) -> int:
    """How many times smaller a JPEG can be decoded (1, 2, 4 or 8, in the DCT domain) with both sides still at
    least `size`; 1 for every other format."""
    if pil.format != "JPEG":
        return 1
    fits = min(pil.size) // size
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def decode(path, size: int) -> torch.Tensor:
    """Any JPEG/PNG (greyscale, RGBA, CMYK, palette) → RGB uint8 (3, size, size); shorter side resized, centre-cropped.

    A JPEG at least twice `size` on its shorter side is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT,
    PIL's draft): the smallest scale still at least `size`, then resized as every other image. At 6000 x 4000 to 256 px
    that reads 1/8 of the pixels, several times faster, within a fraction of a grey level of the full decode
    (docs/scale.md). Files that are not images, or claim more than MAX_MEGAPIXELS, raise before anything is decoded."""
    return resize_and_crop(read_rgb(path, draft_for=size), size)


def read_rgb(path, draft_for: int | None = None) -> torch.Tensor:
    """Any JPEG/PNG → RGB uint8 (3, H, W) at its own size, refused undecoded above MAX_MEGAPIXELS. With `draft_for`,
    a large JPEG is decoded at the smallest DCT scale whose sides are still at least `draft_for`."""
    with open_header(path) as pil:
        if draft_for and dct_scale(pil, draft_for) > 1:
            pil.draft("RGB", (draft_for, draft_for))  # picks the same scale as dct_scale
            return TF.pil_to_tensor(pil.convert("RGB"))
    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # formats libjpeg/libpng reject; PIL knows more of them
        with Image.open(path) as pil:
            pil.load()
            image = TF.pil_to_tensor(pil.convert("RGB"))
    return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16


def resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W) → (..., size, size): the shorter side resized to `size` (antialiased bilinear), the centre
    square cropped. export.py reproduces this geometry inside the exported model."""
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


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


ESTIMATE_AFTER = 300  # images decoded before the build says how long the rest will take


def decode_all(paths, size: int, workers: int, out: np.ndarray | None = None, desc="decoding images"):
    """Decode every image (in parallel workers) into `out`; returns {index: error} for files that failed.

    Says up front how many images it decodes, and after the first ESTIMATE_AFTER roughly how long all will take."""
    print(f"{desc}: {len(paths)} images with {max(workers, 1)} process(es)", flush=True)
    loader = DataLoader(_DecodeAll(paths, size), batch_size=32, num_workers=workers,
                        collate_fn=lambda batch: batch)
    errors, done, started = {}, 0, time.perf_counter()
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=None) as bar:
        for batch in loader:
            for i, image, error in batch:
                if error:
                    errors[i] = error
                elif out is not None:
                    out[i] = image.numpy()
            bar.update(len(batch))
            done, before = done + len(batch), done
            if before < ESTIMATE_AFTER <= done < len(paths):
                bar.write(estimate_line(done, len(paths), time.perf_counter() - started))
    return errors


def estimate_line(done: int, total: int, seconds: float) -> str:
    rate = done / max(seconds, 1e-9)
    left = (total - done) / rate
    when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f"{rate:.0f} images/s over the first {done}: about {when} more for the other {total - done}"


def cached_images(paths, size: int, cache_dir, workers: int):
    """Memory-mapped uint8 array (N, 3, size, size) of all images, built once and reused across runs.

    The cache key covers every file's name, size and modification time, and the image size: any change rebuilds it.
    Runs sharing a cache folder (two experiments at once, torchrun processes, nodes on one network disk) build it once:
    the first takes a lock, the others wait for it and then read what it built. A cache that is truncated or damaged is
    rebuilt, never read as images. Returns (array, {index: error}) — unreadable images stay zero in the array and are
    listed in the errors.
    """
    with timings.phase("data.cache", note=f"reused: {len(paths)} images") as timed:
        stem = Path(cache_dir) / f"images-{size}px-{len(paths)}-{_cache_key(paths, size)}"
        array_path, index_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
        problem = _cache_problem(array_path, index_path, len(paths), size)
        if problem:
            if problem != "absent":
                print(f"image cache {array_path} is {problem}: rebuilding it", flush=True)
            with _cache_lock(stem.with_suffix(".lock")):
                if _cache_problem(array_path, index_path, len(paths), size):  # else another process built it meanwhile
                    started = time.perf_counter()
                    _build_cache(array_path, index_path, paths, size, workers)
                    rate = len(paths) / (time.perf_counter() - started)
                    timed.note = f"built: {len(paths)} images, {rate:.0f} images/s, {max(workers, 1)} process(es)"
    errors = {int(k): v for k, v in json.loads(index_path.read_text())["errors"].items()}
    return np.load(array_path, mmap_mode="r"), errors


def _cache_key(paths, size: int) -> str:
    key = hashlib.sha1(str(size).encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]


def _cache_problem(array_path: Path, index_path: Path, n: int, size: int) -> str | None:
    """Why the cache cannot be read ("absent", or what is damaged), or None when it is whole.

    The index is written last, after the array was renamed into place: without it the array may be half-built. With
    it, the array's header must give the expected shape and the file must be exactly as long as header and images
    (recorded in the index too): a truncated or overwritten file fails here. (A full checksum would read the whole
    cache, gigabytes, at every start.)"""
    if not index_path.is_file():
        return "absent"
    try:
        index = json.loads(index_path.read_text())
        array = np.load(array_path, mmap_mode="r")
        length = array_path.stat().st_size
    except (OSError, ValueError) as e:  # missing, unreadable, a header numpy rejects, shorter than its header says
        return f"damaged ({type(e).__name__}: {str(e)[:120]})"
    expected = array.offset + array.nbytes
    index = index if isinstance(index, dict) else {}
    if array.shape != (n, 3, size, size) or array.dtype != np.uint8 or length != index.get("bytes", expected) \
            or length != expected or not isinstance(index.get("errors"), dict):
        return f"damaged ({length:,} bytes of shape {array.shape}; expected {expected:,} of {(n, 3, size, size)})"
    return None


@contextlib.contextmanager
def _cache_lock(path: Path):
    """Hold `path` locked (filelock: an OS lock released even if this process is killed); say so when waiting."""
    lock = FileLock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process to finish the image cache (lock {path})", flush=True)
            lock.acquire()
    except OSError as e:  # a read-only or missing cache folder
        raise UserError(f"cannot build the image cache in {path.parent}: {e.strerror or e}; pass --cache-dir with a "
                        f"writable folder, or --no-cache") from None
    try:
        yield
    finally:
        lock.release()


def _build_cache(array_path: Path, index_path: Path, paths, size: int, workers: int) -> None:
    shape = (len(paths), 3, size, size)
    require_free_space(array_path.parent, int(np.prod(shape)), "the image cache")
    with atomic_path(array_path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        errors = decode_all(paths, size, workers, array, desc=f"caching images at {size}px")
        array.flush()
        del array
    write_json(index_path, {"n": len(paths), "size": size, "bytes": array_path.stat().st_size,
                            "errors": {str(k): v for k, v in errors.items()}})
