import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = SHARED / "isic2020-sample"
METADATA = SHARED / "isic2020-metadata"

from demo import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 160-image synthetic dataset in the Kaggle layout (about 15% malignant)."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_images=160, malignant_rate=0.2, size=40, seed=1)


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real ISIC data not found at {path}")
