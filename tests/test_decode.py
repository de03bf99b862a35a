"""Large JPEGs are decoded at a DCT scale (1/2, 1/4, 1/8) that still covers the target, then resized as before:
within a grey level of the full decode. Other images are decoded in full, as before."""
import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from experiments.scale_check import distinct_image
from isic import image_cache
from isic.image_cache import dct_scale, decode, read_rgb, resize_and_crop


def full_decode(path, size):
    return resize_and_crop(read_rgb(path), size)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "lesion.jpg"
    distinct_image(np.random.default_rng(3), True, (2400, 1600)).save(path, quality=90)
    return path


# 64 and 256 px: decoded at 1/8 (300 x 200) and 1/4 (600 x 400), then resized; 200 px: 1/8 gives exactly 200, no
# resize left to smooth it (the largest difference).
@pytest.mark.parametrize("size, scale", [(64, 8), (200, 8), (256, 4)])
def test_a_large_jpeg_decodes_scaled_within_a_grey_level_of_the_full_decode(large_jpeg, size, scale, monkeypatch):
    drafts = []
    draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, *a: drafts.append(a) or draft(self, *a))
    fast = decode(large_jpeg, size)
    assert drafts == [("RGB", (size, size))]  # the scaled path ran
    with Image.open(large_jpeg) as pil:
        assert dct_scale(pil, size) == scale
    difference = (fast.int() - full_decode(large_jpeg, size).int()).abs().float()
    assert fast.shape == (3, size, size)
    assert difference.mean() < 1.0  # grey levels of 255
    assert difference.max() <= 8


def test_scale_is_the_smallest_that_covers_the_target(tmp_path):
    jpeg, png = tmp_path / "a.jpg", tmp_path / "a.png"
    Image.new("RGB", (1024, 768)).save(jpeg)
    Image.new("RGB", (1024, 768)).save(png)
    with Image.open(jpeg) as pil:
        assert [dct_scale(pil, size) for size in (96, 128, 192, 256, 384, 385, 768, 1024)] == [8, 4, 4, 2, 2, 1, 1, 1]
    with Image.open(png) as pil:
        assert dct_scale(pil, 96) == 1


def test_small_jpegs_and_large_pngs_decode_exactly_as_before(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    small, png = tmp_path / "small.jpg", tmp_path / "large.png"
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(small)
    Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)).save(png)
    monkeypatch.setattr(JpegImageFile, "draft", lambda *a: pytest.fail("draft used"))
    for path in (small, png):
        assert (decode(path, 64) == full_decode(path, 64)).all()


def test_the_cache_build_says_how_long_it_will_take():
    assert image_cache.estimate_line(300, 33_126, 10.0) == \
        "30 images/s over the first 300: about 18 min more for the other 32826"
    assert image_cache.estimate_line(320, 1000, 2.0).endswith("about 4 s more for the other 680")
