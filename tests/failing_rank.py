"""driver.py with one planted failure, launched under torchrun by test_cuda_paths (not a test module).

FAIL=save: rank 0's validation-and-saving after epoch 1 fails (as a full disk would);
FAIL=nan: rank 1 alone reads a non-finite loss at its second step (its gradients stay finite).
Prints "planted at <time>" when the failure happens, so the test can time how fast every rank stops."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import train  # noqa: E402
from utils import UserError  # noqa: E402

RANK, FAIL = int(os.environ["RANK"]), os.environ["FAIL"]


def failing_save(*args, **kwargs):
    print(f"planted at {time.time()}", file=sys.stderr, flush=True)
    raise UserError("planted failure: cannot write last.pt: No space left on device")


def nan_on_second_step(build):
    def build_loss(s):
        loss_fn, steps = build(s), [0]
        forward = loss_fn.forward

        def planted(*args):
            loss, *rest = forward(*args)
            steps[0] += 1
            if steps[0] == 2:
                print(f"planted at {time.time()}", file=sys.stderr, flush=True)
                loss = loss.detach() * float("nan") + (loss - loss.detach())  # reads NaN, finite gradients
            return (loss, *rest)
        loss_fn.forward = planted
        return loss_fn
    return build_loss


if FAIL == "save" and RANK == 0:
    train.end_of_epoch = failing_save
if FAIL == "nan" and RANK == 1:
    train.build_loss = nan_on_second_step(train.build_loss)
sys.exit(driver.main(sys.argv[1:]))
