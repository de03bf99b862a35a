"""Run every shell command of README.md, as written, on generated demo data.

    python -m experiments.readme_check              # make readme-check
    python -m experiments.readme_check --keep /tmp/walk

The repository's files (tracked, and new ones git does not ignore) are copied to a temporary folder: a fresh clone
sharing this .venv. There, a small synthetic dataset in the Kaggle layout, with the official ground-truth and
duplicates CSVs beside it, becomes ISIC_DATA, and `new-images/` and `other-data/` are made for the commands that name
them. Then each command of the README's ```bash blocks runs in that folder, in order, after `source
.venv/bin/activate`. Commands that train get tiny settings appended (typed flags win, so the last ones count), so the
walk takes minutes on a CPU; `make` is told that the .venv is installed. A command whose comment carries a tag ([GPU],
[download], [long]) is listed, not run.
Exits 1 if any command failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isic.demo import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"\[(GPU|download|long)\]")
COMMENT = re.compile(r"\s+#.*$")
TRAINS = re.compile(r"driver\.py|experiments\.(crossval|fold_ensemble|ablation)")
TINY = "--backbone resnet18 --img-size 32 --batch-size 16 --embedding-dim 16 --epochs 1 --no-tsne --workers 0"
SELF = re.compile(r"readme[-_]check")


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, continuation lines joined, comment-only and blank lines left out."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def skip_reason(command: str) -> str | None:
    if SELF.search(COMMENT.sub("", command)):
        return "the walk itself"
    comment = command[len(COMMENT.sub("", command)):]
    tags = TAG.findall(comment)
    return " ".join(f"[{tag}]" for tag in tags) if tags else None


def as_walked(command: str) -> str:
    """The command with tiny training settings appended, and `make` told that .venv is up to date."""
    command = COMMENT.sub("", command)
    if TRAINS.search(command) and "--resume" not in command and "--check-data" not in command:
        command = f"{command} {TINY}"
    return re.sub(r"^make\b", "make -o .venv/.installed", command)


def official_csvs(data: Path, seed: int = 0) -> None:
    """The official CSVs' columns for a demo dataset: age, sex, site, diagnosis; two duplicate pairs."""
    frame = pd.read_csv(data / "train-metadata.csv")
    rng = np.random.default_rng(seed)
    n = len(frame)
    pd.DataFrame({
        "image_name": frame["isic_id"], "patient_id": frame["patient_id"],
        "sex": rng.choice(["male", "female"], n), "age_approx": rng.choice(np.arange(20, 90, 5), n),
        "anatom_site_general_challenge": rng.choice(["torso", "lower extremity", "head/neck"], n),
        "diagnosis": np.where(frame["target"] == 1, "melanoma", rng.choice(["nevus", "unknown"], n)),
        "benign_malignant": np.where(frame["target"] == 1, "malignant", "benign"), "target": frame["target"],
    }).to_csv(data / "ISIC_2020_Training_GroundTruth.csv", index=False)
    same_patient = frame[frame["patient_id"].duplicated(keep=False)].groupby("patient_id")["isic_id"].agg(list)
    pairs = [ids[:2] for ids in same_patient.iloc[:2]]
    pd.DataFrame(pairs, columns=["image_name_1", "image_name_2"]).to_csv(
        data / "ISIC_2020_Training_Duplicates.csv", index=False)



def renumber(folder: Path, first: int) -> Path:
    """Give a generated dataset image ids of its own (ISIC_<first>...): the demo generator numbers every dataset
    alike, and predict.py leaves out images whose id the run trained on."""
    csv = folder / "train-metadata.csv"
    frame = pd.read_csv(csv, index_col=0)
    renamed = {old: f"ISIC_{first + k:07d}" for k, old in enumerate(frame["isic_id"])}
    for old, new in renamed.items():
        (folder / "train-image" / "image" / f"{old}.jpg").rename(folder / "train-image" / "image" / f"{new}.jpg")
    frame["isic_id"] = frame["isic_id"].map(renamed)
    frame.to_csv(csv)
    return folder

def prepare(work: Path) -> dict:
    """A fresh copy of the repository with its data; returns the environment the commands run in."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    (work / ".venv").symlink_to((ROOT / ".venv").resolve())
    data = make_dataset(work / "data" / "isic", n_images=800, malignant_rate=0.2, size=32, seed=1)
    official_csvs(data)
    renumber(make_dataset(work / "other-data", n_images=60, malignant_rate=0.3, size=32, seed=2), 8_000_000)
    new = renumber(make_dataset(work / "scratch", n_images=5, malignant_rate=0.5, size=40, seed=3), 8_100_000)
    shutil.copytree(new / "train-image" / "image", work / "new-images")
    # One thread per command unless told otherwise: the walk is about whether commands run, and on a shared CPU
    # PyTorch's threads spin-wait for each other.
    return {"OMP_NUM_THREADS": "1", **os.environ, "ISIC_DATA": str(data)}


def walk(commands: list[str], work: Path, env: dict) -> list[str]:
    """Run the commands in order; returns those that failed."""
    failed = []
    for i, command in enumerate(commands, 1):
        reason = skip_reason(command)
        if reason:
            print(f"[{i}/{len(commands)}] skipped {reason}: {command}", flush=True)
            continue
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {as_walked(command)}"], cwd=work,
                                env=env, capture_output=True, text=True)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"[{i}/{len(commands)}] {status} in {time.perf_counter() - start:.0f} s: {command}", flush=True)
        if result.returncode:
            failed.append(command)
            print("    " + "\n    ".join((result.stdout + result.stderr).strip().splitlines()[-8:]), flush=True)
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="the file whose commands are walked")
    p.add_argument("--keep", help="walk in this new folder and keep it (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    commands = readme_commands(Path(args.readme).read_text())
    work = Path(args.keep or tempfile.mkdtemp(prefix="readme-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        failed = walk(commands, work, prepare(work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(commands) - len(failed)} of {len(commands)} README commands passed or were skipped by their tag; "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
