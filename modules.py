"""The Siamese network: trunk (ResNet) → embedder (MLP) → classifier head. One set of weights serves every image."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from engine.checkpoints import load_checkpoint
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_trunk(backbone: str, weights: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and the width of its pooled features."""
    if weights == "imagenet":
        chosen = models.get_model_weights(backbone).DEFAULT
        try:
            trunk = models.get_model(backbone, weights=chosen)
        except Exception as e:  # offline: URLError, or a socket error wrapped by torch.hub
            raise UserError(f"could not download ImageNet weights for {backbone} from {chosen.url} "
                            f"({type(e).__name__}); without internet use --weights none, "
                            "or --weights PATH to a local copy of that file") from None
    else:
        trunk = models.get_model(backbone, weights=None)
        if weights != "none":
            _load_trunk_weights(trunk, weights)
    width = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, width


def _load_trunk_weights(trunk: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"--weights must be none, imagenet or a .pth file; {path} is none of these")
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    state = {k.removeprefix("trunk."): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"{path} does not fit this trunk: {len(missing)} missing and {len(unexpected)} unexpected "
                        f"keys (e.g. {(missing or unexpected)[0]}); is --backbone right?")


METADATA_WIDTH = 16  # what the metadata branch adds to the head's input: a few patient facts need few units


class SiameseNet(nn.Module):
    """images in [0, 1] (and encoded patient metadata, isic/tabular.py) → (embedding, logit).

    The embedding is the image's alone: similarity, kNN and retrieval compare lesions, not patients. With metadata,
    a small branch joins the embedding in front of the head only. `normalize_input` applies ImageNet mean/std for
    pretrained trunks."""

    def __init__(self, backbone="resnet50", embedding_dim=64, weights="none", normalize_input=None, metadata_dim=0):
        super().__init__()
        self.trunk, width = build_trunk(backbone, weights)
        self.embedder = nn.Sequential(
            nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, embedding_dim))
        self.metadata_branch = nn.Sequential(nn.Linear(metadata_dim, METADATA_WIDTH), nn.ReLU(inplace=True)) \
            if metadata_dim else None
        self.head = nn.Linear(embedding_dim + (METADATA_WIDTH if metadata_dim else 0), 1)
        self.normalize_input = weights != "none" if normalize_input is None else normalize_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalize_input:
            images = (images - self.mean) / self.std
        features = self.trunk(images)
        with full_precision(features.device.type):
            embedding = self.embedder(features.float())
            head_input = embedding
            if self.metadata_branch is not None:
                head_input = torch.cat([embedding, self.metadata_branch(metadata.to(embedding.dtype))], dim=1)
            return embedding, self.head(head_input).squeeze(1)


def full_precision(device_type: str):
    """Autocast off for the layers after the trunk: under bf16 their outputs, the scores and the embeddings that
    kNN and prototypes compare, would keep about 3 significant digits, which ties scores in AUROC/pAUC and moves the
    validation threshold. The embedder and head are a sliver of the network's compute."""
    if device_type in ("cuda", "cpu"):  # the devices this code autocasts on (devices.autocast_dtype, tests)
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def build_model(s, initial_weights=True, metadata_dim=0) -> SiameseNet:
    """The model of settings `s`; initial_weights=False skips loading --weights (a checkpoint will replace them).
    metadata_dim: the width of the encoded patient metadata (tabular.MetadataEncoder.width), 0 without --metadata."""
    if s.embedding_dim < 1:
        raise UserError(f"--embedding-dim must be positive; got {s.embedding_dim}")
    weights = s.weights if initial_weights else "none"
    return SiameseNet(s.backbone, s.embedding_dim, weights, normalize_input=s.weights != "none",
                      metadata_dim=metadata_dim)
