"""One command that proves the GPU workflow on a CUDA machine, and writes what it found to one Markdown summary.

    make gpu-check OUT=gpu-check-out                                    # = the next line, with the machine's python3
    python -m experiments.gpu_check --out gpu-check-out                 # CUDA machine
    python -m experiments.gpu_check --out OUT --sample DATA             # ... also 2 epochs on real images
    python -m experiments.gpu_check --out OUT --device cpu --tiny       # dry run: tiny sizes, gloo; CUDA steps skipped

Steps, each time-limited and reported as pass / FAIL / skipped in OUT/summary.md (exit code 1 if any failed):
environment; the tests marked `gpu`; 2 epochs of ResNet50 at 256 px on generated images, every output checked;
re-scoring that run with predict.py (metrics must be reproduced); a run killed (SIGKILL) after its first epoch and
resumed; bench.py's CUDA case, eager and with --compile; a one-process torchrun (NCCL) training; a second
backbone, timm's EfficientNet-B3, trained 2 epochs and exported.

It needs no network: pytorch-metric-learning and timm, when missing, are installed from the wheels in wheels/. OUT
receives only summary.md, steps.log and the bench numbers (few files, so that they come back from a lent machine);
generated data, runs and caches go to --work-dir.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from experiments.gpu_steps import (ROOT, Check, Failure, Skipped, bench, environment, generate_data, gpu_tests,
                                   kill_and_resume, rescore, sample, second_backbone, torchrun, train)

# All steps together. On one H100 the other steps took about 7 minutes (docs/speed.md); the second backbone's time
# there is still to measure.
BUDGET_S = 600


@dataclass
class Step:
    name: str
    status: str = "pass"
    seconds: float = 0.0
    details: str = ""


def steps(c: Check) -> list:
    needs_cuda = (lambda step: step) if c.cuda or c.tiny else (lambda step: _no_cuda)  # --device cpu, full size
    return [("environment", environment), ("tests marked gpu", gpu_tests), ("generated data", generate_data),
            ("train 2 epochs", needs_cuda(train)), ("re-score with predict.py", needs_cuda(rescore)),
            ("kill after epoch 1, resume", needs_cuda(kill_and_resume)),
            ("bench (eager)", needs_cuda(lambda c: bench(c, False))),
            ("torchrun, 1 process", needs_cuda(torchrun)),
            ("second backbone (timm)", needs_cuda(second_backbone)),
            ("bench (--compile)", needs_cuda(lambda c: bench(c, True))),  # last: compiling is the slowest step
            ("real sample", needs_cuda(sample))]


def _no_cuda(c):
    raise Skipped("skipped: no CUDA")


# ---------------------------------------------------------------- summary

def summary(c: Check, done: list[Step], started: str) -> str:
    mode = "dry run (--tiny)" if c.tiny else "full check"
    lines = [f"# GPU check: {mode}, --device {c.args.device}", "",
             f"Started {started}; {sum(s.seconds for s in done):.0f} s in all (budget {c.args.budget} s). "
             f"Logs: steps.log. Work folder: {c.work}.", "",
             "| step | result | seconds | details |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.details.replace('|', '/')} |" for s in done]
    failed = [s.name for s in done if s.status == "FAIL"]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'passed'}**", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for summary.md, steps.log and the bench numbers")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (resnet18, 32 px, 120 images): a dry run")
    p.add_argument("--sample", help="also train 2 epochs on this real dataset (e.g. the ISIC sample)")
    p.add_argument("--work-dir", help="generated data, runs and caches (default: a new temporary folder)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    args = p.parse_args(argv)
    c = Check(args)
    c.out.mkdir(parents=True, exist_ok=True)
    c.work.mkdir(parents=True, exist_ok=True)
    c.log.write_text("")
    sys.path.insert(0, str(ROOT))
    started, done = time.strftime("%Y-%m-%d %H:%M:%S"), []
    for name, fn in steps(c):
        step, start = Step(name), time.monotonic()
        try:
            if done and done[0].status == "FAIL":
                raise Skipped("skipped: the environment is not usable")
            step.details = fn(c)
        except Skipped as e:
            step.status, step.details = "skipped", str(e)
        except Failure as e:
            step.status, step.details = "FAIL", str(e)
        except Exception as e:  # a bug in a step must not hide the others' results
            step.status, step.details = "FAIL", f"{type(e).__name__}: {e}"
        step.seconds = time.monotonic() - start
        done.append(step)
        print(f"{step.status:>7}  {name} ({step.seconds:.0f} s): {step.details.replace('<br>', '; ')}", flush=True)
        (c.out / "summary.md").write_text(summary(c, done, started))  # also after each step: a kill keeps the rest
    failed = any(s.status == "FAIL" for s in done)
    print(f"\n{'FAILED' if failed else 'passed'}: {c.out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
