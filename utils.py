"""User-facing errors, the supported-version check, seeding and random states, atomic file writes.

Device choice and precision live in engine/devices.py, the torchrun helpers in engine/distributed.py."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


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


# Checked when this module is first imported, which every entry point does early on: an old release then stops the
# program with one line at start-up instead of a traceback from deep inside a run.
_VERSION_PROBLEM = version_problem()
if _VERSION_PROBLEM:
    sys.exit(f"error: {_VERSION_PROBLEM}")


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
    found = {n: md.version(n) for n in names}
    try:  # needed only for a timm --backbone
        found["timm"] = md.version("timm")
    except md.PackageNotFoundError:
        pass
    return found
