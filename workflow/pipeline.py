"""One run from settings to results: data → split → train → val/test evaluation, new or resumed.

driver.py is its command line; the experiment scripts call `run` with the flags of each of their runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dataset import data_report, hold_on_device, prepare_data
from engine import timings
from engine.checkpoints import evaluation_weights, load_checkpoint, require_resumable
from engine.config import RESUMABLE, Settings, flag_of, settings_from_cli
from engine.devices import autocast_dtype, pick_device
from engine.distributed import broadcast, init_distributed, is_main, rank0_first
from isic.demo import make_dataset
from isic.splits import write_splits
from isic.tabular import metadata_width, with_metadata
from modules import build_model, check_backbone
from reporting.reports import summary_line
from reporting.tensorboard_log import write_results
from reporting.webreport import record_command, write_report
from train import fit
from workflow.evaluation import LoadedRun, evaluate_run
from utils import UserError, library_versions, seed_everything, set_deterministic, write_json, write_text

DEMO_DATA = Path("data/demo")
CHECK_DATA_FILES = {"splits.csv", "data_report.txt", "timings.json"}  # all --check-data writes: replaced without --overwrite
DECODE_WORKERS = min(4, os.cpu_count() or 1)  # loader processes that decode while a GPU trains (--no-cache)
CACHE_BUILD_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(given: dict) -> Path:
    s, checkpoint = resume_settings(given) if "resume" in given else (new_settings(given), None)
    device = init_distributed(pick_device(s.device))
    s.out = broadcast(s.out)  # a default folder name holds the time: every rank takes rank 0's
    out = Path(s.out)
    with timings.recording(out / "timings.json", keep=checkpoint is not None, active=is_main()):
        return train_and_evaluate(s, checkpoint, device, out)


def train_and_evaluate(s: Settings, checkpoint: dict | None, device: torch.device, out: Path) -> Path:
    seed_everything(s.seed)
    set_deterministic(s.deterministic if s.deterministic is not None else device.type == "cpu")
    chosen = s.workers is not None
    s.workers = s.workers if chosen else loader_workers(device, cached=not s.no_cache)
    precision = str(autocast_dtype(device) or "float32").replace("torch.", "")
    print(f"run folder: {out}   device: {device} ({precision})   workers: {s.workers}"
          f"{'' if chosen else ' (default here)'}   backbone: {s.backbone} at {s.img_size}px   weights: {s.weights}")

    # Decoding JPEGs into the cache is CPU-bound and done once, before training: every core, unless the user chose.
    reading = s if chosen else dataclasses.replace(s, workers=CACHE_BUILD_WORKERS)
    # Rank 0 reads the data first, so the image cache is built once; the other ranks then reuse it (or stop with
    # rank 0's failure).
    data = rank0_first(lambda: prepare_data(reading, splits_path=out / "splits.csv" if checkpoint else s.splits))
    report = data_report(data)
    if s.check_data and not s.check_images:
        report += "images not decoded: add --check-images to decode every one\n"
    if is_main():  # the only process that writes files
        claim_out_dir(out, s.overwrite and not checkpoint)  # only now, with the data known to be good, touch the folder
        timings.save()
        if not checkpoint:
            write_splits(data.frame, out / "splits.csv")
        write_text(out / "data_report.txt", report)
    print(report)
    if s.check_data:
        if data.problems:
            raise UserError(f"data not usable: {data.problems[0]} (report: {out / 'data_report.txt'})")
        print(f"data is usable; split written to {out / 'splits.csv'}")
        return out
    if is_main():
        write_json(out / "config.json", s.to_dict())
        record_command(out)  # config.json holds the settings, not the command line that gave them
    data = hold_on_device(with_metadata(data, s, out, fit=checkpoint is None), s.resident, device)

    seed_everything(s.seed)  # again: reading the data may have drawn random numbers (only when it built the cache)
    model = build_model(s, initial_weights=checkpoint is None, metadata_dim=metadata_width(out, s))
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    model = model.to(device).to(memory_format=torch.channels_last)
    state = fit(model, data, s, out, device, resume_from=checkpoint)
    if not is_main():
        return out  # rank 0 evaluates val and test alone, with the whole model

    model.load_state_dict(evaluation_weights(load_checkpoint(out / "best.pt", device)))
    metrics = evaluate_run(LoadedRun(out, s, model, device, s.tta), data)
    print(f"\ntest: {summary_line(metrics, out / 'test')}")
    with timings.phase("evaluation.tensorboard", note="figures, hparams, projector"):
        write_results(out, s, model, data, device, step=state.scheduler.last_epoch + 1)
    print(f"outputs in {out}: history.csv, loss/accuracy/auroc/pauc/pairs.png, best.pt, last.pt, "
          f"train_embeddings.pt, timings.json, val/, test/{', tb/ (tensorboard --logdir)' if s.tensorboard else ''}")
    with timings.phase("evaluation.report"):
        report = write_report(out)
    print(f"time: {timings.current_summary()} (phases in {out / 'timings.json'})")
    print(f"report: {report}")  # the last line: the one page to open
    return out


def loader_workers(device: torch.device, cached: bool) -> int:
    """Loader processes when --workers is not given. None on a CPU reading the memory-mapped cache: a cached batch
    costs the main process almost nothing, while worker processes compete with the model for the cores (on 2 cores,
    2 workers trained at 0.67 of the bare model's rate, 0 workers at 0.98). Up to 4 on a GPU, whose pace needs the
    overlap, and when every image is decoded on the fly (--no-cache)."""
    return 0 if device.type == "cpu" and cached else DECODE_WORKERS


def new_settings(given: dict) -> Settings:
    s = settings_from_cli(given)
    check_backbone(s.backbone)
    s.versions = library_versions()
    s.given = sorted(given)  # report.html tells a typed value from a default or a profile's
    if s.demo and not s.data_dir and not s.csv:
        s.data_dir = str(demo_data())
    # Absolute paths, so that predict.py works from any folder.
    for name in ("data_dir", "csv", "image_dir", "duplicates", "extra_csv", "splits", "cache_dir"):
        if getattr(s, name):
            setattr(s, name, str(Path(getattr(s, name)).resolve()))
    s.out = str(check_out_dir(s.out, s.overwrite, "demo" if s.demo else f"{s.backbone}-{s.img_size}px"))
    return s


def check_out_dir(out, overwrite: bool, tag: str) -> Path:
    """The run folder, checked before any slow step: an existing run is only replaced with --overwrite,
    and a folder holding anything but a run or a --check-data result is never touched."""
    out = Path(out) if out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    if "config.json" in names and not overwrite:
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or replace it with --overwrite")
    if "config.json" not in names and names - CHECK_DATA_FILES:
        raise UserError(f"--out {out} is a non-empty folder that is not a run; choose another folder")
    return out


def claim_out_dir(out: Path, overwrite: bool) -> None:
    if overwrite and (out / "config.json").is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def resume_settings(given: dict) -> tuple[Settings, dict]:
    out = Path(given["resume"])
    if not (out / "config.json").is_file() or not (out / "last.pt").is_file():
        raise UserError(f"nothing to resume in {out}: it needs config.json and last.pt from an earlier run")
    extra = set(given) - RESUMABLE
    if extra:
        raise UserError(f"--resume takes its settings from {out / 'config.json'}; only "
                        f"{', '.join(flag_of(k) for k in sorted(RESUMABLE - {'resume'}))} may be given")
    s = Settings.from_dict({**json.loads((out / "config.json").read_text()), **given, "out": str(out)})
    checkpoint = load_checkpoint(out / "last.pt")
    require_resumable(checkpoint, out / "last.pt")  # now, not after an hour of building the image cache
    return s, checkpoint


def demo_data() -> Path:
    if not (DEMO_DATA / "train-metadata.csv").is_file():
        print(f"generating a synthetic demo dataset in {DEMO_DATA} ...")
        make_dataset(DEMO_DATA)
    return DEMO_DATA
