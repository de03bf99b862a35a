"""Copy a random set of whole patients of a dataset into a new folder in the Kaggle 256 px layout.

    python sample.py --data-dir "$ISIC_DATA" --out data/my-sample --patients 300

Patients are drawn, not images, so a patient's images stay together; patients with a melanoma and without are drawn
in their proportion in the data. The official ground-truth and duplicates CSVs, when they lie in the data folder,
are copied too, cut to the sampled images.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from engine.config import COUNT, Parser, Settings, add_settings
from isic.metadata import ID_COLUMNS, find_layout, load_metadata, locate_images, read_csv
from utils import UserError, cli_main, write_csv

OFFICIAL_CSVS = ("ISIC_2020_Training_GroundTruth.csv", "ISIC_2020_Training_Duplicates.csv")


def draw_patients(frame: pd.DataFrame, n_patients: int, seed: int) -> pd.Series:
    """A mask of the images of `n_patients` random patients, stratified by whether a patient has a melanoma."""
    patient = frame["patient_id"].fillna(frame["isic_id"])  # an image without a patient is a patient of its own
    has_melanoma = frame.groupby(patient)["target"].max()
    if not 2 <= n_patients < len(has_melanoma):
        raise UserError(f"--patients must be from 2 to {len(has_melanoma) - 1}: the data has {len(has_melanoma)}")
    chosen, _ = train_test_split(has_melanoma.index, train_size=n_patients, stratify=has_melanoma, random_state=seed)
    return patient.isin(set(chosen))


def copy_official_csvs(data_dir: Path | None, out: Path, ids: set) -> None:
    for name in OFFICIAL_CSVS:
        if data_dir is None or not (data_dir / name).is_file():
            continue
        table = read_csv(data_dir / name, name)
        keep = table.isin(ids).any(axis=1) if "Duplicates" in name else table["image_name"].isin(ids)
        write_csv(out / name, table[keep])


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    add_settings(p, ["data_dir", "csv", "image_dir", "seed"])
    p.set_defaults(seed=Settings().seed)  # the default its help names
    p.add_argument("--out", required=True, help="the new folder (must not exist yet)")
    p.add_argument("--patients", type=COUNT, required=True, help="how many patients to draw")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out} already exists; choose a new folder")
    csv_path, image_dir = find_layout(args.data_dir, args.csv, args.image_dir)
    frame = load_metadata(csv_path)
    paths, problem = locate_images(frame["isic_id"], image_dir)
    if problem:
        raise UserError(problem)
    chosen = draw_patients(frame, args.patients, args.seed)
    rows = read_csv(csv_path, "metadata CSV")[chosen.to_numpy()]
    (out / "train-image" / "image").mkdir(parents=True)
    for path in (path for path, keep in zip(paths, chosen) if keep):
        shutil.copy2(path, out / "train-image" / "image" / path.name)
    id_column = next(c for c in ID_COLUMNS if c in rows.columns)
    # Kaggle's file starts with an unnamed index column, which pandas reads back as "Unnamed: 0".
    write_csv(out / "train-metadata.csv", rows.rename(columns={id_column: "isic_id", "Unnamed: 0": ""}))
    copy_official_csvs(Path(args.data_dir) if args.data_dir else None, out, set(frame["isic_id"][chosen]))
    print(f"{out}: {int(chosen.sum())} images ({int(frame['target'][chosen].sum())} malignant) "
          f"of {args.patients} patients")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
