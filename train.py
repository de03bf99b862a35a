"""Training: the optimiser and its schedule, the weight average, one epoch, and the fit loop with checkpoints."""
from __future__ import annotations

import math
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset import eval_loader, train_loader
from engine import timings
from engine.augment import BatchAugment, to_float
from engine.checkpoints import FORMAT, CheckpointWriter, evaluation_checkpoint
from engine.devices import autocast_dtype
from engine.distributed import any_rank, is_main, rank, settle, step_failure, world_size
from engine.losses import PAIR_STATS, build_loss, epoch_pair_stats
from engine.weight_average import WeightAverage
from modules import sync_batchnorm
from reporting import plots, webreport
from reporting.tensorboard_log import training_board
from scoring.inference import evaluate
from scoring.metrics import auroc, partial_auc, threshold_metrics, youden_threshold
from utils import UserError, remove_stale_temporaries, rng_state, seed_everything, set_rng_state, write_csv

SYNC_EVERY = 20  # steps between host syncs (progress bar, NaN check); fewer syncs keep the GPU queue full
PLOT_EVERY_S = 30  # redrawing the four history plots takes ~0.3 s, a noticeable share of a 2-second CPU epoch


LR_BATCH = 64  # the batch that --lr is given for when --lr-scaling linear scales it


def peak_lr(s) -> float:
    """--lr, or with --lr-scaling linear, --lr times the batch of all processes together over LR_BATCH."""
    return s.lr * (s.batch_size * world_size() / LR_BATCH if s.lr_scaling == "linear" else 1.0)


def build_optimizer(model, s, steps_per_epoch: int):
    """AdamW with a linear warm-up to the peak learning rate (peak_lr), then cosine decay to zero over the remaining
    steps.

    Weight decay applies to weight matrices and convolution kernels only: shrinking BatchNorm scales and biases
    towards zero regularises nothing useful."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=peak_lr(s))
    warmup = max(1, round(s.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, s.epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its current step and stops cleanly. A second signal stops at once
    (atomic writes keep the files on disk whole either way)."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    pass


class NonFiniteLoss(Exception):
    pass


def forward_views(model, images, metadata, augment, two_views: bool):
    """(embeddings, logits, embeddings of a second augmented view or None) of one training batch. Both views go
    through the model as one batch: one forward (and one DDP gradient reduction) for the pair."""
    first = augment(images)
    if not two_views:
        return *model(first, metadata), None
    embeddings, logits = model(torch.cat([first, augment(images)]), torch.cat([metadata, metadata]))
    n = len(first)
    return embeddings[:n], logits[:n], embeddings[n:]


@dataclass
class Stepper:
    """What an optimisation step uses: the model that steps (compiled or DDP-wrapped), the loss, the optimiser, its
    schedule and loss scaler, the batch augmentation, the device and autocast precision, the weight average."""
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    augment: object  # uint8 batch on the device → augmented float batch
    device: torch.device
    amp_dtype: torch.dtype | None = None
    ema: WeightAverage | None = None


def train_one_epoch(step: Stepper, loader, epoch: int, epochs: int, stop: StopRequest | None = None,
                    board=None) -> dict:
    model, loss_fn, optimizer, scheduler, device = step.model, step.loss_fn, step.optimizer, step.scheduler, step.device
    model.train()
    # loss, bce, contrastive, instance, correct, then the pair counts (losses.pair_stats)
    totals = np.zeros(5 + len(PAIR_STATS))
    window, seen = [], 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True,
               disable=None if is_main() else True)
    for number, (images, targets, pair_labels, metadata) in enumerate(bar, start=1):
        images = to_float(images.to(device, non_blocking=True))
        targets, pair_labels = targets.to(device, non_blocking=True), pair_labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
            embeddings, logits, second = forward_views(model, images, metadata.to(device, non_blocking=True),
                                                       step.augment, loss_fn.w_instance > 0)
        loss, bce, contrastive, pairs, instance = loss_fn(embeddings, logits, targets, pair_labels, second)
        optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        step.scaler.step(optimizer)
        step.scaler.update()
        scheduler.step()
        if step.ema is not None:
            step.ema.update_parameters(model)
        correct = ((logits.detach() > 0) == (targets > 0.5)).sum()
        window.append(torch.cat([torch.stack([loss.detach(), bce, contrastive, instance, correct.float()]), pairs]))
        seen += len(targets)
        synced = number % SYNC_EVERY == 0 or number == len(loader)
        if synced:
            values = torch.stack(window).cpu().numpy()  # the one host sync per window
            bad = np.flatnonzero(~np.isfinite(values[:, 0]))
            # Under torchrun every rank stops at the same step, else the others would wait in the next step's
            # gradient all-reduce for one that has left.
            bad_anywhere, stop_anywhere = any_rank([len(bad) > 0, stop is not None and bool(stop.signal)])
            if len(bad):
                first = number - len(window) + bad[0] + 1
                raise NonFiniteLoss(f"loss became {values[bad[0], 0]} at epoch {epoch}, step {first}")
            if bad_anywhere:
                raise NonFiniteLoss(f"loss became non-finite on another rank at epoch {epoch}, step {number} or before")
            totals += values.sum(0) * [*[len(targets)] * 4, *[1] * (1 + len(PAIR_STATS))]
            bar.set_postfix(loss=f"{totals[0] / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if board is not None:
                board.steps(values)
            window = []
        if world_size() == 1 and stop is not None and stop.signal or synced and stop_anywhere:
            raise Interrupted(stop.signal or "a signal to another rank")
    if dist.is_initialized():  # the epoch's means over every rank's samples
        summed = torch.tensor([*totals, seen], dtype=torch.float64,
                              device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(summed)
        *totals, seen = summed.tolist()
    loss, bce, contrastive, instance, accuracy = (float(t / seen) for t in totals[:5])
    return {"train_loss": loss, "train_bce": bce, "train_contrastive": contrastive, "train_instance": instance,
            "train_accuracy": accuracy, **epoch_pair_stats(totals[5:])}


def validation_summary(pred) -> dict:
    threshold = youden_threshold(pred.targets, pred.probabilities)
    return {"val_loss": pred.loss,
            "val_auroc": auroc(pred.targets, pred.probabilities),
            "val_pauc": partial_auc(pred.targets, pred.probabilities),
            "val_accuracy": threshold_metrics(pred.targets, pred.probabilities, threshold)["accuracy"]}


def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Draw every epoch's randomness (sampler, augmentation) from (seed, epoch) alone.

    A resumed run then replays epoch k exactly as an uninterrupted one, whatever random numbers were drawn before it:
    MPerClassSampler shuffles its list of labels in place, carrying that order from one epoch to the next. (The
    loaders draw their workers' seeds from generators of their own, dataset.image_loader, never from this stream.)
    Under torchrun each rank adds its rank to the seed: its own batches and augmentations, as reproducible.
    """
    key = [seed, epoch] if world_size() == 1 else [seed, epoch, rank()]
    seed_everything(int(np.random.SeedSequence(key).generate_state(1)[0]))
    if isinstance(loader.sampler, MPerClassSampler):
        loader.sampler.labels.sort()


def moving_average(model, decay: float, total_steps: int):
    """An exponential moving average of the weights and BatchNorm statistics (engine/weight_average.py), or None."""
    if not decay:
        return None
    if not 0 < decay < 1:
        raise UserError(f"--ema must be a decay between 0 and 1, e.g. 0.999; got {decay}")
    decay = min(decay, 1 - 4 / total_steps)  # a short run cannot average over 1/(1-decay) steps: at most a quarter
    if decay <= 0:
        return None
    return WeightAverage(model, decay)


@dataclass
class TrainingState:
    """Everything a checkpoint restores: weights, their moving average, optimiser, schedule, scaler, the loss's
    cross-batch memory (--xbm; under torchrun rank 0's, restored on every rank) and the record.

    state_dict() holds only plain types and tensors (loadable with weights_only) and every random state, so that a
    resumed run replays the next epoch exactly as an uninterrupted one (see seed_epoch)."""
    model: nn.Module
    ema: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0
    best: dict = field(default_factory=lambda: {"score": -math.inf, "epoch": 0})
    history: list = field(default_factory=list)
    loss: nn.Module | None = None
    precision: str = "float32"  # what the steps compute in: devices.autocast_dtype's name for the device

    def state_dict(self, s) -> dict:
        return {"format": FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "best": self.best, "history": self.history,
                "ema": None if self.ema is None else self.ema.module.state_dict(),
                "ema_updates": 0 if self.ema is None else self.ema.updates, "rng": rng_state(),
                "settings": s.to_dict(), "world_size": world_size(),
                "loss": None if self.loss is None else self.loss.state_dict(), "precision": self.precision}

    def load_state_dict(self, checkpoint: dict) -> None:
        """The model's weights are loaded by the caller before the optimiser and the average are built on them."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run had no fp16 loss scale to keep
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and checkpoint["ema"] is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
            self.ema.updates = checkpoint["ema_updates"]
        if self.loss is not None and checkpoint.get("loss") is not None:  # absent before --xbm existed
            self.loss.load_state_dict(checkpoint["loss"])
        self.epoch, self.best, self.history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
        set_rng_state(checkpoint["rng"])

    def record(self, row: dict, select_metric: str, epochs: int) -> bool:
        """Add the epoch's row to the history; whether this epoch becomes best.pt."""
        self.epoch = row["epoch"]
        self.history.append(row)
        if select_metric == "last":  # best.pt = the final weights, whatever a small val split says
            score, improved = row["val_pauc"], row["epoch"] == epochs
        else:
            score = row[f"val_{select_metric}"]
            improved = score > self.best["score"] or not math.isfinite(self.best["score"])
        if improved:
            self.best = {"score": float(score), "epoch": row["epoch"]}
        return improved


def restore(state: TrainingState, checkpoint: dict, out_dir: Path, s) -> None:
    """Continue from last.pt (its format was checked when it was read): refuse another number of processes, whose
    schedule would differ, then load the state."""
    trained_on = checkpoint["world_size"]
    if trained_on != world_size():  # steps per epoch, hence the learning-rate schedule, depend on it
        raise UserError(f"{out_dir} was trained by {trained_on} process(es), not {world_size()}: resume it with "
                        + ("python driver.py" if trained_on == 1 else f"torchrun --nproc_per_node {trained_on}"
                           " driver.py (and as many nodes as before)"))
    state.load_state_dict(checkpoint)
    changed = precision_change(checkpoint, state.precision)
    if changed:
        print(changed)
    if is_main():
        remove_stale_temporaries(out_dir)  # left by a kill in the middle of a save
    best = state.best
    so_far = f"best so far: epoch {best['epoch']}, {s.select_metric} {best['score']:.4f}" if best["epoch"] else \
        f"{state.epoch} epochs done"
    print(f"resuming at epoch {state.epoch + 1} of {s.epochs} ({so_far})" if state.epoch < s.epochs else
          f"resuming: all {s.epochs} epochs were done, evaluating")


def precision_change(checkpoint: dict, precision: str) -> str | None:
    """One line when a resume computes in another precision than the checkpoint's epochs (a bf16 run continued on a
    T4 or V100 goes on in fp16 with a fresh loss scale; a GPU run continued on a CPU in float32): allowed, since the
    alternative is a run that cannot be finished, but the epochs that follow are not those of an uninterrupted run."""
    trained_in = checkpoint.get("precision") or ("float16" if checkpoint["scaler"] else None)  # older files: unknown
    if trained_in is None or trained_in == precision:
        return None
    return (f"note: the epochs so far were trained in {trained_in}, this device continues in {precision}; the rest "
            f"of the run will not be identical to an uninterrupted one")


def last_due(epoch: int, s) -> bool:
    """Whether last.pt is written after `epoch` (--save-every; always after the last epoch)."""
    return epoch % s.save_every == 0 or epoch == s.epochs


def save_checkpoints(writer: CheckpointWriter, state: TrainingState, s, out_dir: Path, best: bool, last: bool) -> None:
    """Hand best.pt and/or last.pt to the background writer, as a snapshot of the state now. What the training thread
    spends here (waiting for the previous write, copying the state) is the phase training.checkpoint.epochN."""
    if not (best or last):
        return
    with timings.phase(f"training.checkpoint.epoch{state.epoch}") as timed:
        checkpoint = writer.snapshot(state.state_dict(s))
        files = {out_dir / "best.pt": evaluation_checkpoint(checkpoint)} if best else {}
        files.update({out_dir / "last.pt": checkpoint} if last else {})
        writer.save(files)
        timed.note = (f"{', '.join(p.name for p in files)} copied for the background writer (the previous write took "
                      f"{writer.seconds:.2f} s there)")


def end_of_epoch(state: TrainingState, row: dict, s, out_dir: Path, plotted: float,
                 writer: CheckpointWriter | None = None) -> float:
    """Record the epoch, save best.pt (when validation improved) and last.pt (when due) in the background, write
    history.csv and, at most every PLOT_EVERY_S, the plots. Returns when the plots were last drawn. Without a
    `writer`, the checkpoints are written before it returns."""
    if writer is None:
        with CheckpointWriter() as writer:
            return end_of_epoch(state, row, s, out_dir, plotted, writer)
    improved = state.record(row, s.select_metric, s.epochs)
    save_checkpoints(writer, state, s, out_dir, improved, last_due(row["epoch"], s))
    with timings.phase(f"training.save.epoch{row['epoch']}", note="history, plots"):
        history = pd.DataFrame(state.history)
        write_csv(out_dir / "history.csv", history)
        if row["epoch"] == s.epochs or time.time() - plotted >= PLOT_EVERY_S:
            plots.history_plots(history, out_dir, Path(out_dir).name, {**state.best, "metric": s.select_metric})
            webreport.write_report(out_dir, training=True)  # as often as the plots, which it shows
            plotted = time.time()
    print(epoch_line(row, s.epochs, improved, s.w_instance > 0), flush=True)
    return plotted


def fit(model, data, s, out_dir, device, resume_from: dict | None = None) -> TrainingState:
    """Train for s.epochs, keeping last.pt every s.save_every epochs and best.pt by validation s.select_metric, both
    written in the background while the next epoch trains.

    Under torchrun every rank trains a DistributedDataParallel copy; rank 0 alone validates and writes files.
    last.pt always holds a finished epoch: an interrupted epoch is replayed from its start on resume, which seed_epoch
    makes exact (saving mid-epoch would also need the sampler's position and the loader's prefetched batches)."""
    out_dir = Path(out_dir)
    if s.sync_bn and world_size() > 1:
        if s.compile:  # the compiled graph breaks at every SyncBatchNorm, and PyTorch has open crash reports on it
            raise UserError("--compile with --sync-bn is not supported: drop one of them")
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU version")
        model = sync_batchnorm(model)  # same parameters and state-dict keys
    loader, val = train_loader(data, s, device), eval_loader(data, "val", s, device)
    amp_dtype = autocast_dtype(device)
    loss_fn, augment = build_loss(s), BatchAugment()
    optimizer, scheduler = build_optimizer(model, s, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainingState(model, moving_average(model, s.ema, s.epochs * len(loader)), optimizer, scheduler, scaler,
                          loss=loss_fn, precision=str(amp_dtype or torch.float32).removeprefix("torch."))
    compiled = torch.compile(model) if s.compile else model
    step_model = compiled
    if dist.is_initialized():
        step_model = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = compiled if state.ema is None else torch.compile(state.ema.module) if s.compile else state.ema.module
    stepper = Stepper(step_model, loss_fn, optimizer, scheduler, scaler, augment, device, amp_dtype, state.ema)
    if resume_from is not None:
        restore(state, resume_from, out_dir, s)
    launch = "python driver.py" if world_size() == 1 else "the same torchrun command with driver.py"
    resume_hint = f"continue with: {launch} --resume {shlex.quote(str(out_dir))}"
    plotted, saved = -math.inf, state.epoch  # saved: the epoch last.pt holds (or is being written with)
    with StopRequest() as stop, training_board(out_dir, s, scheduler) as board, CheckpointWriter() as writer:
        if resume_from is None and is_main():  # epoch 0: a kill during the first epoch can be resumed too
            save_checkpoints(writer, state, s, out_dir, best=False, last=True)
        for epoch in range(state.epoch + 1, s.epochs + 1):
            started = time.time()
            seed_epoch(loader, s.seed, epoch)
            try:
                with timings.phase(f"training.epoch{epoch}", note=f"{len(loader)} steps"):
                    row = train_one_epoch(stepper, loader, epoch, s.epochs, stop, board)
            except Interrupted as e:  # the epoch is replayed on resume, but its time was spent: a resumed total keeps it
                timings.add(f"training.epoch{epoch}", time.time() - started, note="interrupted, replayed on resume")
                raise UserError(f"stopped by {e} during epoch {epoch}; last.pt holds epoch {saved}, "
                                f"{resume_hint}") from None
            except NonFiniteLoss as e:
                kept = f"last.pt holds epoch {saved}" + (f", best.pt epoch {state.best['epoch']}"
                                                             * bool(state.best["epoch"]))
                raise UserError(f"{e}; stopped with the checkpoints of before the failure ({kept}); "
                                f"try a lower --lr") from None
            except Exception as e:  # under torchrun, one line per rank rather than a traceback and peers that hang
                if world_size() == 1 or isinstance(e, UserError):
                    raise
                raise step_failure(e, f"during epoch {epoch}") from None
            failure = None
            if is_main():  # the other ranks wait in settle while rank 0 validates and saves
                try:
                    with timings.phase(f"validation.epoch{epoch}", note=f"{len(val.dataset)} images"):
                        row.update(validation_summary(evaluate(eval_model, val, device, amp_dtype, loss_fn,
                                                               desc="validating")))
                    row = {"epoch": epoch, **row, "lr": float(scheduler.get_last_lr()[0]),
                           "seconds": time.time() - started}
                    if board is not None:
                        board.epoch(row)
                    plotted = end_of_epoch(state, row, s, out_dir, plotted, writer)
                except Exception as e:  # reported to every rank before it is raised here
                    failure = e
            settle(failure)
            saved = epoch if last_due(epoch, s) else saved
            if any_rank([bool(stop.signal)])[0]:  # came during validation or saving: this epoch is complete
                if saved != epoch and is_main():  # and is saved now, whatever --save-every says
                    save_checkpoints(writer, state, s, out_dir, best=False, last=True)
                raise UserError(f"stopped by {stop.signal or 'a signal to another rank'} after epoch {epoch}; last.pt "
                                f"holds epoch {epoch}, {resume_hint}")
    return state


def epoch_line(row: dict, epochs: int, improved: bool, instance: bool = False) -> str:
    """The training loss with each of its terms (unweighted); with the instance term, the validation loss says it
    lacks one (validation sees one view of each image)."""
    parts = f"bce {row['train_bce']:.4f}, contrastive {row['train_contrastive']:.4f}" + \
        (f", instance {row['train_instance']:.4f}" if instance else "")
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f} ({parts})  "
            f"val loss{' (no instance term)' if instance else ''} {row['val_loss']:.4f}  "
            f"val AUROC {row['val_auroc']:.4f}  val pAUC {row['val_pauc']:.4f}  val acc {row['val_accuracy']:.4f}  "
            f"lr {row['lr']:.2e}  {row['seconds']:.0f}s" + ("  *best" if improved else ""))
