"""The Siamese network: trunk (a torchvision ResNet or any timm model) → embedder (MLP) → classifier head. One set of
weights serves every image."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from engine.checkpoints import load_checkpoint
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION = ("resnet18", "resnet34", "resnet50")  # these names are torchvision's ResNets; any other is timm's


def build_trunk(backbone: str, weights: str, img_size: int | None = None) -> tuple[nn.Module, int]:
    """The trunk without its classifier, and the width of its pooled features: one of torchvision's ResNets, or
    any timm model. img_size: the side the trunk will see, for models built for one input size (many ViTs)."""
    if backbone not in TORCHVISION:
        trunk = timm_trunk(backbone, weights, img_size)
        return trunk, trunk.num_features
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


def _import_timm():
    try:
        import timm
    except ImportError:
        raise UserError("--backbone other than resnet18/34/50 needs timm: pip install timm "
                        "(or, offline, pip install --no-index --no-deps wheels/timm-*.whl)") from None
    return timm


def check_backbone(name: str):
    """Refuse an unknown --backbone in one line (before a run writes anything); timm, when the name is timm's."""
    if name in TORCHVISION:
        return None
    timm = _import_timm()
    if not timm.is_model(name):
        raise UserError(f"--backbone {name} is neither resnet18/34/50 nor a timm model; list timm's with "
                        f"python -c \"import timm; print(timm.list_models('efficientnet*'))\"")
    return timm


def timm_trunk(name: str, weights: str, img_size: int | None) -> nn.Module:
    """timm's `name` without its classifier (num_classes=0), with --weights: none, imagenet (timm's default
    pretrained weights, from the Hugging Face hub cache or a download) or a local file."""
    timm = check_backbone(name)
    if weights == "none":
        return create_timm(timm, name, img_size)
    if weights != "imagenet":
        state = read_weights_file(weights)
        trunk = create_timm(timm, name, img_size, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state)))
        _check_fit(trunk, state, weights)
        return trunk
    cfg = timm.models.get_pretrained_cfg(name)
    if not (cfg and (cfg.hf_hub_id or cfg.url)):
        raise UserError(f"timm has no pretrained weights for {name}; use --weights none or --weights PATH")
    try:
        return create_timm(timm, name, img_size, pretrained=True)
    except UserError:
        raise
    except Exception as e:  # offline: the hub's LocalEntryNotFoundError, a connection error, a URLError
        where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        raise UserError(f"could not get ImageNet weights for {name} ({type(e).__name__}); without internet, "
                        f"download them elsewhere ({where}), then pass the .safetensors/.pth file with "
                        "--weights PATH, or train from scratch with --weights none") from None


def create_timm(timm, name: str, img_size: int | None, **kwargs) -> nn.Module:
    """timm.create_model without the classifier. A model built for one input size (its pretrained config says
    fixed_input_size, as many ViTs' do) is built for the run's side instead: timm sizes its position embeddings,
    and resamples pretrained ones, to it. One that cannot be resized says which --img-size it needs."""
    cfg = timm.models.get_pretrained_cfg(name)
    fixed = cfg.input_size[-1] if cfg and cfg.fixed_input_size else None
    size = {"img_size": img_size} if fixed and img_size and img_size != fixed else {}
    try:
        return timm.create_model(name, num_classes=0, **size, **kwargs)
    except TypeError as e:
        if not size or "img_size" not in str(e):
            raise
        raise UserError(f"{name} takes only {fixed} px images: use --img-size {fixed}") from None


def read_weights_file(path: str) -> dict:
    """A state dict from a .safetensors file or a PyTorch file (loaded with weights_only: no pickled code runs),
    unwrapped from a run's checkpoint ("model", "trunk." prefixes) when it is one."""
    if not Path(path).is_file():
        raise UserError(f"--weights must be none, imagenet or a .pth/.safetensors file; {path} is none of these")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs safetensors: pip install safetensors") from None
        state = load_file(path)
    else:
        state = load_checkpoint(path)
        state = state.get("model", state) if isinstance(state, dict) else state
    if any(k.startswith("trunk.") for k in state):  # a run's checkpoint: its trunk alone
        state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    return state


def _load_trunk_weights(trunk: nn.Module, path: str) -> None:
    state = {k: v for k, v in read_weights_file(path).items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    _refuse_misfit(path, [k for k in missing if not k.startswith("fc.")], unexpected)


def _check_fit(trunk: nn.Module, state: dict, path: str) -> None:
    """timm loads leniently without a classifier: refuse a file that leaves weights of the trunk unset."""
    classifiers = trunk.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    known = set(trunk.state_dict())
    extra = [k for k in state if k not in known and not k.startswith(tuple(f"{c}." for c in classifiers))]
    _refuse_misfit(path, [k for k in known if k not in state], extra)


def _refuse_misfit(path: str, missing: list, unexpected: list) -> None:
    if missing or unexpected:
        raise UserError(f"{path} does not fit this trunk: {len(missing)} missing and {len(unexpected)} unexpected "
                        f"keys (e.g. {(missing or unexpected)[0]}); is --backbone right?")


def input_statistics(trunk: nn.Module) -> tuple[tuple, tuple]:
    """The mean and std that pretrained weights expect: a timm model's own pretrained config, ImageNet's for
    torchvision's ResNets. The network applies them itself, so training, prediction and export share them."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm as a SyncBatchNorm, parameters and state-dict keys unchanged. A timm trunk goes through timm's
    converter: PyTorch's would turn its BatchNormAct layers into plain SyncBatchNorms and drop their activations."""
    if isinstance(getattr(model, "trunk", None), nn.Module) and hasattr(model.trunk, "pretrained_cfg"):
        return _import_timm().layers.convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------- how a lesion looks to the trunk

LOOK_STAGES = 3  # the trunk's deepest stages whose statistics describe a lesion's look (docs/similarity.md)


def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's stages, shallow to deep: a torchvision ResNet's layer1-4, else the modules that timm's feature_info
    names (stages of a convnet, blocks of a transformer)."""
    if isinstance(trunk, models.ResNet):
        return [trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]
    return [trunk.get_submodule(info["module"]) for info in trunk.feature_info]


def look_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's LOOK_STAGES deepest stages (a ResNet's layer2-4)."""
    return trunk_stages(trunk)[-LOOK_STAGES:]


def stage_statistics(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """One stage's output as the mean and the standard deviation of each channel over the image (a feature map,
    (B, C, H, W), or (B, H, W, C) when channels_last) or over the tokens ((B, N, C)): the statistics that style
    transfer matches. Each half has unit length (but a 1 x 1 map's spread, 0), the whole too."""
    x = x.float()
    dims = (1,) if x.dim() == 3 else (1, 2) if channels_last else (2, 3)
    halves = (x.mean(dims), x.std(dims, correction=0))
    return torch.cat([F.normalize(h, dim=1) for h in halves], dim=1) / math.sqrt(2)


def look_vector(statistics: list[torch.Tensor]) -> torch.Tensor:
    """How each image looks to the trunk: stage_statistics of its look stages side by side, each an equal share of
    a unit length."""
    return torch.cat(statistics, dim=1) / math.sqrt(len(statistics))


METADATA_WIDTH = 16  # what the metadata branch adds to the head's input: a few patient facts need few units


class SiameseNet(nn.Module):
    """images in [0, 1] (and encoded patient metadata, isic/tabular.py) → (embedding, logit).

    The embedding is the image's alone: similarity, kNN and retrieval compare lesions, not patients. With metadata,
    a small branch joins the embedding in front of the head only. `normalize_input` applies the mean/std the
    trunk's pretrained weights expect (input_statistics)."""

    def __init__(self, backbone="resnet50", embedding_dim=64, weights="none", normalize_input=None, metadata_dim=0,
                 img_size=None):
        super().__init__()
        self.trunk, width = build_trunk(backbone, weights, img_size)
        self.embedder = nn.Sequential(
            nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, embedding_dim))
        self.metadata_branch = nn.Sequential(nn.Linear(metadata_dim, METADATA_WIDTH), nn.ReLU(inplace=True)) \
            if metadata_dim else None
        self.head = nn.Linear(embedding_dim + (METADATA_WIDTH if metadata_dim else 0), 1)
        self.normalize_input = weights != "none" if normalize_input is None else normalize_input
        mean, std = input_statistics(self.trunk)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

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
                      metadata_dim=metadata_dim, img_size=s.img_size)
