import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The real-data tests read the data folder from one environment variable, ISIC_DATA: a folder in the Kaggle
# "ISIC 2020 JPG 256x256 RESIZED" layout, optionally with the official ground-truth and duplicates CSVs beside it.
# Unset, they look for the development copy beside the repository.
DATA_VARIABLE = "ISIC_DATA"
FALLBACK = ROOT.parent / "shared" / "data"
SAMPLE = Path(os.environ.get(DATA_VARIABLE) or FALLBACK / "isic2020-sample")
METADATA = Path(os.environ.get(DATA_VARIABLE) or FALLBACK / "isic2020-metadata")

from isic.demo import make_dataset  # noqa: E402

# The smallest real run, shared by every test that trains (mark those tests `slow`).
TINY_FLAGS = ["--backbone", "resnet18", "--img-size", "32", "--batch-size", "16", "--embedding-dim", "16", "--no-tsne"]


def tiny(epochs: int, workers: int | None = 0) -> list[str]:
    """TINY_FLAGS for `epochs` epochs; workers=None keeps the default number of loader workers."""
    return [*TINY_FLAGS, "--epochs", str(epochs), *([] if workers is None else ["--workers", str(workers)])]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 160-image synthetic dataset in the Kaggle layout (about 15% malignant)."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_images=160, malignant_rate=0.2, size=40, seed=1)


def cli(script, *args):
    """Run a script of the repository (driver.py, predict.py) as a user types it; its output is kept, not printed."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def needs(*paths: Path):
    """Skip unless every path exists, saying which is missing and which variable points the tests at the data."""
    missing = next((path for path in paths if not path.exists()), None)
    where = f"${DATA_VARIABLE}" if os.environ.get(DATA_VARIABLE) else f"the fallback (${DATA_VARIABLE} is not set)"
    return pytest.mark.skipif(missing is not None, reason=f"real ISIC data not found: {missing} is missing; "
                              f"looked in {where}; set {DATA_VARIABLE} to your data folder (see README, Tests)")
