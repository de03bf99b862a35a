import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tiny models run fastest on one thread each (more threads only wait on each other), and `make test` runs two tests
# at once (pytest-xdist); every run a test starts inherits this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that `make(folder)` fills once per test session, also when pytest-xdist runs the session in several
    processes: the first to need it makes it under a lock, the others wait and reuse it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 160-image synthetic dataset in the Kaggle layout (about 15% malignant)."""
    return made_once(tmp_path_factory, "tiny",
                     lambda folder: make_dataset(folder, n_images=160, malignant_rate=0.2, size=40, seed=1))


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory):
    """The one tiny reference run of a test session (the command line, 2 epochs, TTA), shared by every test that only
    reads a finished run; a test that writes into a run takes `run_copy`. Returns (run folder, the command's result)."""
    def train(folder):
        result = cli("driver.py", "--data-dir", tiny_data, "--out", folder / "run", "--cache-dir", folder / "cache",
                     *tiny(2), "--tta")
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)
    folder = made_once(tmp_path_factory, "finished", train)
    stdout = (folder / "stdout.txt").read_text()
    return folder / "run", subprocess.CompletedProcess("driver.py", 0, stdout, "")


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the shared run for a test that writes into it (predict.py --run rewrites its evaluations)."""
    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def cli(script, *args):
    """Run a script of the repository (driver.py, predict.py) as a user types it; its output is kept, not printed."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def in_process(script, *args) -> int:
    """`script`'s main() on these arguments in this process, returning its exit code: what `cli` runs, without the
    7 s of CPU a new Python pays to import torch. For tests whose promise is not the process itself (a kill, an exit
    before the imports, a launcher); its output goes to capsys. sys.argv reads as the user's command meanwhile (runs
    record it in commands.txt)."""
    argv, typed = [str(a) for a in args], sys.argv
    sys.argv = [script, *argv]
    try:
        return importlib.import_module(Path(script).stem).main(argv)
    finally:
        sys.argv = typed


def needs(*paths: Path):
    """Skip unless every path exists, saying which is missing and which variable points the tests at the data."""
    missing = next((path for path in paths if not path.exists()), None)
    where = f"${DATA_VARIABLE}" if os.environ.get(DATA_VARIABLE) else f"the fallback (${DATA_VARIABLE} is not set)"
    return pytest.mark.skipif(missing is not None, reason=f"real ISIC data not found: {missing} is missing; "
                              f"looked in {where}; set {DATA_VARIABLE} to your data folder (see README, Tests)")
