"""Metadata: find the CSV and image folder of a dataset, read and validate the CSV, locate every image."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from utils import UserError

ID_COLUMNS = ("isic_id", "image_name")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


# Known layouts: (metadata CSV, image folder), relative to --data-dir.
LAYOUTS = [
    ("train-metadata.csv", "train-image/image"),                                # Kaggle "ISIC 2020 JPG 256x256 RESIZED"
    ("train.csv", "jpeg/train"),                                                # Kaggle competition download
    ("ISIC_2020_Training_GroundTruth.csv", "ISIC_2020_Training_JPEG/train"),   # official ISIC download
    ("ISIC_2020_Training_GroundTruth.csv", "train"),
]


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


def join_columns(frame: pd.DataFrame, csv_path, extra_csv=None) -> pd.DataFrame:
    """`frame` (from load_metadata) with every other column of the metadata CSV and of `extra_csv`, joined by image id.

    The columns load_metadata validated (isic_id, patient_id, target) stay as they are; the metadata CSV's own columns
    come before the extra CSV's, which only adds columns the metadata lacks (e.g. the official ground truth's
    diagnosis, sex, age_approx, anatom_site_general_challenge onto the Kaggle 256 px layout). Rows of the extra CSV
    that match no image are ignored; an image without a row there is an error: its columns would silently be empty.
    """
    joined = frame
    for path, what in ((csv_path, "metadata CSV"), (extra_csv, "--extra-csv")):
        if path is None:
            continue
        table = read_csv(path, what, dtype=str)
        id_col = next((c for c in ID_COLUMNS if c in table.columns), None)
        if id_col is None:
            raise UserError(f"{path} has no image id column (isic_id or image_name) to join by; columns: "
                            f"{str(list(table.columns))[:300]}")
        ids = table[id_col].astype(str).str.strip()
        if ids.duplicated().any():
            raise UserError(f"{path}: duplicate image ids, e.g. {ids[ids.duplicated()].iloc[0]!r}")
        new = [c for c in table.columns if c not in joined.columns and c not in ID_COLUMNS
               and not c.startswith("Unnamed:")]
        missing = ~frame["isic_id"].isin(set(ids))
        if missing.any():
            raise UserError(f"{path}: {int(missing.sum())} of {len(frame)} images have no row there (joined by "
                            f"{id_col}), e.g. {', '.join(frame['isic_id'][missing].iloc[:3])}: is it the file of "
                            f"this dataset?")
        joined = joined.merge(table[new].assign(isic_id=ids), on="isic_id", how="left", validate="many_to_one")
    return joined


def pair_label_codes(frame: pd.DataFrame, kind: str, source: str = "the metadata") -> np.ndarray:
    """Integer labels for contrastive pairs: the target, or one code per diagnosis (sorted names; empty = unknown)."""
    if kind == "target":
        return frame["target"].to_numpy()
    if "diagnosis" not in frame.columns:
        raise UserError(f"--pair-labels diagnosis needs a 'diagnosis' column, which {source} lacks: add one with "
                        f"--extra-csv, e.g. the official ISIC_2020_Training_GroundTruth.csv")
    names = frame["diagnosis"].fillna("unknown").astype(str).str.strip().str.lower().replace("", "unknown")
    return np.searchsorted(np.unique(names), names)
