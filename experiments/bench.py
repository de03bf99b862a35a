"""Throughput benchmark: the real training/evaluation loops and input pipeline against their bare limits.

    python -m experiments.bench                 # CPU cases (and the CUDA case when a GPU is present)
    python -m experiments.bench --scale         # also: a full-size (33,126 x 256 px) memory-mapped cache, peak memory
    python -m experiments.bench --cases cuda50 --compile both --json b.json  # the GPU case, eager and compiled

Every ratio is measured side by side in one process on the same machine, so machine noise largely cancels.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dataset import ImageDataset, eval_loader, image_loader, prepare_data, train_loader
from engine.augment import BatchAugment, to_float
from engine.config import Settings
from engine.devices import autocast_dtype
from engine.losses import build_loss
from isic.demo import make_dataset
from modules import SiameseNet
from scoring.inference import evaluate
from train import Stepper, build_optimizer, moving_average, train_one_epoch
from workflow.pipeline import CACHE_BUILD_WORKERS, loader_workers
from utils import seed_everything, set_deterministic


def rate(images: int, seconds: float) -> float:
    return images / seconds


def timed(fn, repeat: int, device) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_train_rate(model, s, device, steps: int, compile_model: bool = False) -> float:
    """The ceiling: forward, backward and AdamW step of the same network on tensors already on the device."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_model else model
    x = torch.rand(s.batch_size, 3, s.img_size, s.img_size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(s.batch_size, device=device) % 2).float()
    amp = autocast_dtype(device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, logits = step_model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rate(s.batch_size, timed(step, steps, device))


def bare_eval_rate(model, s, device, steps: int, compile_model: bool = False) -> float:
    # A trained model, not a fresh one: untrained BatchNorm statistics in eval mode blow activations up into
    # denormal floats, which are many times slower on CPUs and would make the ceiling meaningless.
    model.eval()
    step_model = torch.compile(model) if compile_model else model
    x = torch.rand(s.eval_batch_size, 3, s.img_size, s.img_size, device=device).contiguous(
        memory_format=torch.channels_last)
    amp = autocast_dtype(device)

    @torch.inference_mode()
    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            step_model(x)
    return rate(s.eval_batch_size, timed(step, steps, device))


def real_rates(s, data, device, compile_model: bool = False):
    """Images/s of one real training epoch and of evaluation, set up as train.fit sets a run up: cuDNN benchmark mode
    on GPUs (a run's default), bf16 autocast (fp16 + GradScaler where the GPU lacks bf16), the weight average
    (--ema), torch.compile with --compile, and evaluation of the weights a run validates (the average when kept)."""
    set_deterministic(device.type == "cpu")  # a run's default when --deterministic is not given
    model = SiameseNet(s.backbone, s.embedding_dim, img_size=s.img_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    loader = train_loader(data, s, device)
    optimizer, scheduler = build_optimizer(model, s, len(loader))
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = moving_average(model, s.ema, s.epochs * len(loader))
    step_model = torch.compile(model) if compile_model else model
    eval_model = ema.module if ema is not None else step_model
    stepper = Stepper(step_model, build_loss(s).to(device), optimizer, scheduler, scaler, BatchAugment().to(device),
                      device, amp, ema)
    train_one_epoch(stepper, loader, 1, 1)  # warm-up: worker start, allocator, cuDNN autotuning, compilation
    sync(device)
    start = time.perf_counter()
    train_one_epoch(stepper, loader, 1, 1)
    sync(device)
    train = rate(len(loader) * s.batch_size, time.perf_counter() - start)
    val = eval_loader(data, "train", s, device)
    seconds = timed(lambda: evaluate(eval_model, val, device, amp), 3, device)
    return train, rate(len(val.dataset), seconds), model


def loader_rate(s, data, device) -> float:
    """Images/s the training loader delivers as augmented float batches on the device, with no model: what the
    input pipeline can feed, to set against what the model consumes (the bare training rate)."""
    loader, augment = train_loader(data, s, device), BatchAugment().to(device)
    fn = lambda: [augment(to_float(x.to(device, non_blocking=True))) for x, *_ in loader]  # noqa: E731
    return rate(len(loader) * s.batch_size, timed(fn, 2, device))


class ReferencePipeline(Dataset):
    """The usual per-image pipeline: PIL open, then torchvision transforms with rotation and colour jitter."""

    def __init__(self, paths, size):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.75, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(), transforms.RandomRotation(180),
            transforms.ColorJitter(0.15, 0.15, 0.15, 0.05), transforms.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def input_rates(s, data, device, workers: int) -> dict:
    """Images/s delivered as augmented float batches on the device, by each pipeline, with no model.

    Loaders keep their workers between passes (as training does), so process start-up is not counted.
    """
    augment = BatchAugment().to(device)

    def ours(cache, n_workers):
        dataset = ImageDataset(np.arange(len(data.paths)), np.zeros(len(data.paths)), data.paths, s.img_size, cache)
        loader = image_loader(dataset, s.batch_size, device, n_workers, shuffle=True,
                              persistent_workers=n_workers > 0)
        return lambda: [augment(to_float(x.to(device))) for x, *_ in loader]

    reference = DataLoader(ReferencePipeline(data.paths, s.img_size), batch_size=s.batch_size, shuffle=True,
                           num_workers=workers, persistent_workers=workers > 0)
    runs = {"cached, 0 workers": ours(data.cache, 0), f"cached, {workers} workers": ours(data.cache, workers),
            f"per-image, {workers} workers": ours(None, workers),
            f"reference, {workers} workers": lambda: [x.to(device) for x in reference]}
    return {name: rate(len(data.paths), timed(fn, 3, device)) for name, fn in runs.items()}


def peak_memory(device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    return f"peak RSS {rss:.0f} MiB{gpu}"


def scale_check(root: Path, n=33126, size=256, batches=200, batch_size=128) -> str:
    """A full-size cache (n x 3 x size x size uint8) read through the loader: private memory stays small."""
    path = root / "scale.npy"
    cache = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    for start in range(0, n, 1024):  # fill in chunks so this process never holds the array
        cache[start:start + 1024] = np.random.randint(0, 256, (min(1024, n - start), 3, size, size), dtype=np.uint8)
    cache.flush()
    del cache
    cache = np.load(path, mmap_mode="r")
    dataset = ImageDataset(np.arange(n), np.zeros(n), [None] * n, size, cache)
    loader = image_loader(dataset, batch_size, torch.device("cpu"), 0, shuffle=True)
    start = time.perf_counter()
    for i, (x, *_) in enumerate(loader):
        if i == batches:
            break
    seconds = time.perf_counter() - start
    anon = int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) / 1024
    gib = n * 3 * size * size / 2**30
    return (f"full-size cache {gib:.1f} GiB: {batches * batch_size} random reads at {batches * batch_size / seconds:.0f} "
            f"images/s; private (anonymous) memory of this process {anon:.0f} MiB")


# name: (label, settings, device, generated images, their side in pixels, bare-model steps). Settings not named are a
# run's defaults (batch 64, evaluation batch 256, --ema 0.999), and the loader workers are a run's default for the
# device (pipeline.loader_workers): each case times what `driver.py` with those flags does.
CASES = {
    "cpu18": ("resnet18 64px cpu", dict(backbone="resnet18", img_size=64, batch_size=32, eval_batch_size=128),
              "cpu", 400, 256, 8),
    # timm trunks beside resnet18 at the CPU profile's size (docs/results.md, "Other trunks")
    "cpu-efficientnet_b0": ("efficientnet_b0 64px cpu", dict(backbone="efficientnet_b0", img_size=64, batch_size=32,
                                                             eval_batch_size=128), "cpu", 400, 256, 8),
    "cpu-convnext_atto": ("convnext_atto 64px cpu", dict(backbone="convnext_atto", img_size=64, batch_size=32,
                                                         eval_batch_size=128), "cpu", 400, 256, 8),
    "cpu50": ("resnet50 128px cpu", dict(backbone="resnet50", img_size=128, batch_size=32, eval_batch_size=64),
              "cpu", 200, 256, 6),
    "cuda50": ("resnet50 256px cuda", dict(backbone="resnet50", img_size=256), "cuda", 3000, 96, 20),
    # The smallest case, for gpu_check's dry run: every code path in seconds.
    "tiny": ("resnet18 32px", dict(backbone="resnet18", img_size=32, batch_size=16, eval_batch_size=64,
                                   embedding_dim=16), None, 120, 40, 2),
}


def case(label, s, device, data, steps, compile_model) -> dict:
    """Real and bare rates of one case, and the training loader's rate against what the model consumes."""
    seed_everything(0)
    train, evaluation, model = real_rates(s, data, device, compile_model)
    bare_train = bare_train_rate(model, s, device, steps, compile_model)
    bare_eval = bare_eval_rate(model, s, device, steps, compile_model)
    return {"case": label + (" compiled" if compile_model else ""), "device": str(device),
            "precision": str(autocast_dtype(device) or torch.float32).replace("torch.", ""),
            "compile": compile_model, "workers": s.workers, "batch_size": s.batch_size,
            "train": train, "bare_train": bare_train, "evaluate": evaluation, "bare_evaluate": bare_eval,
            "loader": loader_rate(s, data, device)}


def table(results: list[dict]) -> list[str]:
    rows = ["| case | precision | workers | loop | real images/s | bare model images/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows += [f"| {r['case']} | {r['precision']} | {r['workers']} | train | {r['train']:.1f} | "
                 f"{r['bare_train']:.1f} | {r['train'] / r['bare_train']:.2f} |",
                 f"| {r['case']} | {r['precision']} | {r['workers']} | evaluate | {r['evaluate']:.1f} | "
                 f"{r['bare_evaluate']:.1f} | {r['evaluate'] / r['bare_evaluate']:.2f} |",
                 f"| {r['case']} | {r['precision']} | {r['workers']} | input pipeline vs model | {r['loader']:.1f} | "
                 f"{r['bare_train']:.1f} | {r['loader'] / r['bare_train']:.2f} |"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES),
                   help="which cases (default: cpu18 cpu50, and cuda50 when a GPU is present)")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                   help="time each case eagerly (no), with torch.compile as --compile does (yes), or both")
    p.add_argument("--device", default="cpu", help="device of the tiny case (default cpu)")
    p.add_argument("--data-dir", help="use this dataset for every case instead of generating one")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--scale", action="store_true", help="also build and read a full-size 6.5 GB cache")
    p.add_argument("--workers", type=int, default=2, help="loader workers for the input-pipeline comparison")
    p.add_argument("--work-dir", help="where generated data and caches go (default: a temporary folder)")
    args = p.parse_args(argv)
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-"))
    names = args.cases or ["cpu18", "cpu50"] + ["cuda50"] * torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"), flush=True)
    results, inputs = [], None
    for name in names:
        label, overrides, device_name, n_images, side, steps = CASES[name]
        device = torch.device(device_name or args.device)
        data_dir = Path(args.data_dir) if args.data_dir else root / f"data-{n_images}-{side}px"
        if not data_dir.exists():
            make_dataset(data_dir, n_images=n_images, size=side, seed=0)
        s = dataclasses.replace(Settings(data_dir=str(data_dir), cache_dir=str(root / "cache")), **overrides)
        s.workers = loader_workers(device, cached=True)
        data = prepare_data(dataclasses.replace(s, workers=CACHE_BUILD_WORKERS))
        for compile_model in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
            results.append(case(label, s, device, data, steps, compile_model))
            print("\n".join(table(results[-1:])[2:]), flush=True)
        if name == "cpu18":
            inputs = input_rates(s, data, device, args.workers)
    print("\n" + "\n".join(table(results)))
    if inputs:
        ref = inputs[f"reference, {args.workers} workers"]
        print(f"\ninput pipeline at 64 px, {args.workers} workers, images/s (ratio to the PIL + torchvision reference):")
        for name, value in inputs.items():
            print(f"  {name:<22} {value:8.0f}  ({value / ref:.1f}x)")
    print("\n" + peak_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.scale:
        print(scale_check(root))


if __name__ == "__main__":
    main()
