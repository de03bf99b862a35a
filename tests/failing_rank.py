"""driver.py with one planted fault, launched under torchrun by test_cuda_paths and test_distributed (not a test
module).

FAIL=save: rank 0's validation-and-saving after epoch 1 fails (as a full disk would);
FAIL=nan: rank 1 alone reads a non-finite loss at its second step (its gradients stay finite);
FAIL=data: rank 1 alone fails to read the data, after rank 0 read it (inside distributed.rank0_first);
FAIL=step: rank 1 alone fails inside its second training step (as a GPU out of memory would);
FAIL=slow-encoder: rank 0 writes metadata_encoder.json (--metadata) 3 seconds late; nothing fails.
Prints "planted at <time>" when the failure happens, so the test can time how fast every rank stops."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
from isic import tabular  # noqa: E402
from workflow import pipeline  # noqa: E402
import train  # noqa: E402
from utils import UserError  # noqa: E402

RANK, FAIL = int(os.environ["RANK"]), os.environ["FAIL"]


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


def planted(message):
    def fail(*args, **kwargs):
        print(f"planted at {time.time()}", file=sys.stderr, flush=True)
        raise UserError(message)
    return fail


def failing_step(build):
    def build_loss(s):
        loss_fn, steps = build(s), [0]
        forward = loss_fn.forward

        def planted(*args):
            steps[0] += 1
            if steps[0] == 2:
                print(f"planted at {time.time()}", file=sys.stderr, flush=True)
                raise RuntimeError("planted failure: CUDA out of memory")
            return forward(*args)
        loss_fn.forward = planted
        return loss_fn
    return build_loss


def late(save):
    def slow_save(*args):
        time.sleep(3)
        save(*args)
    return slow_save


if FAIL == "data" and RANK == 1:
    pipeline.prepare_data = planted("planted failure: cannot read the images on rank 1")
if FAIL == "step" and RANK == 1:
    train.build_loss = failing_step(train.build_loss)
if FAIL == "slow-encoder" and RANK == 0:
    tabular.MetadataEncoder.save = late(tabular.MetadataEncoder.save)
if FAIL == "save" and RANK == 0:
    train.end_of_epoch = planted("planted failure: cannot write last.pt: No space left on device")
if FAIL == "nan" and RANK == 1:
    train.build_loss = nan_on_second_step(train.build_loss)
sys.exit(driver.main(sys.argv[1:]))
