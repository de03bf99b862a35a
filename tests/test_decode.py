"""One decode everywhere (image_cache.decode: the file decoded in full, then resized and cropped), and an image cache
that is never read when another decoder, or a killed build, made what lies on disk."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import ROOT, SAMPLE, needs
from dataset import ImageDataset
from engine.config import Settings
from experiments.scale_check import distinct_image
from isic import image_cache
from isic.image_cache import cached_images, decode, read_rgb, resize_and_crop
from scoring.visual_similarity import FEATURE_SIDE, dataset_features


def as_pil_reads(path) -> torch.Tensor:
    """What a user of the exported model feeds it: the file decoded in full by PIL."""
    with Image.open(path) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)


def another_decoder(path, size: int) -> torch.Tensor:
    """Pixels of a decoder other than image_cache.decode, today's or an earlier one: resized without antialiasing."""
    image = read_rgb(path)
    side = min(image.shape[-2:])
    return resize_and_crop(TF.resize(image, [image.shape[-2] * size // side, image.shape[-1] * size // side],
                                     antialias=False), size)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(3)
    paths = [folder / f"ISIC_{i:07d}.jpg" for i in range(4)]
    for i, path in enumerate(paths):
        distinct_image(rng, i % 2 == 1, (640, 480) if i % 2 else (480, 640)).save(path, quality=90)
    return paths


@pytest.fixture(scope="module")
def every_format(tmp_path_factory, large_jpegs):
    folder = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(0)
    photo = Image.open(large_jpegs[0]).convert("RGB")
    small = Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8))
    files = {"large.jpg": photo, "small.jpg": small, "cmyk.jpg": photo.convert("CMYK"), "grey.jpg": photo.convert("L"),
             "large.png": photo, "palette.png": photo.convert("P"), "rgba.png": photo.convert("RGBA")}
    for name, image in files.items():
        image.save(folder / name, quality=90) if name.endswith(".jpg") else image.save(folder / name)
    return [folder / name for name in files]


@pytest.mark.parametrize("size", [32, 64, 200])
def test_decode_is_pils_full_decode_resized_and_cropped(every_format, size):
    for path in every_format:
        assert torch.equal(read_rgb(path), as_pil_reads(path)), path.name
        assert torch.equal(decode(path, size), resize_and_crop(as_pil_reads(path), size)), path.name


def test_a_png_copy_of_a_jpeg_decodes_to_the_same_pixels(large_jpegs, tmp_path):
    copy = tmp_path / "copy.png"
    Image.open(large_jpegs[1]).save(copy)
    for size in (32, 64):
        assert torch.equal(decode(copy, size), decode(large_jpegs[1], size))


@needs(SAMPLE)
@pytest.mark.parametrize("size", [32, 64, 128])
def test_real_files_decode_as_pil_decodes_them_in_full(size):
    for path in sorted((SAMPLE / "train-image" / "image").glob("*.jpg"))[:5]:
        assert torch.equal(decode(path, size), resize_and_crop(as_pil_reads(path), size)), path.name


def test_the_cache_build_says_how_long_it_will_take():
    assert image_cache.estimate_line(300, 33_126, 10.0) == \
        "30 images/s over the first 300: about 18 min more for the other 32826"
    assert image_cache.estimate_line(320, 1000, 2.0).endswith("about 4 s more for the other 680")


# ---------------------------------------------------------------- the cache knows its decoder

SIZE = 32


def decoded(paths, size=SIZE):
    return np.stack([decode(p, size).numpy() for p in paths])


def key_before_the_decoder_was_in_it(paths, size: int) -> str:
    key = hashlib.sha1(str(size).encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]


def test_a_cache_written_by_another_decoder_under_the_older_key_is_never_read(large_jpegs, tmp_path):
    old = np.stack([another_decoder(p, SIZE).numpy() for p in large_jpegs])
    assert not np.array_equal(old, decoded(large_jpegs))  # the two decoders disagree on these files
    cache = tmp_path / "cache"
    cache.mkdir()
    stem = cache / f"images-{SIZE}px-{len(large_jpegs)}-{key_before_the_decoder_was_in_it(large_jpegs, SIZE)}"
    np.save(stem.with_suffix(".npy"), old)
    stem.with_suffix(".json").write_text(json.dumps({"n": len(large_jpegs), "size": SIZE, "errors": {},
                                                     "bytes": stem.with_suffix(".npy").stat().st_size}))
    array, errors = cached_images(large_jpegs, SIZE, cache, 0)
    assert errors == {} and np.array_equal(array, decoded(large_jpegs))
    assert np.array_equal(np.load(stem.with_suffix(".npy")), old)  # left alone, not reused


def test_a_cache_of_another_decoder_version_is_never_read(large_jpegs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(image_cache, "DECODE_VERSION", 1, raising=False)
    monkeypatch.setattr(image_cache, "decode", another_decoder)
    older, _ = cached_images(large_jpegs, SIZE, cache, 0)
    assert np.array_equal(older, [another_decoder(p, SIZE).numpy() for p in large_jpegs])
    monkeypatch.undo()
    array, _ = cached_images(large_jpegs, SIZE, cache, 0)
    assert np.array_equal(array, decoded(large_jpegs))
    assert len(list(cache.glob("*.npy"))) == 2


def test_the_cache_records_its_decoder_and_refuses_a_renamed_one(large_jpegs, tmp_path, capsys):
    cache = tmp_path / "cache"
    cached_images(large_jpegs, SIZE, cache, 0)
    [index] = cache.glob("*.json")
    assert json.loads(index.read_text())["decoder"] == image_cache.decoder_id()
    assert f"decode v{image_cache.DECODE_VERSION}: full decode" in image_cache.decoder_id()
    index.write_text(json.dumps({**json.loads(index.read_text()), "decoder": "decode v1: DCT-scaled"}))
    capsys.readouterr()
    array, _ = cached_images(large_jpegs, SIZE, cache, 0)
    assert "is built by another decoder (decode v1: DCT-scaled): rebuilding it" in capsys.readouterr().out
    assert np.array_equal(array, decoded(large_jpegs))


# A process that builds a cache with 2 worker processes started by `spawn` (the default on macOS and Windows).
SPAWNED = r"""
import sys
import torch.multiprocessing as mp
if __name__ == "__main__":
    mp.set_start_method("spawn")
    from isic import image_cache
    array, errors = image_cache.cached_images(sys.argv[2:], 32, sys.argv[1], 2)
    print("sum", int(array.astype("int64").sum()), "errors", len(errors))
"""


def test_the_cache_builds_with_spawned_workers(large_jpegs, tmp_path):
    done = subprocess.run([sys.executable, "-c", SPAWNED, str(tmp_path / "cache"), *map(str, large_jpegs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "with 2 process(es)" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"sum {int(decoded(large_jpegs).astype(np.int64).sum())} errors 0"


# A cache build that stops for good once its array's temporary file exists: the test kills it there (SIGKILL).
STALLED = r"""
import sys, time
from isic import image_cache
def stall(*args, **kwargs):
    print("building", flush=True)
    time.sleep(600)
image_cache.decode_all = stall
image_cache.cached_images(sys.argv[2:], 32, sys.argv[1], 0)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(large_jpegs, tmp_path):
    cache = tmp_path / "cache"
    other = cache / ".images-32px-4-0123456789abcdef.npy.x.tmp"  # another key's, maybe being built right now
    cache.mkdir()
    other.write_bytes(b"")
    stalled = subprocess.Popen([sys.executable, "-c", STALLED, str(cache), *map(str, large_jpegs)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert stalled.stdout.readline() == "building\n", stalled.communicate()[1][-2000:]
    stalled.send_signal(signal.SIGKILL)
    stalled.wait(timeout=60)
    [left] = [p for p in cache.glob(".images-*.npy.*.tmp") if p != other]
    array, _ = cached_images(large_jpegs, SIZE, cache, 0)
    assert np.array_equal(array, decoded(large_jpegs))
    assert not left.exists() and other.exists()


# ---------------------------------------------------------------- visual-agreement features

@pytest.mark.parametrize("no_cache", [False, True])
def test_colour_and_texture_features_do_not_depend_on_the_runs_image_size(large_jpegs, tmp_path, no_cache):
    s = Settings(cache_dir=str(tmp_path / "cache"), workers=0, no_cache=no_cache)
    rows = np.arange(len(large_jpegs))
    features = {}
    for size in (32, FEATURE_SIDE, 128):
        cache = None if no_cache else cached_images(large_jpegs, size, s.cache_dir, 0)[0]
        features[size] = dataset_features(ImageDataset(rows, np.zeros(len(rows)), large_jpegs, size, cache), s)
    assert np.array_equal(features[32], features[FEATURE_SIDE]) and np.array_equal(features[128], features[64])
    texture = features[32][:, -2:]  # the last block: neighbouring-pixel differences of the centre
    assert np.allclose(texture, dataset_features(ImageDataset(rows, np.zeros(len(rows)), large_jpegs, FEATURE_SIDE,
                                                              decoded(large_jpegs, FEATURE_SIDE)), s)[:, -2:])
