"""Which device a run uses, and in which precision it computes there (autocast dtype by compute capability)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from utils import UserError


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


def autocast_dtype(device: torch.device):
    """bf16 on GPUs of compute capability 8.0 and newer (A100, A10, L4, H100, RTX 30xx/40xx), fp16 with a GradScaler
    on older ones (P100 6.0, V100 7.0, T4 7.5), full precision elsewhere. Not torch.cuda.is_bf16_supported(): it
    counts emulation (True on a T4 or V100, where bf16 runs as slow emulated float32 math)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def precision_name(device: torch.device) -> str:
    """What a forward pass under autocast_dtype computes in on `device`: "bfloat16", "float16" or "float32"."""
    return str(autocast_dtype(device) or torch.float32).removeprefix("torch.")
