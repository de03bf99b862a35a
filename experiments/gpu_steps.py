"""The steps of experiments/gpu_check.py and the context they share (Check): each step runs part of the GPU workflow
in child processes, checks what it wrote, and returns one line of details or raises Failure / Skipped."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels"
FULL = ["--backbone", "resnet50", "--img-size", "256", "--no-tsne"]  # a default run's model, batch and precision
TINY = ["--backbone", "resnet18", "--img-size", "32", "--batch-size", "16", "--embedding-dim", "16", "--no-tsne"]
SECOND_BACKBONE = {False: "efficientnet_b3", True: "test_efficientnet"}  # --tiny: timm's 0.1M-parameter test model
RUN_FILES = ["config.json", "splits.csv", "data_report.txt", "history.csv", "best.pt", "last.pt", "loss.png",
             "accuracy.png", "auroc.png", "pauc.png", "val/metrics.json", "test/metrics.json",
             "test/predictions.csv"]
# Re-scoring on a GPU may pick other cuDNN kernels, whose bf16 rounding moves scores and embeddings slightly. Rank
# metrics of the scores barely move; a metric of discrete events (an image on either side of the threshold, a query's
# nearest training lesions) may move by an event or two; sizes (n, queries, R, references) must not move at all.
METRIC_TOLERANCE = 1e-3
EVENT_RATES = {"accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "ece",
               "ece_prior_corrected", "precision_at_1", "r_precision", "mean_average_precision_at_r",
               "visual_agreement@5", "hub_share@5"}
EVENT_COUNTS = {"confusion_matrix", "hub_max@5"}


def tolerance(key: str) -> float:
    return 0.02 if key in EVENT_RATES else 2 if key in EVENT_COUNTS else METRIC_TOLERANCE


class Failure(Exception):
    """A step's check did not hold; the message is its one-line reason."""


class Skipped(Exception):
    """A step that cannot run here (no CUDA, --tiny); the message says why."""


class Check:
    """The steps' shared context: flags, folders, the log, the time budget and the environment of child processes."""

    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.cuda = args.device == "cuda"
        self.out = Path(args.out)
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
        self.cache = self.work / "cache"
        self.log = self.out / "steps.log"
        self.deadline = time.monotonic() + args.budget
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.flags = (TINY if self.tiny else FULL) + ["--device", args.device, "--cache-dir", str(self.cache)]
        self.data = self.work / "data"
        self.runs = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, args, limit: float, name: str) -> str:
        """Run `args` (from the repository root) within `limit` seconds; its output goes to the log and is returned.
        A child that overruns is killed with everything it started (loader workers, torchrun's processes)."""
        limit = min(limit, self.left())
        if limit < 5:
            raise Failure("not run: the time budget was spent")
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(map(str, args))}\n")
            log.flush()
            child = subprocess.Popen(list(map(str, args)), cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = child.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                output, _ = child.communicate()
                log.write(output)
                raise Failure(f"timed out after {limit:.0f} s") from None
            log.write(output)
        if child.returncode != 0:
            raise Failure(f"exit code {child.returncode}: {last_line(output)}")
        return output

    def driver(self, out, *extra, limit: float, name: str, launcher=(sys.executable,)) -> str:
        return self.command([*launcher, ROOT / "driver.py", "--data-dir", self.data, "--out", out, *self.flags,
                             *extra], limit, name)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ---------------------------------------------------------------- the steps

def environment(c: Check) -> str:
    """Versions, the GPU and its precision; pytorch-metric-learning installed from wheels/ when missing."""
    import torchvision
    pml = f"{ensure_metric_learning(c)}, {ensure_timm(c)}"
    try:
        import utils  # noqa: F401  (refuses, in one line, a torch older than the code supports)
    except SystemExit as e:
        raise Failure(str(e)) from None
    from engine.devices import autocast_dtype
    from utils import version_problem
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {pml}",
             f"{os.cpu_count()} CPU cores, {platform.machine()}"]
    problem = version_problem()
    if problem:
        raise Failure(problem)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = torch.device("cuda", 0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {torch.cuda.device_count()} visible; native bf16: "
                     f"{(props.major, props.minor) >= (8, 0)}; a run's autocast: "
                     f"{str(autocast_dtype(device)).replace('torch.', '')}")
    elif c.cuda:
        raise Failure("PyTorch sees no CUDA GPU (" + "; ".join(lines) + ")")
    else:
        lines.append("no CUDA GPU: dry run on the CPU")
    return "<br>".join(lines)


def ensure_metric_learning(c: Check) -> str:
    return ensure_wheel(c, "pytorch_metric_learning", "pytorch-metric-learning")


def ensure_timm(c: Check) -> str:
    return ensure_wheel(c, "timm", "timm")


def ensure_wheel(c: Check, module: str, name: str) -> str:
    """`name` as installed, or installed from its wheel in wheels/ (no network needed) into the work folder."""
    if importlib.util.find_spec(module):
        return f"{name} {importlib.import_module(module).__version__}"
    wheels = sorted(WHEELS.glob(f"{module}-*.whl"))
    if not wheels:
        raise Failure(f"{name} is not installed and {WHEELS} holds no wheel of it")
    site = c.work / "site-packages"
    c.command([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--target", site, wheels[-1]], 120, f"install {name}")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    if str(site) not in c.env.get("PYTHONPATH", "").split(os.pathsep):
        c.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), c.env.get("PYTHONPATH")]))
    return f"{name} from {wheels[-1].name} (was missing)"


def gpu_test_files() -> list[str]:
    """The test files that mark tests `gpu`: collecting only them spares importing the whole suite."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def gpu_tests(c: Check) -> str:
    output = c.command([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        *gpu_test_files()], 180, "tests marked gpu")
    summary = last_line(output).strip("= ")
    if "skipped" in summary and not c.cuda:
        return f"{summary} (no CUDA: the gpu tests skip themselves)"
    return summary


def generate_data(c: Check) -> str:
    from isic.demo import make_dataset
    n, side = (120, 40) if c.tiny else (3000, 96)  # the run resizes to --img-size; small files generate fast
    if not (c.data / "train-metadata.csv").is_file():
        make_dataset(c.data, n_images=n, malignant_rate=0.2 if c.tiny else 0.15, size=side, seed=0)
    return f"{n} synthetic images ({side} px JPEGs) in {c.data}"


def train(c: Check) -> str:
    out = c.work / "run"
    shutil.rmtree(out, ignore_errors=True)
    output = c.driver(out, "--epochs", "2", limit=150, name="train 2 epochs")
    c.runs["train"] = out
    return run_summary(out, output)


def run_summary(out: Path, output: str) -> str:
    """Check that the run wrote every output; its epoch times and AUROCs."""
    import pandas as pd
    missing = [name for name in RUN_FILES if not (out / name).is_file()]
    if missing:
        raise Failure(f"missing in {out}: {', '.join(missing)}")
    leftovers = [p.name for p in out.rglob(".*.tmp")]
    if leftovers:
        raise Failure(f"temporary files left in {out}: {', '.join(leftovers)}")
    history = pd.read_csv(out / "history.csv")
    test = json.loads((out / "test" / "metrics.json").read_text())
    first = next(line for line in output.splitlines() if line.startswith("run folder:"))
    return (f"{first.split('   ', 1)[1]}<br>epochs {list(history['epoch'])} in "
            f"{', '.join(f'{s:.1f}' for s in history['seconds'])} s; val AUROC "
            f"{', '.join(f'{a:.3f}' for a in history['val_auroc'])}; test AUROC {test.get('auroc', float('nan')):.3f}; "
            f"all {len(RUN_FILES)} outputs written")


def rescore(c: Check) -> str:
    """predict.py --run on a copy of the run (less its test/ folder) must reproduce the test metrics."""
    from experiments.comparison import differences
    if "train" not in c.runs:
        raise Skipped("skipped: the training step did not finish")
    source, copy = c.runs["train"], c.work / "rescored"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy, ignore=lambda folder, names: ["test"] if Path(folder) == source else [])
    c.command([sys.executable, ROOT / "predict.py", "--run", copy, "--device", c.args.device], 120, "re-score")
    found = differences(source, copy)
    if not found:
        return "predict.py --run reproduced test/metrics.json byte for byte"
    if found != ["test/metrics.json: differs"]:
        raise Failure("; ".join(found))
    differing = differing_metrics(json.loads((source / "test/metrics.json").read_text()),
                                  json.loads((copy / "test/metrics.json").read_text()))
    beyond = [f"{where} differs by {difference:.2g} (tolerance {allowed:g})"
              for where, difference, allowed in differing if difference > allowed]
    if beyond:
        raise Failure("test metrics not reproduced: " + "; ".join(beyond[:3]))
    if not differing:
        return "predict.py --run reproduced every value of test/metrics.json"
    where, difference, allowed = max(differing, key=lambda d: d[1] / d[2])
    return (f"test metrics reproduced within tolerance: {len(differing)} values differ, the nearest to its limit "
            f"{where} by {difference:.2g} of {allowed:g} (GPU kernels are not bit-repeatable)")


def differing_metrics(a, b, where="", key="") -> list[tuple[str, float, float]]:
    """(where, absolute difference, tolerance) of every value that differs between two JSON values of one shape; a
    list's items take the tolerance of the key that holds the list."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [found for k in a for found in differing_metrics(a[k], b[k], f"{where}.{k}".strip("."), k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [found for i, (x, y) in enumerate(zip(a, b)) for found in
                differing_metrics(x, y, f"{where}[{i}]", key)]
    if a == b or (a != a and b != b):
        return []
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return [(where, abs(a - b) if numbers else float("inf"), tolerance(key))]


def kill_and_resume(c: Check) -> str:
    """SIGKILL a run as soon as history.csv shows its first epoch, resume it, and compare with the uninterrupted run."""
    from experiments.comparison import differences
    out = c.work / "killed"
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, ROOT / "driver.py", "--data-dir", c.data, "--out", out, *c.flags, "--epochs", "2"]
    with open(c.log, "a") as log:
        log.write(f"\n===== kill after epoch 1: {' '.join(map(str, args))}\n")
        log.flush()
        child = subprocess.Popen(list(map(str, args)), cwd=ROOT, env=c.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        limit = time.monotonic() + min(120, c.left())
        while child.poll() is None and time.monotonic() < limit and epochs_done(out) < 1:
            time.sleep(0.02)
        finished = child.poll() is not None
        os.killpg(child.pid, signal.SIGKILL)  # the run and its loader workers, as a power cut would
        child.wait()
    if finished:
        raise Failure(f"the run ended (exit code {child.returncode}) before it could be killed; see steps.log")
    if epochs_done(out) != 1:
        raise Failure("the first epoch did not finish in time")
    output = c.command([sys.executable, ROOT / "driver.py", "--resume", out], 120, "resume")
    # last.pt is written in the background: a kill just after epoch 1 may leave epoch 0's whole, and epoch 1 replays
    resumed = re.search(r"resuming at epoch ([12]) of 2", output)
    if not resumed:
        raise Failure(f"the resumed run did not continue at epoch 1 or 2: {last_line(output)}")
    if epochs_done(out) != 2:
        raise Failure("the resumed run did not record epoch 2")
    same = "train" in c.runs and not differences(c.runs["train"], out)
    return (f"killed after epoch 1, resumed at epoch {resumed[1]}, finished; "
            + ("identical to the uninterrupted run" if same else
               "results differ from the uninterrupted run's (expected on GPUs: cuDNN benchmark mode and atomic "
               "adds are not bit-repeatable; on the CPU they must match)" if c.cuda else "DIFFERS"))


def second_backbone(c: Check) -> str:
    """A timm trunk (EfficientNet-B3, the ISIC 2020 winners' family) trains 2 epochs with every output, and exports."""
    backbone = SECOND_BACKBONE[c.tiny]
    out = c.work / "second-backbone"
    shutil.rmtree(out, ignore_errors=True)
    output = c.driver(out, "--backbone", backbone, "--epochs", "2", limit=180, name=f"train {backbone}")
    exported = c.command([sys.executable, ROOT / "export.py", "--run", out, "--check", "4"], 120, f"export {backbone}")
    return f"{backbone}: {run_summary(out, output)}<br>{last_line(exported)}"


def epochs_done(out: Path) -> int:
    try:
        return max(0, len((out / "history.csv").read_text().strip().splitlines()) - 1)
    except OSError:
        return 0


def bench(c: Check, compiled: bool) -> str:
    if compiled and c.tiny:
        raise Skipped("skipped: --tiny (compiling takes minutes on a CPU; tests/test_gpu.py compiles a tiny model)")
    result = c.out / f"bench-{'compiled' if compiled else 'eager'}.json"
    case = ["--cases", "tiny", "--device", c.args.device] if c.tiny else ["--cases", "cuda50"]
    c.command([sys.executable, "-m", "experiments.bench", *case, "--compile", "yes" if compiled else "no",
               "--data-dir", c.data, "--work-dir", c.work, "--json", result], 240 if compiled else 150,
              "bench" + (" --compile" if compiled else ""))
    rows = json.loads(result.read_text())
    return "<br>".join(f"{r['case']} ({r['precision']}, batch {r['batch_size']}, {r['workers']} workers): train "
                       f"{r['train']:.0f} images/s = {r['train'] / r['bare_train']:.2f} of the bare model's "
                       f"{r['bare_train']:.0f}; evaluate {r['evaluate']:.0f} = "
                       f"{r['evaluate'] / r['bare_evaluate']:.2f} of {r['bare_evaluate']:.0f}; input pipeline "
                       f"{r['loader']:.0f} = {r['loader'] / r['bare_train']:.1f}x what the model consumes"
                       for r in rows)


def torchrun(c: Check) -> str:
    out = c.work / "torchrun"
    shutil.rmtree(out, ignore_errors=True)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    output = c.driver(out, "--epochs", "1", limit=120, name="torchrun", launcher=launcher)
    backend = "nccl" if c.cuda else "gloo"
    if f"backend {backend}" not in output:
        raise Failure(f"the run did not report the {backend} backend")
    missing = [name for name in RUN_FILES if not (out / name).is_file()]
    if missing:
        raise Failure(f"missing in {out}: {', '.join(missing)}")
    return f"1 process, backend {backend}, 1 epoch: all outputs written"


def sample(c: Check) -> str:
    if not c.args.sample:
        raise Skipped("skipped: no --sample given")
    out = c.work / "sample"
    shutil.rmtree(out, ignore_errors=True)
    output = c.command([sys.executable, ROOT / "driver.py", "--data-dir", c.args.sample, "--out", out, *c.flags,
                        "--epochs", "2"], 150, "real sample")
    return run_summary(out, output)
