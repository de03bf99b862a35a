"""export.py: the exported model, fed images of any size as they are, reproduces the pipeline's preprocessing and the
run's own probabilities."""
import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.augment import to_float
import export
from test_decode import another_decoder, key_before_the_decoder_was_in_it
from conftest import SAMPLE, in_process, tiny
from experiments.scale_check import distinct_image
from isic.demo import make_dataset
from isic.metadata import load_metadata, locate_images
from isic.image_cache import decode, read_rgb, resize_and_crop
from scoring.inference import load_run


class Pixels(nn.Module):
    """A stand-in network whose "embedding" is its input: the exported model then returns its preprocessed pixels."""

    def forward(self, images):
        return images.flatten(1), images.mean((1, 2, 3))


def photo_like(height, width, seed):
    """Smooth colour regions plus noise, as uint8 (3, H, W): resampling rounds differently on such images than on
    flat ones."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g) * 255, size=(height, width),
                           mode="bicubic")
    return (coarse + torch.randn(coarse.shape, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)[0]


def test_exported_preprocessing_is_the_pipelines_on_any_shape(tmp_path):
    size = 32
    export.write_export(Pixels(), size, tmp_path / "pixels.pt2", "pt2")
    exported = export.load_export(tmp_path / "pixels.pt2")
    # Portrait and landscape, downscaled and upscaled, odd and even leftovers around the centre crop, square.
    for seed, (height, width) in enumerate([(48, 64), (64, 48), (37, 53), (53, 37), (33, 65), (120, 90), (40, 40)]):
        image = photo_like(height, width, seed)
        pixels = torch.as_tensor(exported(image[None].numpy())[1]).reshape(3, size, size) * 255
        difference = (pixels.round() - resize_and_crop(image, size).float()).abs()
        # Rounding only (uint8 resizing's fixed-point weights): the geometry is the pipeline's. Cropping before
        # resizing, as a fixed-size export once did, is off by 2-3 levels on average on such shapes.
        assert difference.max() <= 1 and difference.mean() < 0.1, (height, width)


def test_crop_offsets_round_halves_to_even_as_torchvision_does():
    assert [export.centre_offset(excess) for excess in range(8)] == [round(e / 2) for e in range(8)] \
        == [0, 0, 1, 2, 2, 2, 3, 4]


@pytest.fixture(scope="module")
def run_at_file_size(tmp_path_factory):
    """A run whose --img-size equals the files' size: the exported preprocessing is then exactly the pipeline's."""
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data", n_images=80, malignant_rate=0.3, size=32, seed=3)
    out = root / "run"
    assert in_process("driver.py", "--data-dir", data, "--out", out, "--cache-dir", root / "cache", *tiny(1)) == 0
    return data, out


def exported_probabilities(path, data, ids):
    exported = export.load_export(path)
    images = np.stack([read_rgb(data / "train-image" / "image" / f"{i}.jpg").numpy() for i in ids])
    return exported(images)[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_reproduces_the_runs_test_probabilities(run_at_file_size, fmt, tmp_path):
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export is optional: pip install onnx onnxscript onnxruntime")
    data, run = run_at_file_size
    path = tmp_path / f"model.{fmt}"
    assert export.main(["--run", str(run), "--format", fmt, "--out", str(path), "--check", "4"]) == 0
    predictions = pd.read_csv(run / "test" / "predictions.csv")
    got = exported_probabilities(path, data, predictions["isic_id"])  # one batch: the batch size is free too
    assert np.abs(got - predictions["probability"].to_numpy()).max() < 1e-5


@pytest.mark.slow
def test_batch_size_height_and_width_are_free(run_at_file_size, tmp_path, capsys):
    data, run = run_at_file_size
    path = tmp_path / "model.pt2"
    assert export.main(["--run", str(run), "--out", str(path), "--check", "2"]) == 0
    assert "checked on 6 images (2 test images, each also cropped" in capsys.readouterr().out
    _, model = load_run(run, torch.device("cpu"))
    exported = export.load_export(path)
    image = read_rgb(next((data / "train-image" / "image").glob("*.jpg")))  # 32 x 32, as every file of the run
    for height, width in [(45, 70), (70, 45), (20, 27)]:  # larger and smaller than the run's images, both ways
        batch = F.interpolate(image[None].float(), size=(height, width), mode="bilinear").round().to(torch.uint8)
        batch = batch.expand(3, -1, -1, -1).contiguous()
        probabilities, embeddings = exported(batch.numpy())
        with torch.inference_mode():
            expected = torch.sigmoid(model(to_float(resize_and_crop(batch, 32)))[1]).numpy()
        assert probabilities.shape == (3,) and embeddings.shape == (3, 16)
        assert np.abs(probabilities - expected).max() < 1e-3, (height, width)


@pytest.mark.slow
def test_an_export_that_disagrees_is_refused_and_not_left_behind(run_at_file_size, tmp_path, monkeypatch, capsys):
    _, run = run_at_file_size
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no export can be that close
    assert export.main(["--run", str(run), "--out", str(tmp_path / "model.pt2"), "--check", "2"]) == 2
    assert "differs from the run" in capsys.readouterr().err and not (tmp_path / "model.pt2").exists()



def as_pil_reads(path) -> np.ndarray:
    """A file as the README tells a user of the export to read it: decoded in full by PIL, uint8 (3, H, W)."""
    with Image.open(path) as pil:
        return np.array(pil.convert("RGB")).transpose(2, 0, 1)


def dct_scaled(path, size: int) -> torch.Tensor:
    """Another decode than a user's: the JPEG read at a DCT scale (PIL's draft), as older versions of the pipeline did."""
    with Image.open(path) as pil:
        pil.draft("RGB", (size, size))
        return resize_and_crop(torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1), size)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """Files larger than the runs' image sizes, as real data are: generated 640 x 480 JPEGs, and the first real
    256 x 256 ones when the sample is there."""
    folder = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(5)
    generated = [folder / f"lesion{i}.jpg" for i in range(3)]
    for i, path in enumerate(generated):
        distinct_image(rng, i == 1, (640, 480) if i else (480, 640)).save(path, quality=90)
    return generated + sorted((SAMPLE / "train-image" / "image").glob("*.jpg"))[:3]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_the_export_on_a_users_full_decode_gives_the_pipelines_pixels(user_files, size, tmp_path):
    export.write_export(Pixels(), size, tmp_path / "pixels.pt2", "pt2")
    exported = export.load_export(tmp_path / "pixels.pt2")
    for path in user_files:
        pixels = torch.as_tensor(exported(as_pil_reads(path)[None])[1]).reshape(3, size, size) * 255
        difference = (pixels.round() - decode(path, size).float()).abs()
        assert difference.max() <= 1 and difference.mean() < 0.05, (path.name, difference.max(), difference.mean())


class Texture(nn.Module):
    """A stand-in network whose logit is the image's fine texture (mean difference of neighbouring pixels): it tells
    one decode from another as a trained network does (a DCT-scaled decode is 10-30% rougher at 32-128 px)."""

    def forward(self, images):
        texture = (images[..., 1:] - images[..., :-1]).abs().mean((1, 2, 3)) + \
            (images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3))
        return images.flatten(1), 20 * (texture - 0.05)


def test_the_self_check_compares_with_the_pipelines_own_decode(user_files, tmp_path, monkeypatch):
    export.write_export(Texture(), 32, tmp_path / "texture.pt2", "pt2")
    exported = export.load_export(tmp_path / "texture.pt2")
    same, checked = export.largest_difference(exported, Texture(), user_files, 32)
    assert same < export.TOLERANCE and checked == 3 * len(user_files)
    monkeypatch.setattr(export, "decode", dct_scaled, raising=False)  # had the pipeline decoded otherwise than users
    other, _ = export.largest_difference(exported, Texture(), user_files, 32)
    assert other > export.TOLERANCE == 0.002


@pytest.fixture(scope="module")
def larger_run(tmp_path_factory):
    """run(size) → (data, run folder): a run on 160 x 160 JPEGs at --img-size `size`, trained once per size: each
    file is decoded and then resized, as real data are."""
    runs = {}

    def run(size: int):
        if size not in runs:
            root = tmp_path_factory.mktemp(f"larger-{size}")
            data = make_dataset(root / "data", n_images=60, malignant_rate=0.3, size=160, seed=3)
            out = root / "run"
            assert in_process("driver.py", "--data-dir", data, "--out", out, "--cache-dir", root / "cache", *tiny(1),
                              "--img-size", size) == 0
            runs[size] = data, out
        return runs[size]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_export_on_files_decoded_in_full_gives_the_runs_test_predictions(larger_run, size, tmp_path, capsys, caplog):
    data, run = larger_run(size)
    path = tmp_path / "model.pt2"
    assert export.main(["--run", str(run), "--out", str(path), "--check", "4"]) == 0
    assert "ending in .pt2" not in capsys.readouterr().err + caplog.text  # torch's warning on a temporary file name
    predictions = pd.read_csv(run / "test" / "predictions.csv")
    images = np.stack([as_pil_reads(data / "train-image" / "image" / f"{i}.jpg") for i in predictions["isic_id"]])
    difference = np.abs(export.load_export(path)(images)[0] - predictions["probability"].to_numpy()).max()
    assert difference < 1e-4, difference  # resampling's rounding only (the promise is 0.002)


@pytest.mark.slow
def test_a_cache_left_by_the_older_decoder_changes_no_prediction(larger_run, tmp_path):
    """predict.py with a cache folder that holds only a cache another decoder wrote under the name the key gave before
    it named the decoder: the same test probabilities as the run's own, which came from a fresh cache."""
    size = 32
    data, run = larger_run(size)
    copy = shutil.copytree(run, tmp_path / "run")
    cache = tmp_path / "cache"
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "cache_dir": str(cache)}))
    ids = list(load_metadata(data / "train-metadata.csv")["isic_id"])
    paths, _ = locate_images(ids, data / "train-image" / "image")  # as the pipeline lists them
    stem = cache / f"images-{size}px-{len(paths)}-{key_before_the_decoder_was_in_it(paths, size)}"
    cache.mkdir()
    np.save(stem.with_suffix(".npy"), np.stack([another_decoder(p, size).numpy() for p in paths]))
    stem.with_suffix(".json").write_text(json.dumps({"n": len(paths), "size": size, "errors": {},
                                                     "bytes": stem.with_suffix(".npy").stat().st_size}))
    assert in_process("predict.py", "--run", copy, "--split", "test", "--workers", 0) == 0
    before = pd.read_csv(run / "test" / "predictions.csv")["probability"].to_numpy()
    after = pd.read_csv(copy / "test" / "predictions.csv")["probability"].to_numpy()
    assert np.abs(after - before).max() < 1e-6
