"""Patient metadata as model input: age, sex and anatomic site as numbers, the encoding fitted on the training split.

Age is standardised (mean and standard deviation of the training split) with a missing-value indicator; a missing age
becomes the training mean (0 after scaling). Sex and site are one-hot over the categories seen in training plus
"unknown", which takes missing values and every category training never saw. The fitted encoding is plain JSON
(metadata_encoder.json in the run folder), so predict.py encodes new data exactly as training did.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from engine.distributed import is_main, on_main
from utils import UserError, write_json

# Field → the column names it goes by: the official ground truth and Kaggle's train.csv, then the ISIC archive's.
SOURCES = {"age": ("age_approx", "age"), "sex": ("sex",),
           "site": ("anatom_site_general_challenge", "anatom_site_general", "anatom_site")}
UNKNOWN = "unknown"
ENCODER_FILE = "metadata_encoder.json"


def parse_fields(text: str) -> list[str]:
    """--metadata age,sex,site → the fields in a fixed order; '' or 'none' → []."""
    wanted = [f.strip() for f in text.split(",") if f.strip() and f.strip() != "none"]
    unknown = set(wanted) - set(SOURCES)
    if unknown:
        raise UserError(f"--metadata: unknown field(s) {', '.join(sorted(unknown))}; choose from {', '.join(SOURCES)}")
    return [f for f in SOURCES if f in wanted]


def find_columns(frame: pd.DataFrame, fields: list[str]) -> dict[str, str]:
    columns = {}
    for name in fields:
        found = next((c for c in SOURCES[name] if c in frame.columns), None)
        if found is None:
            raise UserError(f"--metadata {name} needs a column {' or '.join(SOURCES[name])}, which the metadata lacks; "
                            "add one with --extra-csv, e.g. the official ISIC_2020_Training_GroundTruth.csv")
        columns[name] = found
    return columns


def categories_of(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().str.lower().fillna(UNKNOWN).replace("", UNKNOWN)


@dataclass
class MetadataEncoder:
    columns: dict[str, str]                        # field → CSV column
    age_mean: float = 0.0
    age_scale: float = 1.0
    categories: dict[str, list[str]] = field(default_factory=dict)  # sex/site → known values, "unknown" last

    @classmethod
    def fit(cls, train: pd.DataFrame, fields: list[str]) -> "MetadataEncoder":
        encoder = cls(find_columns(train, fields))
        for name, column in encoder.columns.items():
            if name == "age":
                ages = pd.to_numeric(train[column], errors="coerce").to_numpy(dtype=float)[:, None]
                scaler = StandardScaler().fit(ages)  # NaN ignored in fit
                encoder.age_mean, encoder.age_scale = float(scaler.mean_[0]), float(scaler.scale_[0])
            else:
                seen = sorted(set(categories_of(train[column])) - {UNKNOWN})
                encoder.categories[name] = [*seen, UNKNOWN]
        return encoder

    @property
    def width(self) -> int:
        return sum(2 if name == "age" else len(self.categories[name]) for name in self.columns)

    def feature_names(self) -> list[str]:
        names = []
        for name in self.columns:
            names += ["age", "age_missing"] if name == "age" else [f"{name}={c}" for c in self.categories[name]]
        return names

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, width) float32; new data with missing values, unseen categories or no such column at all (e.g. a
        folder of images without a CSV) is encoded as missing/unknown, never refused."""
        parts = []
        for name in self.columns:
            values = self.column_of(frame, name)
            if name == "age":
                ages = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
                missing = np.isnan(ages)
                parts.append(np.stack([np.where(missing, 0.0, (ages - self.age_mean) / self.age_scale), missing], 1))
            else:
                known = self.categories[name]
                values = categories_of(values).where(lambda v: v.isin(known), UNKNOWN)
                one_hot = OneHotEncoder(categories=[known], sparse_output=False).fit(np.array(known)[:, None])
                parts.append(one_hot.transform(values.to_numpy()[:, None]))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def column_of(self, frame: pd.DataFrame, name: str) -> pd.Series:
        """The field's values under the name training found, else under any other name it goes by (SOURCES: the
        ISIC archive's `age`/`anatom_site_general` for a run trained on the ISIC 2020 names), else all missing."""
        found = next((c for c in (self.columns[name], *SOURCES[name]) if c in frame.columns), None)
        return frame[found] if found else pd.Series([None] * len(frame), dtype="object", index=frame.index)

    def known_counts(self, features: np.ndarray) -> dict[str, int]:
        """Per field, how many rows of `features` have it: an age, or a sex or site among the run's categories."""
        names = self.feature_names()
        flags = {name: names.index("age_missing" if name == "age" else f"{name}={UNKNOWN}") for name in self.columns}
        return {name: int(len(features) - features[:, flag].sum()) for name, flag in flags.items()}

    def unknown_share(self, features: np.ndarray) -> float:
        """The share of the fields, over all images, that `features` codes as missing (age) or unknown (sex, site)."""
        cells = len(features) * len(self.columns)
        return 1 - sum(self.known_counts(features).values()) / cells if cells else 0.0

    def coverage(self, features: np.ndarray) -> str:
        """One line: how many images got each patient fact, e.g. 'age for 740, sex for 738, site for 725 of 740'."""
        known = ", ".join(f"{name} for {n}" for name, n in self.known_counts(features).items())
        return f"patient metadata: {known} of {len(features)} images"

    def save(self, run_dir) -> None:
        write_json(Path(run_dir) / ENCODER_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir) -> "MetadataEncoder":
        path = Path(run_dir) / ENCODER_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing: the run was trained with --metadata and needs its encoder")
        return cls(**json.loads(path.read_text()))


def with_metadata(data, s, run_dir, fit: bool = False):
    """`data` with every row's encoded metadata (data.metadata), for a run with --metadata; unchanged otherwise.

    fit=True (a new run): the encoder is fitted on the training split alone and saved in run_dir (by the writing
    process, the other torchrun ranks waiting for it; every rank fits the same one). Otherwise the run's saved
    encoder is used."""
    if not s.metadata:
        return data
    if fit:
        encoder = MetadataEncoder.fit(data.frame[data.frame["split"] == "train"], parse_fields(s.metadata))
        on_main(lambda: encoder.save(run_dir))  # the other ranks read it next (metadata_width)
    else:
        encoder = MetadataEncoder.load(run_dir)
    data.metadata = encoder.transform(data.frame)
    if fit and is_main():  # one line, not one per torchrun process
        print(encoder.coverage(data.metadata))
    return data


def metadata_width(run_dir, s) -> int:
    """The width of the encoded metadata the run's head reads (0 without --metadata): what build_model needs."""
    return MetadataEncoder.load(run_dir).width if s.metadata else 0


MOSTLY_UNKNOWN = 0.5  # above this share of unknown patient facts, scoring says so


def run_features(run_dir, s, frame: pd.DataFrame) -> np.ndarray | None:
    """The encoded metadata of `frame` the way the run at `run_dir` was trained, or None for a run without it.
    Says so in one line when most of the facts are missing or unknown: the head then sees mostly 'unknown'."""
    if not s.metadata:
        return None
    encoder = MetadataEncoder.load(run_dir)
    features = encoder.transform(frame)
    share = encoder.unknown_share(features)
    print(encoder.coverage(features))
    if share > MOSTLY_UNKNOWN:
        print(f"note: {100 * share:.0f}% of the patient facts ({', '.join(encoder.columns)}) of these {len(frame)} "
              "images are missing or unknown to the run, which was trained with them; give them with --extra-csv")
    return features
