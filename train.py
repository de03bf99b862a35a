"""Loss, one training epoch, evaluation, and the fit loop with checkpoints and history."""
from __future__ import annotations

import math
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import plots
from dataset import BatchAugment, eval_loader, to_float, train_loader
from metrics import auroc, partial_auc, threshold_metrics, youden_threshold
from utils import (UserError, autocast_dtype, barrier, is_main, rank, remove_stale_temporaries, rng_state,
                   save_checkpoint, seed_everything, set_rng_state, world_size, write_csv)

SYNC_EVERY = 20  # steps between host syncs (progress bar, NaN check); fewer syncs keep the GPU queue full
PLOT_EVERY_S = 30  # redrawing the four history plots takes ~0.3 s, a noticeable share of a 2-second CPU epoch


class JointLoss(nn.Module):
    """L = w_bce * BCEWithLogits(logit, y) + w_cl * ContrastiveLoss(embeddings, y), pairs formed within the batch
    (under torchrun: within each process's batch, as on one GPU with that batch size)."""

    def __init__(self, w_bce=1.0, w_cl=1.0, pos_margin=0.0, neg_margin=1.0, normalize_embeddings=True):
        super().__init__()
        self.w_bce, self.w_cl = w_bce, w_cl
        self.bce = nn.BCEWithLogitsLoss()
        self.contrastive = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin,
                                           distance=LpDistance(p=2, power=1, normalize_embeddings=normalize_embeddings))

    def forward(self, embeddings, logits, targets):
        bce = self.bce(logits.float(), targets.float())
        contrastive = self.contrastive(embeddings.float(), targets.long())
        return self.w_bce * bce + self.w_cl * contrastive, bce.detach(), contrastive.detach()


def build_loss(s) -> JointLoss:
    return JointLoss(s.w_bce, s.w_cl, s.pos_margin, s.neg_margin, s.normalize_embeddings)


def build_optimizer(model, s, steps_per_epoch: int):
    """AdamW with a linear warm-up to --lr, then cosine decay to zero over the remaining steps.

    Weight decay applies to weight matrices and convolution kernels only: shrinking BatchNorm scales and biases
    towards zero regularises nothing useful."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=s.lr)
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


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, augment, device, amp_dtype,
                    epoch: int, epochs: int, stop: StopRequest | None = None, ema=None) -> dict:
    model.train()
    totals = np.zeros(4)  # loss, bce, contrastive, correct
    window, seen = [], 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True,
               disable=None if is_main() else True)
    for step, (images, targets) in enumerate(bar, start=1):
        images = augment(to_float(images.to(device, non_blocking=True)))
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            embeddings, logits = model(images)
        loss, bce, contrastive = loss_fn(embeddings, logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        correct = ((logits.detach() > 0) == (targets > 0.5)).sum()
        window.append(torch.stack([loss.detach(), bce, contrastive, correct.float()]))
        seen += len(targets)
        if step % SYNC_EVERY == 0 or step == len(loader):
            values = torch.stack(window).cpu().numpy()  # the one host sync per window
            bad = np.flatnonzero(~np.isfinite(values[:, 0]))
            if len(bad):
                first = step - len(window) + bad[0] + 1
                raise NonFiniteLoss(f"loss became {values[bad[0], 0]} at epoch {epoch}, step {first}")
            totals += values.sum(0) * [len(targets), len(targets), len(targets), 1]
            bar.set_postfix(loss=f"{totals[0] / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            window = []
        if stop is not None and stop.signal:
            raise Interrupted(stop.signal)
    if dist.is_initialized():  # the epoch's means over every rank's samples
        summed = torch.tensor([*totals, seen], dtype=torch.float64,
                              device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(summed)
        *totals, seen = summed.tolist()
    loss, bce, contrastive, accuracy = (float(t / seen) for t in totals)
    return {"train_loss": loss, "train_bce": bce, "train_contrastive": contrastive, "train_accuracy": accuracy}


@dataclass
class Predictions:
    targets: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    embeddings: np.ndarray
    loss: float


@torch.inference_mode()
def evaluate(model, loader, device, amp_dtype=None, loss_fn=None, desc="evaluating") -> Predictions:
    """Score every image of `loader` in order, without augmentation."""
    model.eval()
    targets, logits, embeddings, losses = [], [], [], []
    for images, batch_targets in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None):
        images = to_float(images.to(device, non_blocking=True))
        batch_targets = batch_targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            batch_embeddings, batch_logits = model(images)
        if loss_fn is not None:
            losses.append(loss_fn(batch_embeddings, batch_logits, batch_targets)[0] * len(batch_targets))
        targets.append(batch_targets)
        logits.append(batch_logits.float())
        embeddings.append(batch_embeddings.float())
    logits = torch.cat(logits).cpu().numpy()
    return Predictions(
        targets=torch.cat(targets).cpu().numpy().astype(int),
        probabilities=1 / (1 + np.exp(-logits.astype(np.float64))),
        logits=logits,
        embeddings=torch.cat(embeddings).cpu().numpy(),
        loss=float(torch.stack(losses).sum() / len(logits)) if losses else float("nan"),
    )


def validation_summary(pred: Predictions) -> dict:
    threshold = youden_threshold(pred.targets, pred.probabilities)
    return {"val_loss": pred.loss,
            "val_auroc": auroc(pred.targets, pred.probabilities),
            "val_pauc": partial_auc(pred.targets, pred.probabilities),
            "val_accuracy": threshold_metrics(pred.targets, pred.probabilities, threshold)["accuracy"]}


def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Draw every epoch's randomness (sampler, augmentation) from (seed, epoch) alone.

    A resumed run then replays epoch k exactly as an uninterrupted one, whatever random numbers were drawn before it:
    persistent loader workers draw their base seed only in the first epoch, evaluation loaders draw one each, and
    MPerClassSampler shuffles its list of labels in place, carrying that order from one epoch to the next.
    Under torchrun each rank adds its rank to the seed: its own batches and augmentations, as reproducible.
    """
    key = [seed, epoch] if world_size() == 1 else [seed, epoch, rank()]
    seed_everything(int(np.random.SeedSequence(key).generate_state(1)[0]))
    if isinstance(loader.sampler, MPerClassSampler):
        loader.sampler.labels.sort()


def checkpoint_dict(model, ema, optimizer, scheduler, scaler, epoch, best, history, s) -> dict:
    """Everything needed to continue exactly where this epoch ended, as plain types (weights_only-loadable)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "history": history,
            "ema": None if ema is None else ema.module.state_dict(),
            "ema_updates": 0 if ema is None else int(ema.n_averaged), "rng": rng_state(), "settings": s.to_dict(),
            "world_size": world_size()}


def evaluation_weights(checkpoint: dict) -> dict:
    """The weights that were validated: the moving average when the run kept one, else the trained weights."""
    return checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]


def moving_average(model, decay: float, total_steps: int, resume_from: dict | None = None):
    """An exponential moving average of the weights and BatchNorm statistics (torch.optim.swa_utils), or None."""
    if not decay:
        return None
    if not 0 < decay < 1:
        raise UserError(f"--ema must be a decay between 0 and 1, e.g. 0.999; got {decay}")
    decay = min(decay, 1 - 4 / total_steps)  # a short run cannot average over 1/(1-decay) steps: at most a quarter
    if decay <= 0:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if resume_from is not None and resume_from.get("ema") is not None:
        ema.module.load_state_dict(resume_from["ema"])
        ema.n_averaged.fill_(resume_from["ema_updates"])
    return ema


def fit(model, data, s, out_dir, device, resume_from: dict | None = None) -> dict:
    """Train for s.epochs, keeping last.pt every epoch and best.pt by validation s.select_metric. Returns history.

    Under torchrun every rank trains a DistributedDataParallel copy; rank 0 alone validates and writes files."""
    out_dir = Path(out_dir)
    if s.sync_bn and world_size() > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU version")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state-dict keys
    loader = train_loader(data, s, device)
    val = eval_loader(data, "val", s, device)
    amp_dtype = autocast_dtype(device)
    loss_fn = build_loss(s)
    augment = BatchAugment()
    optimizer, scheduler = build_optimizer(model, s, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    compiled = torch.compile(model) if s.compile else model
    step_model = compiled
    if dist.is_initialized():
        step_model = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    ema = moving_average(model, s.ema, s.epochs * len(loader), resume_from)
    eval_model = ema.module if ema is not None else compiled
    history, best, start = [], {"score": -math.inf, "epoch": 0}, 1
    plotted = -math.inf
    if resume_from is None:  # epoch 0: a kill during the first epoch can be resumed too
        if is_main():
            save_checkpoint(out_dir / "last.pt",
                            checkpoint_dict(model, ema, optimizer, scheduler, scaler, 0, best, history, s))
    else:
        trained_on = resume_from.get("world_size", 1)
        if trained_on != world_size():  # steps per epoch, hence the learning-rate schedule, depend on it
            raise UserError(f"{out_dir} was trained by {trained_on} process(es), not {world_size()}: resume it with "
                            + ("python driver.py" if trained_on == 1 else f"torchrun --nproc_per_node {trained_on}"
                               " driver.py (and as many nodes as before)"))
        try:
            optimizer.load_state_dict(resume_from["optimizer"])
        except ValueError:  # saved with another optimizer layout (a version before AdamW's two parameter groups)
            raise UserError(f"{out_dir}/last.pt was written by an older version of this pipeline and cannot be "
                            "resumed by this one; its best.pt still evaluates with predict.py") from None
        scheduler.load_state_dict(resume_from["scheduler"])
        scaler.load_state_dict(resume_from["scaler"])
        history, best, start = resume_from["history"], resume_from["best"], resume_from["epoch"] + 1
        set_rng_state(resume_from["rng"])
        if is_main():
            remove_stale_temporaries(out_dir)  # left by a kill in the middle of a save
        so_far = f"best so far: epoch {best['epoch']}, {s.select_metric} {best['score']:.4f}" if best["epoch"] else \
            f"{start - 1} epochs done"
        print(f"resuming at epoch {start} of {s.epochs} ({so_far})" if start <= s.epochs else
              f"resuming: all {s.epochs} epochs were done, evaluating")

    # last.pt always holds a finished epoch: an interrupted epoch is replayed from its start on resume, which seed_epoch
    # makes exact. Saving mid-epoch would also need the sampler's position and the loader's prefetched batches.
    launch = "python driver.py" if world_size() == 1 else "the same torchrun command with driver.py"
    resume_hint = f"continue with: {launch} --resume {shlex.quote(str(out_dir))}"
    with StopRequest() as stop:
        for epoch in range(start, s.epochs + 1):
            started = time.time()
            seed_epoch(loader, s.seed, epoch)
            try:
                row = train_one_epoch(step_model, loader, loss_fn, optimizer, scheduler, scaler, augment, device,
                                      amp_dtype, epoch, s.epochs, stop, ema)
            except Interrupted as e:
                raise UserError(f"stopped by {e} during epoch {epoch}; last.pt holds epoch {epoch - 1}, "
                                f"{resume_hint}") from None
            except NonFiniteLoss as e:
                kept = f"last.pt holds epoch {epoch - 1}" + (f", best.pt epoch {best['epoch']}" * bool(best["epoch"]))
                raise UserError(f"{e}; stopped with the checkpoints of before the failure ({kept}); "
                                f"try a lower --lr") from None
            if is_main():
                row.update(validation_summary(evaluate(eval_model, val, device, amp_dtype, loss_fn, desc="validating")))
                row = {"epoch": epoch, **row, "lr": float(scheduler.get_last_lr()[0]), "seconds": time.time() - started}
                history.append(row)
                if s.select_metric == "last":  # best.pt = the final weights, whatever a small val split says
                    score, improved = row["val_pauc"], epoch == s.epochs
                else:
                    score = row[f"val_{s.select_metric}"]
                    improved = score > best["score"] or not math.isfinite(best["score"])
                if improved:
                    best = {"score": float(score), "epoch": epoch}
                state = checkpoint_dict(model, ema, optimizer, scheduler, scaler, epoch, best, history, s)
                if improved:
                    save_checkpoint(out_dir / "best.pt", state)
                save_checkpoint(out_dir / "last.pt", state)
                write_csv(out_dir / "history.csv", pd.DataFrame(history))
                if epoch == s.epochs or time.time() - plotted >= PLOT_EVERY_S:
                    plots.history_plots(pd.DataFrame(history), out_dir)
                    plotted = time.time()
                print(epoch_line(row, s.epochs, improved), flush=True)
            barrier()  # the other ranks wait while rank 0 validates and saves
            if stop.signal:  # arrived during validation or saving: this epoch is complete and saved
                raise UserError(f"stopped by {stop.signal} after epoch {epoch}; last.pt holds epoch {epoch}, "
                                f"{resume_hint}")
    return {"history": history, "best": best}


def epoch_line(row: dict, epochs: int, improved: bool) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f} (bce {row['train_bce']:.4f}, "
            f"contrastive {row['train_contrastive']:.4f})  val loss {row['val_loss']:.4f}  "
            f"val AUROC {row['val_auroc']:.4f}  val pAUC {row['val_pauc']:.4f}  val acc {row['val_accuracy']:.4f}  "
            f"lr {row['lr']:.2e}  {row['seconds']:.0f}s" + ("  *best" if improved else ""))
