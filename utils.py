"""Seeding, devices, torchrun helpers, user-facing errors and atomic file writes."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad path, bad CSV, bad flag): printed as one line, exit code 2."""


def cli_main(run, argv=None) -> int:
    """Every entry point's ending: 0 when `run(argv)` finishes, one `error:` line and exit code 2 on a UserError."""
    try:
        run(argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- supported library versions

# The oldest releases whose APIs this code uses. The newest of those APIs is torch.amp.GradScaler(device) (torch 2.3;
# also used: get_ema_multi_avg_fn 2.1, DataLoader __getitems__ 2.0, weights_only loads); torchvision 0.18 is the
# release built for torch 2.3 (transforms.v2.functional.to_dtype alone would need 0.16).
OLDEST = {"torch": (2, 3), "torchvision": (0, 18)}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", version).groups())


def installed_versions() -> dict:
    import importlib.metadata as md
    found = {"torch": torch.__version__}
    try:
        found["torchvision"] = md.version("torchvision")
    except md.PackageNotFoundError:
        pass
    return found


def version_problem(found: dict | None = None) -> str | None:
    """One line about a torch/torchvision older than OLDEST (or missing), else None."""
    found = installed_versions() if found is None else found
    oldest = " and ".join(f"{name} {'.'.join(map(str, v))}" for name, v in OLDEST.items())
    for name, release in OLDEST.items():
        if name not in found:
            return f"{name} is not installed; this code needs {oldest} or newer (pip install -r requirements.txt)"
        if _release(found[name]) < release:
            return (f"{name} {found[name]} is older than this code supports ({oldest} or newer); "
                    f"install requirements.txt's versions or a newer build")
    return None


def require_supported_versions() -> None:
    problem = version_problem()
    if problem:
        raise UserError(problem)


# Checked when this module is first imported, which every entry point does early on: an old release then stops the
# program with one line at start-up instead of a traceback from deep inside a run.
if version_problem():
    sys.exit(f"error: {version_problem()}")


# ---------------------------------------------------------------- reproducibility

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # also drives pytorch-metric-learning's MPerClassSampler
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict:
    """Every random state a training epoch consumes, as plain types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- devices

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine has no MPS backend; use --device cpu or auto")
    return torch.device(name)


# ---------------------------------------------------------------- torchrun (DistributedDataParallel)

def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (RANK in the environment): join the process group, NCCL on CUDA, gloo otherwise, and return
    this process's device (cuda:LOCAL_RANK on GPUs). Other ranks' stdout is silenced so every line prints once."""
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (`obj` itself on one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def autocast_dtype(device: torch.device):
    """bf16 where the GPU has it, fp16 (with a GradScaler) on older GPUs, full precision elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- files

TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # hidden and not *.pt: a leftover is never mistaken for a checkpoint
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes.

    A crash or kill mid-write leaves the previous file intact, never a truncated one (a SIGKILL may leave the hidden
    temporary behind; remove_stale_temporaries clears it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file gets the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # and the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(folder) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete what atomic_path left in `folder` (recursively) when a process was killed mid-write.

    Only call it while nothing else writes there."""
    stale = [p for p in Path(folder).rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def library_versions() -> dict:
    import importlib.metadata as md
    names = ["torch", "torchvision", "pytorch-metric-learning", "scikit-learn", "numpy", "pandas"]
    return {n: md.version(n) for n in names}
