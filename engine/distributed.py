"""torchrun (DistributedDataParallel) helpers: join the group, who is rank 0, and how ranks wait and agree.

On a single process (no RANK in the environment) they answer as rank 0 of 1 and wait for no one."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from utils import UserError


# How long ranks wait for rank 0 alone (building the image cache, validating, saving) and for each other in the
# group that carries those waits and the ranks' outcomes (gloo, on the CPU). A first run on the full-size ISIC 2020
# JPEGs decodes for hours before training starts (README, "torchrun"), far past the 10 minutes of a default group.
# The training collectives (DDP's gradients, on the default group) keep PyTorch's default timeout.
WAIT_TIMEOUT = timedelta(hours=24)
_control = None  # the gloo group for waits and outcomes (init_distributed)

def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (RANK in the environment): join the process group, NCCL on CUDA, gloo otherwise, and return
    this process's device (cuda:LOCAL_RANK on GPUs). Other ranks' stdout is silenced so every line prints once."""
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    global _control
    _control = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    print(f"torchrun: {dist.get_world_size()} process(es), backend {dist.get_backend()}", flush=True)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files: the only one, or rank 0 of a torchrun launch."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        _collective(dist.barrier, group=_control)


def settle(failure: Exception | None) -> None:
    """Every rank calls this at the same point, with what went wrong on it (or None): the rank that failed raises
    its own error, every other one a one-line UserError naming that rank. Ranks waiting for rank 0 (its cache
    build, validation, saving) thus stop within seconds of its failure, not when a collective's timeout fires."""
    if dist.is_initialized():
        outcomes = [None] * world_size()
        _collective(dist.all_gather_object, outcomes, None if failure is None else str(failure)[:300],
                    group=_control)
        if failure is None and any(o is not None for o in outcomes):
            failed = next(r for r, o in enumerate(outcomes) if o is not None)
            raise UserError(f"stopped because rank {failed} failed (its own error line says why)")
    if failure is not None:
        raise failure


def rank0_first(work):
    """work() on rank 0, then, once it succeeded, on the other ranks (e.g. reading the data: rank 0 builds the image
    cache once, the others reuse it). A failure on any rank, in either turn, stops them all (settle)."""
    if is_main():
        result = settled(work)
        settle(None)  # the other ranks' turn
        return result
    settle(None)
    return settled(work)


def on_main(work) -> None:
    """work() on rank 0 alone (e.g. writing a file the others read next); every rank goes on once it is done, or
    stops with its failure (settle)."""
    settled(work if is_main() else lambda: None)


def settled(work):
    """work() on this rank, then settle: every rank learns whether it failed on any of them."""
    try:
        result = work()
    except Exception as e:
        settle(e)
    settle(None)
    return result


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag, true when it is true on any rank (one tiny all-reduce on the CPU group); the flags themselves on
    one process. Lets every rank take the same decision at the same step (stop for a signal, a non-finite loss)."""
    if not dist.is_initialized():
        return flags
    values = torch.tensor([int(f) for f in flags])
    _collective(dist.all_reduce, values, op=dist.ReduceOp.MAX, group=_control)
    return [bool(v) for v in values]


def _collective(fn, *args, **kwargs):
    """A collective on the waits-and-outcomes group; a peer that died (its error line says why) ends this rank with
    one line too, instead of gloo's "Connection closed by peer" traceback."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise UserError(f"rank {rank()} lost contact with another rank, which stopped (its own error line says "
                        f"why): {str(e).splitlines()[0][:120]}") from None


# How a collective says that another rank has left: NCCL's errors are DistErrors, gloo's plain RuntimeErrors.
PEER_GONE = ("closed by peer", "reset by peer")


def step_failure(error: Exception, where: str) -> UserError:
    """An exception of a training step under torchrun, as one line: a collective that failed because another rank
    left (that rank's own line says why), or this rank's own failure. As this rank exits, the others' collectives
    fail at once on gloo; on NCCL, torchrun ends them when it sees this process exit."""
    line = (str(error).splitlines() or [""])[0][:160]
    if isinstance(error, dist.DistError) or any(marker in line for marker in PEER_GONE):
        return UserError(f"rank {rank()} lost contact with another rank {where}, which stopped (its own error line "
                         f"says why): {line}")
    return UserError(f"rank {rank()} failed {where}: {type(error).__name__}: {line}")


def broadcast(obj):
    """Rank 0's `obj` on every rank (`obj` itself on one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
