"""Faults from the machine and the data rather than from the run: a cache folder shared by two processes, a damaged
cache file, a full disk during a save, and images whose header claims a decompression bomb's dimensions."""
import errno
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engine.checkpoints import load_checkpoint
from isic import image_cache
import predict
from conftest import ROOT, tiny
from isic.demo import make_dataset
from isic.image_cache import cached_images, decode, decode_all
from utils import UserError, atomic_path, write_text

SIZE = 16


def png_claiming(path, width: int, height: int):
    """A valid PNG header (IHDR with its CRC) claiming width x height RGB pixels, and four rows of data: a few hundred
    bytes that would decode to width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress((b"\0" + b"\0" * 3 * width) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def jpeg_claiming(path, width: int, height: int):
    """A real 16x16 JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 90)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(folder / f"ISIC_{i:07d}.png")
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def decoded(paths):
    return np.stack([decode(p, SIZE).numpy() for p in paths])


# ---------------------------------------------------------------- the image cache

def damage_truncate(array_path, index_path):
    array_path.write_bytes(array_path.read_bytes()[:-100])


def damage_header(array_path, index_path):
    array_path.write_bytes(b"\0" * 128 + array_path.read_bytes()[128:])


def damage_extend(array_path, index_path):  # another file's tail appended, e.g. a bad copy
    array_path.write_bytes(array_path.read_bytes() + b"\0" * 3 * SIZE * SIZE)


def damage_index(array_path, index_path):
    index_path.write_text(index_path.read_text()[:10])


def damage_missing_array(array_path, index_path):
    array_path.unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_header, damage_extend, damage_index, damage_missing_array])
def test_damaged_cache_is_rebuilt_not_read(images, tmp_path, damage, capsys):
    cache = tmp_path / "cache"
    array, errors = cached_images(images, SIZE, cache, 0)
    assert errors == {} and np.array_equal(array, decoded(images))
    del array
    [array_path] = cache.glob("*.npy")
    index_path = array_path.with_suffix(".json")
    damage(array_path, index_path)
    capsys.readouterr()
    array, errors = cached_images(images, SIZE, cache, 0)
    assert f"image cache {array_path} is damaged" in capsys.readouterr().out
    assert errors == {} and np.array_equal(array, decoded(images))  # the known answer: direct decoding
    assert sorted(p.name for p in cache.iterdir()) == sorted([array_path.name, index_path.name,
                                                              array_path.with_suffix(".lock").name])


def test_whole_cache_is_reused_untouched(images, tmp_path, capsys):
    cache = tmp_path / "cache"
    cached_images(images, SIZE, cache, 0)
    [array_path] = cache.glob("*.npy")
    before = array_path.stat().st_mtime_ns, array_path.with_suffix(".json").stat().st_mtime_ns
    capsys.readouterr()
    array, _ = cached_images(images, SIZE, cache, 0)
    assert capsys.readouterr().out == ""
    assert (array_path.stat().st_mtime_ns, array_path.with_suffix(".json").stat().st_mtime_ns) == before
    assert np.array_equal(array, decoded(images))


# One process of two sharing a cache folder: it counts its decoding passes in `marker` and, when it is the builder,
# holds the lock until the test creates `release` (so that the other one surely arrives while the cache is half-built).
SHARER = r"""
import os, sys, time
from isic import image_cache
cache, marker, release, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
real = image_cache.decode_all
def counted(*args, **kwargs):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    waited = time.time()
    while not os.path.exists(release) and time.time() < waited + 30:
        time.sleep(0.05)
    return real(*args, **kwargs)
image_cache.decode_all = counted
array, errors = image_cache.cached_images(paths, 16, cache, 0)
print("sum", int(array.astype("int64").sum()), "errors", len(errors), flush=True)
"""


def share(cache, marker, release, paths):
    return subprocess.Popen([sys.executable, "-c", SHARER, cache, marker, release, *paths], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_sharing_a_cache_decode_once(images, tmp_path):
    cache, marker, release = tmp_path / "cache", tmp_path / "decodes", tmp_path / "release"
    builder = share(cache, marker, release, images)
    deadline = time.time() + 120
    while not marker.exists() and builder.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), builder.communicate()[1][-2000:]  # the builder holds the lock, mid-build
    other = share(cache, marker, release, images)
    first_line = other.stdout.readline()  # blocks until the other process says something: waiting, or a result
    release.touch()
    outputs = [child.communicate(timeout=120) for child in (builder, other)]
    assert [child.returncode for child in (builder, other)] == [0, 0], [err[-2000:] for _, err in outputs]
    assert first_line.startswith("waiting for another process to finish the image cache (lock ")
    assert len(marker.read_text().splitlines()) == 1  # decoded once, by the builder
    total = int(decoded(images).astype(np.int64).sum())
    last_lines = [out.strip().splitlines()[-1] for out, _ in outputs]  # the builder first says what it decodes
    assert last_lines == [f"sum {total} errors 0"] * 2


# ---------------------------------------------------------------- a full disk

def test_failed_write_says_which_file_and_free_space_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "run" / "history.csv"
    write_text(path, "epoch\n1\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the moment a full disk (or a quota) often shows: data reaching the disk
    with pytest.raises(UserError) as raised:
        write_text(path, "epoch\n1\n2\n")
    message = str(raised.value)
    assert message.startswith(f"cannot write {path}: No space left on device (") and "free on that filesystem" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert path.read_text() == "epoch\n1\n" and os.listdir(path.parent) == ["history.csv"]


def test_other_errors_in_an_atomic_write_pass_through(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.txt"):
            raise KeyError("a bug is not a full disk")
    assert os.listdir(tmp_path) == []


# A tiny run whose filesystem "fills up" when epoch 2 is saved: from then on no file may grow past 64 KB
# (RLIMIT_FSIZE: every write beyond fails, as on a full disk), so torch.save's own writer fails for real.
FILLS_UP = r"""
import resource, signal, sys
import torch, driver
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
real_save = torch.save
def save(obj, f, *args, **kwargs):  # called in the checkpoint writer's thread: setrlimit holds for the whole process
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.exit(driver.main(sys.argv[1:]))
"""


def start(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    data = make_dataset(root / "data", n_images=120, malignant_rate=0.2, size=40, seed=1)
    out = root / "run"
    stopped = start("-c", FILLS_UP, "--data-dir", data, "--cache-dir", root / "cache", "--out", out, *tiny(3, None))
    last = load_checkpoint(out / "last.pt")["epoch"]  # read before the resume rewrites it
    resumed = start("driver.py", "--resume", out)
    return out, data, stopped, last, resumed


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_full_disk_stops_with_one_line_and_the_run_resumes(disk_full_run):
    out, _, stopped, last, resumed = disk_full_run
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    [line] = stopped.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write {out / 'best.pt'}: ") or \
        line.startswith(f"error: cannot write {out / 'last.pt'}: "), line
    assert line.endswith("free on that filesystem)")
    assert last == 1  # epoch 1's last.pt, whole: the failed save of epoch 2 never replaced it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2 of 3" in resumed.stdout
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [1, 2, 3] and (out / "test" / "metrics.json").is_file()
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- hostile images

@pytest.mark.parametrize("write", [png_claiming, jpeg_claiming])
@pytest.mark.parametrize("width, height", [(40000, 40000), (12000, 12000)])  # above PIL's own limit, and below it
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, write, width, height):
    path = write(tmp_path / f"bomb.{'png' if write is png_claiming else 'jpg'}", width, height)
    assert path.stat().st_size < 2000
    decoders = []
    monkeypatch.setattr(image_cache, "decode_image", lambda *a, **k: decoders.append("torchvision") or 1 / 0)
    monkeypatch.setattr(Image.Image, "load", lambda *a, **k: decoders.append("PIL") or 1 / 0)
    with pytest.raises(ValueError, match=f"{width}x{height}|{width * height} pixels"):
        decode(path, SIZE)
    assert decoders == []


def test_megapixel_limit_is_the_documented_one(tmp_path):
    side = int(image_cache.MAX_MEGAPIXELS ** 0.5 * 1000)  # 10,000 x 10,000: exactly at the limit, allowed
    image_cache.refuse_huge(png_claiming(tmp_path / "at.png", side, side))
    with pytest.raises(ValueError, match=f"{side + 1}x{side} pixels .* above the 100-megapixel limit"):
        image_cache.refuse_huge(png_claiming(tmp_path / "above.png", side + 1, side))


def test_bombs_among_training_images_are_listed_as_unreadable(images, tmp_path):
    paths = [*images[:2], png_claiming(tmp_path / "bomb.png", 40000, 40000), images[2]]
    out = np.zeros((len(paths), 3, SIZE, SIZE), dtype=np.uint8)
    errors = decode_all(paths, SIZE, 0, out)
    assert list(errors) == [2] and errors[2].startswith("ValueError: ") and "1600000000 pixels" in errors[2]
    assert np.array_equal(out[[0, 1, 3]], decoded([*images[:2], images[2]]))


@pytest.mark.slow
def test_predict_skips_bad_images_and_lists_them(disk_full_run, tmp_path, capsys):
    out, data, *_ = disk_full_run
    folder = tmp_path / "new"
    folder.mkdir()
    good = sorted((data / "train-image" / "image").glob("*.jpg"))[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    png_claiming(folder / "bomb.png", 40000, 40000)
    (folder / "junk.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert predict.main(["--run", str(out), "--images", str(folder), "--out", str(tmp_path / "p")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: 2 unreadable image(s), e.g. ") and line.endswith("or pass --skip-bad-images")
    code = predict.main(["--run", str(out), "--images", str(folder), "--out", str(tmp_path / "p"), "--skip-bad-images"])
    printed = capsys.readouterr().out
    assert code == 0  # the flag the message names is one predict.py accepts
    assert "skipping 2 unreadable image(s):" in printed
    assert f"{folder / 'bomb.png'}: ValueError: " in printed and f"{folder / 'junk.jpg'}: UnidentifiedImageError" in printed
    predictions = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert list(predictions["isic_id"]) == [p.stem for p in good]
    assert predictions["probability"].between(0, 1).all()
    skipped = pd.read_csv(tmp_path / "p" / "skipped_images.csv")  # listed on report.html
    assert list(skipped["file"]) == [str(folder / "bomb.png"), str(folder / "junk.jpg")]
    assert str(folder / "junk.jpg") in (tmp_path / "p" / "report.html").read_text()
