"""Augmentation: the random batch augmentation of training and the 8 dihedral views of test-time augmentation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float in [0, 1], channels_last for faster convolutions."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


class BatchAugment(nn.Module):
    """Random rotation, flip, zoom-crop and mild colour jitter, drawn per image but applied to the whole batch at once.

    torchvision's transforms draw one set of parameters per call, so per-image randomness would need a Python loop;
    one affine_grid/grid_sample over the batch does it in two kernels, on the GPU when training there.
    """

    def __init__(self, min_scale=0.75, max_shift=0.05, brightness=0.15, contrast=0.15, saturation=0.15):
        super().__init__()
        self.min_scale, self.max_shift = min_scale, max_shift
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        u = lambda *shape: torch.rand(*shape, device=dev)  # noqa: E731
        angle = u(b) * 2 * math.pi
        zoom = self.min_scale + (1 - self.min_scale) * u(b)           # <1 samples a smaller area: a zoomed-in crop
        flip = torch.where(u(b) < 0.5, -1.0, 1.0)                      # mirror; with any rotation this covers flips
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        shift = (u(b, 2) * 2 - 1) * self.max_shift
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        jitter = lambda amount: 1 + (u(b, 1, 1, 1) * 2 - 1) * amount  # noqa: E731
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * jitter(self.saturation)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * jitter(self.contrast)
        x = x * jitter(self.brightness)
        return x.clamp_(0, 1).contiguous(memory_format=torch.channels_last)


class DihedralTTA(nn.Module):
    """Test-time augmentation: the model's embedding and logit averaged over the 8 flips and quarter turns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, metadata=None):
        outputs = [self.model(torch.rot90(x, k, dims=(2, 3)), metadata) for x in (images, images.flip(3))
                   for k in range(4)]
        return tuple(torch.stack(o).mean(0) for o in zip(*outputs))
