"""Images from disk to pixels: decode any JPEG/PNG safely, and the memory-mapped cache of a dataset's decoded images.

The cache is built once per decoder, set of files and image size, under a lock that runs sharing a cache folder wait
on, and checked for damage before every read (dataset.py serves it to the loaders)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock, Timeout
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from engine import timings
from utils import TEMP_PREFIX, TEMP_SUFFIX, UserError, atomic_path, require_free_space, write_json

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, a little faster than PIL here, with
# PIL's pixels (tests/test_decode.py).
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


# What decode() makes of a file. Cache keys carry it, so a cache written by another decoder is never opened: change
# DECODE_VERSION whenever decode() changes its pixels (v1 read large JPEGs at a DCT scale, PIL's draft; v2 reads every
# file in full, as a user of the exported model does). The libraries' versions are in it too: their decoders and
# resize kernels make the pixels.
DECODE_VERSION = 2
CROP = "shorter side resized (antialiased bilinear), centre square cropped"


def decoder_id() -> str:
    return (f"decode v{DECODE_VERSION}: full decode, {CROP}; torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}")


def decode(path, size: int) -> torch.Tensor:
    """The one decode of the pipeline: any JPEG/PNG (greyscale, RGBA, CMYK, palette, 16-bit) → RGB uint8
    (3, size, size), the file decoded in full, its shorter side resized to `size`, the centre square cropped.

    Every path reads images through it: the cache, --no-cache, predict.py, export.py's check, Grad-CAM, the
    visual-agreement features. Its first half (read_rgb) gives the pixels PIL's Image.open(path).convert("RGB") gives
    for 8-bit files (what a user of the exported model feeds it); its second half (resize_and_crop) is what the
    exported model does inside. Files that are not images, or claim more than MAX_MEGAPIXELS, raise before anything
    is decoded."""
    return resize_and_crop(read_rgb(path), size)


def read_rgb(path) -> torch.Tensor:
    """Any JPEG/PNG → RGB uint8 (3, H, W), decoded in full at its own size, refused undecoded above MAX_MEGAPIXELS.
    16-bit PNGs keep their 8 high bits."""
    refuse_huge(path)
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


def _as_list(batch):
    return batch  # a module-level function: worker processes started by spawn (macOS, Windows) must pickle it


ESTIMATE_AFTER = 300  # images decoded before the build says how long the rest will take


def decode_all(paths, size: int, workers: int, out: np.ndarray | None = None, desc="decoding images"):
    """Decode every image (in parallel workers) into `out`; returns {index: error} for files that failed.

    Says up front how many images it decodes, and after the first ESTIMATE_AFTER roughly how long all will take."""
    print(f"{desc}: {len(paths)} images with {max(workers, 1)} process(es)", flush=True)
    loader = DataLoader(_DecodeAll(paths, size), batch_size=32, num_workers=workers, collate_fn=_as_list)
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


def cached_images(paths, size: int, cache_dir, workers: int, phase: str = "data.cache"):
    """Memory-mapped uint8 array (N, 3, size, size) of all images (decode's output), built once and reused across runs.

    The cache's name holds a key of everything that makes its pixels (_cache_key): the decoder and its version, the
    image size and crop, and every file's path, size and modification time. Any change gives another name, so a
    cache built by another decoder, or of other files, is never opened (it stays on disk, unused).
    Runs sharing a cache folder (two experiments at once, torchrun processes, nodes on one network disk) build it once:
    the first takes a lock, the others wait for it and then read what it built. A cache that is truncated or damaged is
    rebuilt, never read as images. Returns (array, {index: error}) — unreadable images stay zero in the array and are
    listed in the errors.
    """
    with timings.phase(phase, note=f"reused: {len(paths)} images") as timed:
        stem = Path(cache_dir) / f"images-{size}px-{len(paths)}-{_cache_key(paths, size)}"
        array_path, index_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
        problem = _cache_problem(array_path, index_path, len(paths), size)
        if problem:
            if problem != "absent":
                print(f"image cache {array_path} is {problem}: rebuilding it", flush=True)
            with _cache_lock(stem.with_suffix(".lock")):
                if _cache_problem(array_path, index_path, len(paths), size):  # else another process built it meanwhile
                    _remove_interrupted_builds(array_path, index_path)
                    started = time.perf_counter()
                    _build_cache(array_path, index_path, paths, size, workers)
                    rate = len(paths) / (time.perf_counter() - started)
                    timed.note = f"built: {len(paths)} images, {rate:.0f} images/s, {max(workers, 1)} process(es)"
    errors = {int(k): v for k, v in json.loads(index_path.read_text())["errors"].items()}
    return np.load(array_path, mmap_mode="r"), errors


def _cache_key(paths, size: int) -> str:
    """A hash of what makes the cached pixels: decoder_id (decoder, its version, the crop rule, library versions), the
    size, and each file's absolute path, byte size and modification time (nanoseconds). A file replaced by another of
    the same byte size and modification time is not noticed: reading every file's bytes at every start would cost
    as much as decoding them."""
    key = hashlib.sha1(f"{decoder_id()}\n{size}px\n".encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]


def _remove_interrupted_builds(array_path: Path, index_path: Path) -> None:
    """Delete the temporaries a killed build of this very cache left behind (called under its lock: no live build of
    this key can be writing them)."""
    stale = [p for target in (array_path, index_path)
             for p in target.parent.glob(f"{TEMP_PREFIX}{target.name}.*{TEMP_SUFFIX}")]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted build of {array_path.name}", flush=True)


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
    if index.get("decoder") != decoder_id():  # the key holds it: this catches only a renamed or copied file
        return f"built by another decoder ({index.get('decoder', 'unrecorded')})"
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
    write_json(index_path, {"decoder": decoder_id(), "n": len(paths), "size": size, "bytes": array_path.stat().st_size,
                            "errors": {str(k): v for k, v in errors.items()}})
