"""One prepared GPU measurement, in one command that fits a 10-minute call: the benchmark cases and the whole default
run on a full-scale generated set, written into one results file.

    make gpu-bench BENCH_OUT=gpu-bench-out                          # = the next line, with the machine's python3
    python -m experiments.gpu_bench --out OUT                       # CUDA machine
    python -m experiments.gpu_bench --out OUT --tiny --device cpu   # dry run: tiny sizes, every path in a minute or two

Steps, each added to OUT/results.md as soon as it is done (a kill keeps what was measured):
1. benchmark cases (experiments/bench.py's `case`: the real training loop, the bare step, evaluation, the input
   pipeline) on a 3,000-image generated set at 256 px: batch 64, 128 and 256, from images held in GPU memory
   (--resident on) and from the loader (--resident off), eagerly;
2. the whole default run (driver.py with no flags but the data and the folders: 15 epochs of ResNet50 at 256 px) on
   33,126 generated 256 px images of ISIC 2020's shape (experiments/scale_check.py's generator, every image in the
   Kaggle 256 x 256 layout), timed from its start to report.html, with its timings.json phase table; the generated
   set and the image cache are made before the clock starts;
3. while the budget lasts: the batch-64 cases again with --compile (compiling takes about a minute each).
Generated data, caches and the run go to --work-dir; OUT receives only results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataset import hold_on_device, prepare_data
from engine import timings
from engine.config import Settings
from experiments.bench import case
from experiments.scale_check import IMAGES, MALIGNANT, PATIENTS, generate
from isic.demo import make_dataset
from workflow.pipeline import CACHE_BUILD_WORKERS, loader_workers

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 560  # every step together, inside a 10-minute device call with the start-up around it
KAGGLE_SIZES = ((1.0, [(256, 256)], 400),)  # every image 256 x 256, as in the Kaggle resized set


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one measurement runs: the full sizes on a GPU, or tiny ones for a dry run."""
    bench_images: int = 3000
    bench_side: int = 96
    bench: dict = dataclasses.field(default_factory=lambda: dict(backbone="resnet50", img_size=256))
    batches: tuple = (64, 128, 256)
    bare_steps: int = 20
    run_images: int = IMAGES
    run_patients: int = PATIENTS
    run_malignant: float = MALIGNANT
    run_size: int = 256
    run_flags: tuple = ()
    run_sizes: tuple = KAGGLE_SIZES
    compiled_batches: tuple = (64,)


TINY = Plan(bench_images=120, bench_side=40, batches=(16,), bare_steps=2, run_images=200, run_patients=100,
            run_malignant=0.25, run_size=32,
            bench=dict(backbone="resnet18", img_size=32, eval_batch_size=64, embedding_dim=16),
            run_flags=("--backbone", "resnet18", "--img-size", "32", "--batch-size", "16", "--embedding-dim", "16",
                       "--epochs", "1", "--no-tsne", "--workers", "0", "--resident", "on"),
            run_sizes=((1.0, [(64, 64)], 8),), compiled_batches=())


class Results:
    """OUT/results.md, rewritten after every step."""

    def __init__(self, path: Path, title: str):
        self.path, self.sections = path, [title]

    def add(self, *lines: str) -> None:
        self.sections += ["", *lines]
        self.path.write_text("\n".join(self.sections) + "\n")


def environment(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {gpu}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
            f"code of commit {commit or 'unknown'}")


def bench_rows(results: list[dict]) -> list[str]:
    rows = ["| case | batch | images | compiled | train loop | bare step | loop/bare | evaluation | bare forward | "
            "evaluation/bare | input pipeline |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['case']} | {r['batch_size']} | {r['images']} | {'yes' if r['compile'] else 'no'} | "
                    f"{r['train']:.0f} | {r['bare_train']:.0f} | {r['train'] / r['bare_train']:.2f} | "
                    f"{r['evaluate']:.0f} | {r['bare_evaluate']:.0f} | {r['evaluate'] / r['bare_evaluate']:.2f} | "
                    f"{r['loader']:.0f} |")
    return rows


def bench_data(plan: Plan, work: Path, device: torch.device):
    data_dir = work / f"bench-{plan.bench_images}"
    if not data_dir.exists():
        make_dataset(data_dir, n_images=plan.bench_images, size=plan.bench_side, seed=0)
    s = dataclasses.replace(Settings(data_dir=str(data_dir), cache_dir=str(work / "cache")), **plan.bench)
    s.workers = loader_workers(device, cached=True)
    return s, prepare_data(dataclasses.replace(s, workers=CACHE_BUILD_WORKERS))


def run_cases(cases, s, data, device, plan: Plan, out: Results, done: list, deadline: float, cost_s: float):
    """Each (batch, resident, compiled) case while at least cost_s seconds of the budget are left."""
    held = hold_on_device(data, "on", device)
    for batch, resident, compiled in cases:
        if time.monotonic() + cost_s > deadline:
            out.add(f"- skipped for the budget: batch {batch}, {'resident' if resident else 'loader'}"
                    f"{', compiled' if compiled else ''}")
            continue
        label = f"{s.backbone} {s.img_size}px, {'resident' if resident else f'loader, {s.workers} workers'}"
        r = case(label, dataclasses.replace(s, batch_size=batch), device, held if resident else data,
                 plan.bare_steps, compiled)
        done.append({**r, "case": label, "images": "resident" if resident else "loader"})
        print("\n".join(bench_rows(done[-1:])[2:]), flush=True)


def full_run(plan: Plan, work: Path, device: torch.device, out: Results, deadline: float, tiny: bool) -> None:
    """The default run on the generated full-scale set, timed from its start to report.html."""
    images = plan.run_images
    root = generate(work / f"scale-{images}", images, plan.run_patients, sizes=plan.run_sizes,
                    malignant=plan.run_malignant)
    s = Settings(data_dir=str(root), cache_dir=str(work / "cache"), img_size=plan.run_size)
    prepare_data(dataclasses.replace(s, workers=CACHE_BUILD_WORKERS))  # the image cache, before the clock starts
    run_dir = work / "default-run"
    command = [sys.executable, "driver.py", "--data-dir", str(root), "--cache-dir", str(work / "cache"),
               "--out", str(run_dir), "--overwrite", "--device", device.type, *plan.run_flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if tiny else {})}  # a dry run shares a small CPU
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(10.0, deadline - started))
        status, tail = f"exit code {done.returncode}", (done.stdout + done.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        status, tail = "stopped by the budget (the table holds the phases it finished)", []
    seconds = time.monotonic() - started
    report = (run_dir / "report.html").is_file()
    phases = timings.read(run_dir / "timings.json")
    out.add(f"## The default run on {images:,} generated images", "",
            f"`{' '.join(command[1:])}`", "",
            f"{status}; {seconds:.1f} s from start to {'report.html' if report else 'the end (no report.html)'}; "
            f"timings.json: {timings.summary(phases)}", "", *[f"    {line}" for line in tail], "",
            "```", timings.format_table(phases) if phases else "(no timings.json)", "```")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for results.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (resnet18, 32 px, 200 images): a dry run")
    p.add_argument("--work-dir", help="generated data, caches and the run (default: a new temporary folder)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    args = p.parse_args(argv)
    plan, device = TINY if args.tiny else Plan(), torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; --device cpu --tiny is the dry run", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-bench-"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Results(Path(args.out) / "results.md", f"# GPU measurement{' (dry run, --tiny)' if args.tiny else ''}, "
                                                 f"--device {device.type}")
    out.add(environment(device))
    s, data = bench_data(plan, work, device)
    done: list[dict] = []
    eager = [(batch, resident, False) for batch in plan.batches for resident in (True, False)]
    run_cases(eager, s, data, device, plan, out, done, deadline - 0.6 * args.budget, cost_s=5)
    out.add("## Benchmark, images/s", "", *bench_rows(done))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the run is another process: leave it the memory the cases held
    full_run(plan, work, device, out, deadline - 0.05 * args.budget, args.tiny)
    compiled = [(batch, resident, True) for batch in plan.compiled_batches for resident in (True, False)]
    if compiled:
        run_cases(compiled, s, data, device, plan, out, done, deadline, cost_s=90)
        out.add("## Benchmark with --compile, images/s", "", *bench_rows([r for r in done if r["compile"]]))
    print(f"results: {out.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
