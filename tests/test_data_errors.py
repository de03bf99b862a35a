"""Bad input, --check-data and image formats, on tiny generated datasets: one 'error:' line, a non-zero exit, no
traceback and no half-written run folder for every problem a user's data can have."""
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from engine.config import Settings
from conftest import METADATA, ROOT, in_process, needs
from dataset import prepare_data
from driver import main
from isic.metadata import load_metadata
from isic.splits import split_frame, write_splits
from utils import UserError

GROUND_TRUTH = METADATA / "ISIC_2020_Training_GroundTruth.csv"


@pytest.fixture(autouse=True)
def keep_torch_global_state():
    """driver.main switches deterministic algorithms on for CPU runs; give the other tests the state they had."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "driver.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def write_data(root, n=48, pixels=16):
    """The official layout: image_name, patient_id, target and extra columns; every 4th image malignant."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (pixels, pixels, 3), dtype=np.uint8)).save(images / f"ISIC_{i:07d}.jpg")
    frame = pd.DataFrame({"image_name": [f"ISIC_{i:07d}" for i in range(n)],
                          "patient_id": [f"IP_{i // 2}" for i in range(n)], "sex": "female", "age_approx": 45.0,
                          "diagnosis": "unknown", "target": [int(i % 4 == 0) for i in range(n)]})
    frame.to_csv(root / "meta.csv", index=False)
    return root / "meta.csv", images, frame


def run_main(capsys, *args):
    code = main([*map(str, args), "--img-size", "32", "--workers", "0", "--no-cache"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, message):
    assert code == 2
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert message in err, err


# ---------------------------------------------------------------- one clear line for every bad input

def rewrite(column=None, row=None, value=None, drop=None, extra_rows=0):
    def edit(csv, frame):
        frame = frame.copy()
        if drop:
            frame = frame.drop(columns=drop)
        if column:
            frame[column] = frame[column].astype(object)
            frame.loc[row, column] = value
        pd.concat([frame, frame.iloc[:extra_rows]]).to_csv(csv, index=False)
    return edit


def raw_bytes(data):
    return lambda csv, frame: csv.write_bytes(data)


BAD_INPUTS = [
    ("empty csv", raw_bytes(b""), "meta.csv is empty"),
    ("header only", raw_bytes(b"image_name,patient_id,target\n"), "has a header but no rows"),
    ("binary garbage", raw_bytes(bytes(range(256)) * 16), "meta.csv is not a CSV: it holds binary data"),
    ("not utf-8", raw_bytes(b"\xff\xd8\xff\xe0 JFIF" * 50), "meta.csv is not a readable CSV"),
    ("row longer than header", raw_bytes(b"image_name,target\nISIC_0000000,1,7\nISIC_0000001,0\n"),
     "meta.csv is not a readable CSV"),
    ("no id column", rewrite(drop=["image_name"]), "has no image id column (isic_id or image_name)"),
    ("no target column", rewrite(drop=["target"]), "has no 'target' column"),
    ("target empty", rewrite("target", 1, None), "'target' must be 0 or 1; an empty cell on line(s) 3"),
    ("target 2", rewrite("target", 5, 2), "'target' must be 0 or 1; '2' on line(s) 7"),
    ("target word", rewrite("target", 0, "malignant"), "'target' must be 0 or 1; 'malignant' on line(s) 2"),
    ("duplicate ids", rewrite(extra_rows=1), "duplicate image ids on line(s) 2, 50, e.g. 'ISIC_0000000'"),
    ("id with slash", rewrite("image_name", 3, "sub/ISIC_1"), "plain file names (no paths, no '..'); see line(s) 5"),
    ("id with dotdot", rewrite("image_name", 3, "..x"), "see line(s) 5, e.g. '..x'"),
    ("absolute id", rewrite("image_name", 3, "/etc/passwd"), "see line(s) 5, e.g. '/etc/passwd'"),
    ("windows path id", rewrite("image_name", 3, "C:\\x"), "see line(s) 5"),
    ("empty id", rewrite("image_name", 3, None), "see line(s) 5, e.g. an empty id"),
    ("only benign", rewrite("target", slice(None), 0), "all 48 rows are benign (target 0); training needs both"),
    ("too few malignant", rewrite("target", slice(8, None), 0),
     "only 2 malignant patients: a stratified train/val/test split with these fractions needs at least 10"),
]


@pytest.mark.parametrize("name, edit, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_csv_gives_one_line_and_writes_nothing(name, edit, message, tmp_path, capsys):
    csv, images, frame = write_data(tmp_path)
    edit(csv, frame)
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", tmp_path / "run")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()  # no folder, no config.json, no splits.csv a later run could trust


def test_missing_paths_and_unreadable_images_give_one_line(tmp_path, capsys):
    csv, images, _ = write_data(tmp_path)
    out = tmp_path / "run"

    def error(*args):
        code, _, err = run_main(capsys, *args, "--out", out)
        return code, err

    assert_one_line_error(*error("--data-dir", tmp_path / "nope"), "data folder not found")
    assert_one_line_error(*error("--data-dir", tmp_path), "no metadata CSV in")
    assert_one_line_error(*error("--csv", tmp_path / "x.csv", "--image-dir", images), "metadata CSV not found")
    assert_one_line_error(*error("--csv", csv, "--image-dir", tmp_path / "nope"), "image folder not found")
    assert_one_line_error(*error("--csv", csv, "--image-dir", images, "--duplicates", tmp_path / "d.csv"),
                          "duplicates CSV not found")
    assert_one_line_error(*error("--csv", csv, "--image-dir", images, "--duplicates", images / "ISIC_0000001.jpg"),
                          "ISIC_0000001.jpg is not a CSV: it holds binary data")
    for i in (7, 3, 30):
        (images / f"ISIC_{i:07d}.jpg").write_bytes(b"not an image")
    code, err = error("--csv", csv, "--image-dir", images)
    assert_one_line_error(code, err, f"3 unreadable image(s), e.g. {images / 'ISIC_0000003.jpg'} (")
    assert "--skip-bad-images" in err
    assert not out.exists()


def test_too_few_malignant_images_for_a_plain_split():
    frame = pd.DataFrame({"isic_id": [f"I{i}" for i in range(100)], "patient_id": None,
                          "target": [int(i < 3) for i in range(100)]})
    with pytest.raises(UserError, match="only 3 malignant images: .* needs at least 10"):
        split_frame(frame, "image", 0.15, 0.10)
    with pytest.raises(UserError, match="only 3 malignant images: .* needs at least 4"):
        split_frame(frame, "image", 0.3, 0.3)


def test_missing_images_are_counted_and_named(tmp_path, capsys):
    csv, images, _ = write_data(tmp_path)
    for i in (30, 3, 7):
        (images / f"ISIC_{i:07d}.jpg").unlink()
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "3 of 48 images missing from")
    assert "e.g. ISIC_0000003, ISIC_0000007, ISIC_0000030 (expected <id>.jpg, .jpeg or .png)" in err


def test_out_folder_is_protected(tmp_path, capsys):
    csv, images, _ = write_data(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "best.pt").write_text("weights")
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", run, "--check-data")
    assert_one_line_error(code, err, f"{run} already holds a run: continue it with --resume {run}")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", other, "--check-data", "--overwrite")
    assert_one_line_error(code, err, "is a non-empty folder that is not a run")
    assert (other / "mine.txt").read_text() == "keep me" and (run / "best.pt").is_file()
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", other / "mine.txt", "--check-data")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_overwrite_keeps_the_old_run_when_the_data_is_bad(tmp_path, capsys):
    csv, images, frame = write_data(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    frame.drop(columns=["target"]).to_csv(csv, index=False)
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", run, "--overwrite")
    assert_one_line_error(code, err, "has no 'target' column")
    assert (run / "config.json").is_file()  # only replaced once the new data is known to be usable


def test_cli_prints_no_traceback(tmp_path):
    csv, images, _ = write_data(tmp_path)
    csv.write_bytes(bytes(range(256)) * 16)
    result = cli("--csv", csv, "--image-dir", images, "--out", tmp_path / "run", "--check-data")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "is not a CSV: it holds binary data" in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- --check-data

def test_check_data_on_usable_data_writes_split_and_report(tmp_path, capsys):
    csv, images, frame = write_data(tmp_path)
    (images / "ISIC_0000005.jpg").write_bytes(b"corrupt, but only --check-images decodes")
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "--csv", csv, "--image-dir", images, "--out", out, "--check-data")
    assert code == 0 and err == ""
    assert sorted(p.name for p in out.iterdir()) == ["data_report.txt", "splits.csv", "timings.json"]
    splits = pd.read_csv(out / "splits.csv")
    assert list(splits.columns) == ["isic_id", "patient_id", "target", "split", "group", "split_by"]
    assert list(splits["isic_id"]) == list(frame["image_name"]) and set(splits["split_by"]) == {"patient"}
    assert set(splits["split"]) == {"train", "val", "test"}
    report = (out / "data_report.txt").read_text()
    assert "images: 48  malignant: 12" in report and "patients in more than one split: 0" in report
    assert "problems: none" in report and "--check-images" in report and "data is usable" in stdout
    # a --check-data result is not a run: checking again needs no --overwrite
    assert run_main(capsys, "--csv", csv, "--image-dir", images, "--out", out, "--check-data")[0] == 0


def test_check_data_reports_missing_images_and_still_writes_the_split(tmp_path, capsys):
    csv, images, _ = write_data(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "--csv", csv, "--image-dir", empty, "--out", out, "--check-data")
    assert_one_line_error(code, err, "data not usable: 48 of 48 images missing from")
    assert str(out / "data_report.txt") in err
    assert len(pd.read_csv(out / "splits.csv")) == 48 and not (out / "config.json").exists()
    report = (out / "data_report.txt").read_text()
    assert "problems: 1" in report and "48 of 48 images missing" in report


def test_check_images_finds_bad_files_and_skip_lists_them(tmp_path, capsys):
    csv, images, _ = write_data(tmp_path)
    (images / "ISIC_0000005.jpg").write_bytes(b"not an image")
    good = (images / "ISIC_0000006.jpg").read_bytes()
    (images / "ISIC_0000006.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "ISIC_0000009.jpg").unlink()
    out = tmp_path / "run"
    args = ["--csv", csv, "--image-dir", images, "--out", out, "--check-data", "--check-images"]
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "data not usable: 1 of 48 images missing")
    report = (out / "data_report.txt").read_text()
    assert "problems: 2" in report and "2 unreadable image(s), e.g." in report
    assert "ISIC_0000005: UnidentifiedImageError" in report and "ISIC_0000006: OSError" in report
    (images / "ISIC_0000009.jpg").write_bytes(good)
    code, _, err = run_main(capsys, *args, "--skip-bad-images")
    assert code == 0 and err == ""
    report = (out / "data_report.txt").read_text()
    assert "unreadable images: 2 (left out of the split)" in report and "problems: none" in report
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 46 and not splits["isic_id"].isin(["ISIC_0000005", "ISIC_0000006"]).any()


def test_skip_bad_images_in_a_run(tmp_path):
    csv, images, _ = write_data(tmp_path)
    (images / "ISIC_0000011.jpg").write_bytes(b"")
    s = Settings(csv=str(csv), image_dir=str(images), img_size=32, workers=0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="1 unreadable image.*ISIC_0000011.jpg"):
        prepare_data(s)
    s.skip_bad_images = True
    data = prepare_data(s)
    assert list(data.bad_images) == ["ISIC_0000011"] and len(data.frame) == 47
    assert "ISIC_0000011" not in set(data.frame["isic_id"])  # left out of the split that splits.csv records
    image, _ = data.dataset("train", 32)[0]
    assert image.shape == (3, 32, 32)


# ---------------------------------------------------------------- what the split records

def test_duplicates_and_split_unit_are_recorded(tmp_path, capsys):
    csv, images, frame = write_data(tmp_path)
    pairs = pd.DataFrame({"image_name_1": [f"ISIC_{i:07d}" for i in range(0, 40, 4)],
                          "image_name_2": [f"ISIC_{i + 3:07d}" for i in range(0, 40, 4)]})  # joins patients 2k, 2k+1
    pairs.to_csv(tmp_path / "dups.csv", index=False)
    base = ["--csv", csv, "--image-dir", images, "--check-data", "--val-frac", "0.2", "--test-frac", "0.2"]
    for extra, unit in ([["--duplicates", tmp_path / "dups.csv"], "patient+duplicates"], [[], "patient"],
                        [["--split-by", "image", "--duplicates", tmp_path / "dups.csv"], "image"]):
        out = tmp_path / unit
        assert run_main(capsys, *base, *extra, "--out", out)[0] == 0
        splits = pd.read_csv(out / "splits.csv")
        assert set(splits["split_by"]) == {unit}
        assert f"split by: {unit}" in (out / "data_report.txt").read_text()
    joined = pd.read_csv(tmp_path / "patient+duplicates" / "splits.csv").set_index("isic_id")
    for a, b in pairs.itertuples(index=False):
        assert joined.loc[a, "group"] == joined.loc[b, "group"] and joined.loc[a, "split"] == joined.loc[b, "split"]
    assert joined["group"].nunique() == 14  # 20 pairs of patients joined into 10 groups, plus 4 lone patients
    plain = pd.read_csv(tmp_path / "image" / "splits.csv")
    assert plain["group"].nunique() == 48
    frame.drop(columns=["patient_id"]).to_csv(csv, index=False)  # no patients: duplicates are the only groups
    assert run_main(capsys, *base, "--duplicates", tmp_path / "dups.csv", "--out", tmp_path / "np")[0] == 0
    assert set(pd.read_csv(tmp_path / "np" / "splits.csv")["split_by"]) == {"duplicates"}


# ---------------------------------------------------------------- layouts and image formats

def test_official_csv_with_extra_columns_and_index(tmp_path):
    csv, _, frame = write_data(tmp_path)
    frame.assign(benign_malignant="benign", anatom_site_general_challenge=None).to_csv(csv)  # unnamed index column
    loaded = load_metadata(csv)
    assert list(loaded.columns) == ["isic_id", "patient_id", "target"]
    assert list(loaded["isic_id"]) == list(frame["image_name"]) and loaded["target"].sum() == 12


MODES = [("L", ".jpg"), ("CMYK", ".jpeg"), ("RGBA", ".png"), ("P", ".PNG"), ("LA", ".png"), ("1", ".png"),
         ("I;16", ".png"), ("RGB", ".JPG")]


def test_any_mode_and_extension_becomes_rgb_at_img_size(tmp_path):
    csv, images, _ = write_data(tmp_path)
    y, x = np.mgrid[0:45, 0:70]  # not square, not 32 px; smooth, so lossy formats stay close
    picture = Image.fromarray(np.stack([x * 3, y * 5, 255 - x * 2], -1).astype(np.uint8))
    for i, (mode, ext) in enumerate(MODES):
        (images / f"ISIC_{i:07d}.jpg").unlink()
        grey16 = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
        (grey16 if mode == "I;16" else picture.convert(mode)).save(images / f"ISIC_{i:07d}{ext}")
    s = Settings(csv=str(csv), image_dir=str(images), img_size=32, workers=0, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(s)
    for i, (mode, ext) in enumerate(MODES):
        image = torch.from_numpy(np.array(data.cache[i]))
        assert data.paths[i].name == f"ISIC_{i:07d}{ext}"
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8, mode
        source = picture.convert("L" if mode == "I;16" else mode).convert("RGB")
        expected = TF.center_crop(TF.resize(TF.pil_to_tensor(source), 32, antialias=True), [32, 32])
        assert (image.float() - expected.float()).abs().mean() < 3, mode  # what PIL sees, in RGB at 32 px
        if mode in ("L", "LA", "I;16"):
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), mode


# ---------------------------------------------------------------- the "done when", on the real metadata

@needs(GROUND_TRUTH, METADATA / "ISIC_2020_Training_Duplicates.csv")
def test_check_data_on_real_metadata_with_no_images_is_fast_and_clear(tmp_path, capsys):
    empty = tmp_path / "X"
    empty.mkdir()
    out = tmp_path / "run"
    start = time.perf_counter()
    code = in_process("driver.py", "--csv", GROUND_TRUTH, "--image-dir", empty, "--check-data", "--out", out,
                      "--duplicates", METADATA / "ISIC_2020_Training_Duplicates.csv")
    seconds, err = time.perf_counter() - start, capsys.readouterr().err
    assert_one_line_error(code, err, "data not usable: 33126 of 33126 images missing from")
    assert err.startswith("error: data not usable") and seconds < 60
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 33126 and set(splits["split_by"]) == {"patient+duplicates"}
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    assert "patients in more than one split: 0" in (out / "data_report.txt").read_text()


def test_saved_split_is_reused_with_what_it_recorded(tmp_path):
    csv, images, _ = write_data(tmp_path)
    s = Settings(csv=str(csv), image_dir=str(images), img_size=32, workers=0, no_cache=True)
    first = prepare_data(s)
    write_splits(first.frame, tmp_path / "splits.csv")
    again = prepare_data(Settings(**{**s.to_dict(), "seed": 7}), splits_path=tmp_path / "splits.csv")
    columns = ["isic_id", "patient_id", "target", "split", "group", "split_by"]
    # the saved split, not a new one with seed 7 (the dtypes of a CSV round trip may differ)
    pd.testing.assert_frame_equal(first.frame[columns], again.frame[columns], check_dtype=False)
    assert not prepare_data(Settings(**{**s.to_dict(), "seed": 7})).frame["split"].equals(first.frame["split"])
