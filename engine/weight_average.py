"""The exponential moving average of a model's weights and BatchNorm statistics, updated without host syncs.

torch.optim.swa_utils.AveragedModel keeps its step counter in a tensor (on the CPU unless told a device) and reads it
with bool(n_averaged == 0) and n_averaged.to(device) at every update: on CUDA that is a blocking host-to-device copy per
dtype group per step, which drains the GPU queue. Here the counter is a Python int, every floating tensor is averaged
by one torch._foreach_lerp_ per (device, dtype) group (the same arithmetic as swa_utils.get_ema_multi_avg_fn), and
integer buffers (BatchNorm's num_batches_tracked) are copied rather than averaged: a truncated average of a counter
means nothing, and BatchNorm only reads it when its momentum is None.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn


class WeightAverage(nn.Module):
    """`module` holds the average; update_parameters(model) after each optimiser step. The first update copies the
    model (as AveragedModel does); `updates` counts them and is saved in checkpoints as "ema_updates"."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """`model` may be wrapped (DistributedDataParallel, torch.compile): its parameters and buffers come in the
        order of the module it wraps."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(averaged) != len(current):
            raise ValueError(f"the model has {len(current)} tensors, its average {len(averaged)}")
        if self.updates == 0:
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)
        else:
            groups = defaultdict(lambda: ([], []))
            for mine, theirs in zip(averaged, current):
                if mine.is_floating_point() or mine.is_complex():
                    groups[mine.device, mine.dtype][0].append(mine)
                    groups[mine.device, mine.dtype][1].append(theirs)
                else:
                    mine.copy_(theirs)
            for mine, theirs in groups.values():
                torch._foreach_lerp_(mine, theirs, 1 - self.decay)
        self.updates += 1
