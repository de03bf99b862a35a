"""Seeding, devices, torchrun helpers, user-facing errors and atomic file writes."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from datetime import timedelta
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
    """Every random state a training epoch consumes, as plain types that torch.load(weights_only=True) accepts.

    No CUDA states ("cuda" stays, empty, for the checkpoint format): train.seed_epoch reseeds every generator, the
    GPUs' included (torch.manual_seed), at the start of each epoch, so they are never needed; saved, they were one per
    visible GPU (a CUDA context created on each, by every rank) and a resume that sees fewer GPUs failed on them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])  # CUDA states of older checkpoints are ignored: see rng_state


# ---------------------------------------------------------------- devices

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        hidden = gpu_hidden_from_torch()
        if hidden:  # else a ResNet50 trains on the CPU for days in silence
            print(f"warning: {hidden}; running on the CPU", file=sys.stderr, flush=True)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda was asked for, but {gpu_hidden_from_torch() or 'PyTorch sees no CUDA GPU'}; "
                        "use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine has no MPS backend; use --device cpu or auto")
    return torch.device(name)


def gpu_hidden_from_torch() -> str | None:
    """Why an NVIDIA GPU that the system shows (nvidia-smi, /proc/driver/nvidia) is not usable by PyTorch, or None.

    The usual cause is a wheel that does not match the machine: a CPU-only build, or one built for a newer CUDA than
    the driver supports. A GPU hidden on purpose (CUDA_VISIBLE_DEVICES empty or -1) is not reported."""
    if torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (shutil.which("nvidia-smi") or (gpus.is_dir() and any(gpus.iterdir()))):
        return None
    build = torch.version.cuda
    reason = ("this PyTorch is a CPU-only build" if build is None else
              f"this PyTorch was built for CUDA {build}, which the NVIDIA driver does not serve (compare the 'CUDA "
              f"Version' nvidia-smi shows)")
    return (f"an NVIDIA GPU is present but PyTorch {torch.__version__} cannot use it: {reason}; install a PyTorch "
            f"build that matches the driver")


# ---------------------------------------------------------------- torchrun (DistributedDataParallel)

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
    cache once, the others reuse it); any rank's failure on rank 0 stops them all (settle)."""
    if not is_main():
        settle(None)
        return work()
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


def broadcast(obj):
    """Rank 0's `obj` on every rank (`obj` itself on one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def autocast_dtype(device: torch.device):
    """bf16 on GPUs of compute capability 8.0 and newer (A100, A10, L4, H100, RTX 30xx/40xx), fp16 with a GradScaler
    on older ones (P100 6.0, V100 7.0, T4 7.5), full precision elsewhere. Not torch.cuda.is_bf16_supported(): it
    counts emulation (True on a T4 or V100, where bf16 runs as slow emulated float32 math)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


# ---------------------------------------------------------------- files

TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # hidden and not *.pt: a leftover is never mistaken for a checkpoint
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes.

    A crash or kill mid-write leaves the previous file intact, never a truncated one (a SIGKILL may leave the hidden
    temporary behind; remove_stale_temporaries clears it). A write that fails (a full disk, a quota, a read-only
    folder: any OSError, or PyTorch's own write error) stops the program with one line naming the file and the space
    left on its filesystem, and the previous file stays as it was: a run's last.pt remains resumable.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file gets the usual permissions
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # and the rename itself survives a power loss
    except Exception as e:
        if not _failed_write(e):
            raise
        _remove(tmp)  # before measuring what is free
        raise UserError(f"cannot write {path}: {_reason(e)} ({disk_free(path.parent)} free on that filesystem)") \
            from None
    finally:
        _remove(tmp)


def _failed_write(e: Exception) -> bool:
    """An OSError, or torch.save's: its C++ zip writer reports a full disk as a RuntimeError ("PytorchStreamWriter
    failed writing file ...: file write failed", "basic_ios::clear: iostream error", then, while closing the file,
    "[enforce fail at inline_container.cc] unexpected pos")."""
    chain = [e]
    while chain[-1].__context__ is not None and len(chain) < 10:
        chain.append(chain[-1].__context__)
    return isinstance(e, OSError) or any(isinstance(c, RuntimeError) and any(s in str(c) for s in TORCH_WRITE_ERRORS)
                                         for c in chain)


TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "iostream error")


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    detail = re.sub(r"^\[enforce fail at [^]]*\][ .]*", "", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"the write failed ({detail[:160]})"


def _remove(tmp) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)


def disk_free(folder) -> str:
    """Free space on the filesystem holding `folder` (or its nearest existing parent), e.g. "1.3 GB"."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return human_bytes(shutil.disk_usage(folder).free)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def require_free_space(folder, needed: int, what: str) -> None:
    """Refuse to begin writing `needed` bytes into `folder` when its filesystem has less free: better than failing
    halfway, and for a memory-mapped file (the image cache) a full disk is a SIGBUS crash, not an OSError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise UserError(f"cannot create {what} in {folder}: {_reason(e)}") from None
    if free < needed:
        raise UserError(f"{what} needs {human_bytes(needed)} in {folder}, which has {human_bytes(free)} free; free "
                        f"some space or choose another folder")


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
