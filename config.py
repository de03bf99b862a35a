"""The one settings object: every step reads it, the CLI fills it, the run folder keeps it as config.json."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Settings:
    # data
    data_dir: Optional[str] = None        # folder in a known ISIC layout (see dataset.find_layout)
    csv: Optional[str] = None             # or: a metadata CSV ...
    image_dir: Optional[str] = None       # ... and the folder holding its images
    duplicates: Optional[str] = None      # ISIC_2020_Training_Duplicates.csv: pairs kept on one side of the split
    split_by: str = "patient"             # patient | image
    splits: Optional[str] = None          # reuse this splits.csv instead of making a split (e.g. cross-validation)
    val_frac: float = 0.15
    test_frac: float = 0.10
    img_size: int = 256
    cache_dir: str = "cache"              # decoded uint8 images, memory-mapped, reused across runs
    no_cache: bool = False
    skip_bad_images: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    # model
    backbone: str = "resnet50"
    weights: str = "none"                 # none | imagenet | PATH to a .pth state dict of the trunk
    embedding_dim: int = 64
    # loss
    w_bce: float = 1.0
    w_cl: float = 1.0
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    normalize_embeddings: bool = True
    # optimisation
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.05            # AdamW (decoupled); not on BatchNorm weights or biases
    warmup_epochs: float = 1.0
    ema: float = 0.999                    # decay of an exponential moving average of the weights; 0 = none
    select_metric: str = "pauc"           # pauc | auroc | last (the final epoch)
    # evaluation
    tsne: bool = True
    tta: bool = False                     # also score val/test averaged over the 8 flips and right-angle rotations
    # run
    out: Optional[str] = None
    seed: int = 42
    device: str = "auto"                  # auto | cpu | cuda | mps
    deterministic: Optional[bool] = None  # None: on for CPU, off for GPU
    compile: bool = False
    sync_bn: bool = False                 # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    resume: Optional[str] = None
    overwrite: bool = False
    check_data: bool = False
    check_images: bool = False
    demo: bool = False
    profile: str = "default"
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Profiles change the defaults; flags given on the command line still win.
PROFILES = {
    "default": {},
    # Runs anywhere in a few minutes on generated data (driver.py --demo).
    "demo": dict(backbone="resnet18", img_size=64, epochs=6, batch_size=32, lr=1e-3, workers=0, warmup_epochs=0.5,
                 ema=0.0),  # 140 steps in all: too few for a moving average to settle
    # Small enough for a 2-core laptop on the 740-image sample (about 5 minutes there).
    # Chosen by 5-fold patient-grouped cross-validation (README, "Learning on a CPU").
    "cpu": dict(backbone="resnet18", img_size=64, epochs=120, batch_size=32, lr=1e-3, workers=0, warmup_epochs=0.5,
                ema=0.997, tta=True, select_metric="last"),  # ~120 val images pick epochs by noise
}


def _number(kind, low, name):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {name}; got {text}")
        return value
    return parse


COUNT = _number(int, 1, "at least 1")
SEED = _number(int, 0, "0 or more")
POSITIVE = _number(float, 1e-300, "positive")
NON_NEGATIVE = _number(float, 0.0, "0 or more")


class Parser(argparse.ArgumentParser):
    """Bad flags end with one line, like every other user error (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = Parser(
        description="Train and evaluate a Siamese ResNet (BCE + contrastive loss) for melanoma detection on ISIC 2020.",
        argument_default=argparse.SUPPRESS,  # only flags the user typed override the profile's defaults
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="dataset folder, e.g. the Kaggle 'ISIC 2020 JPG 256x256 RESIZED' layout")
    g.add_argument("--csv", help="metadata CSV (isic_id or image_name, patient_id, target); use with --image-dir")
    g.add_argument("--image-dir", help="folder with <id>.jpg/.jpeg/.png images; use with --csv")
    g.add_argument("--duplicates", help="CSV of duplicate pairs (image_name_1, image_name_2) kept in one split")
    g.add_argument("--splits", help="use this splits.csv (isic_id, split) instead of making a new split")
    g.add_argument("--split-by", choices=["patient", "image"], help=f"leakage-free split unit (default {d.split_by})")
    g.add_argument("--val-frac", type=float, help=f"validation fraction (default {d.val_frac})")
    g.add_argument("--test-frac", type=float, help=f"test fraction (default {d.test_frac})")
    g.add_argument("--img-size", type=COUNT, help=f"square image side in pixels (default {d.img_size})")
    g.add_argument("--cache-dir", help=f"where decoded images are cached (default {d.cache_dir})")
    g.add_argument("--no-cache", action="store_true", help="decode images on the fly instead of caching them")
    g.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images instead of stopping")
    g.add_argument("--workers", type=SEED, help=f"data loader worker processes (default {d.workers})")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50"], help=f"trunk (default {d.backbone})")
    g.add_argument("--weights", help="none | imagenet | PATH to a trunk state dict (default none)")
    g.add_argument("--embedding-dim", type=COUNT, help=f"embedding size (default {d.embedding_dim})")
    g = p.add_argument_group("loss")
    g.add_argument("--w-bce", type=NON_NEGATIVE, help=f"weight of the BCE term (default {d.w_bce})")
    g.add_argument("--w-cl", type=NON_NEGATIVE, help=f"weight of the contrastive term (default {d.w_cl})")
    g.add_argument("--pos-margin", type=NON_NEGATIVE, help=f"contrastive positive margin (default {d.pos_margin})")
    g.add_argument("--neg-margin", type=NON_NEGATIVE, help=f"contrastive negative margin (default {d.neg_margin})")
    g.add_argument("--no-normalize-embeddings", dest="normalize_embeddings", action="store_false",
                   help="use raw instead of L2-normalised embeddings in the contrastive distance")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=COUNT, help=f"epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=COUNT, help="training batch, half benign half malignant; per process under "
                   f"torchrun (default {d.batch_size})")
    g.add_argument("--eval-batch-size", type=COUNT, help=f"evaluation batch (default {d.eval_batch_size})")
    g.add_argument("--lr", type=POSITIVE, help=f"peak learning rate of AdamW (default {d.lr})")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, help="AdamW weight decay of weight matrices and kernels "
                   f"(default {d.weight_decay})")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE,
                   help=f"linear warm-up before cosine decay (default {d.warmup_epochs})")
    g.add_argument("--ema", type=NON_NEGATIVE, help="keep and evaluate a moving average of the weights with this "
                   f"decay per step; 0 turns it off (default {d.ema})")
    g.add_argument("--select-metric", choices=["pauc", "auroc", "last"],
                   help="validation metric that picks best.pt, or 'last' for the final epoch's weights "
                   f"(default {d.select_metric})")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: a new folder under runs/)")
    g.add_argument("--seed", type=SEED, help=f"seed for split, sampler and weights (default {d.seed})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="compute device (default auto)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                   help="repeatable kernels (default: on for CPU, off on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: SyncBatchNorm, BatchNorm statistics over every process's batch")
    g.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE panel of embeddings.png")
    g.add_argument("--tta", action="store_true", help="also evaluate val/test with 8-fold flip/rotation test-time "
                   "augmentation (metrics.json 'tta'; 8x the evaluation time)")
    g.add_argument("--resume", help="continue the interrupted run in this folder")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder given by --out")
    g.add_argument("--check-data", action="store_true",
                   help="validate the data, write OUT/splits.csv and OUT/data_report.txt, exit (non-zero if unusable)")
    g.add_argument("--check-images", action="store_true", help="with --check-data: also decode every image (slow)")
    g.add_argument("--demo", action="store_true", help="generate a small synthetic dataset and train on it (CPU-sized)")
    g.add_argument("--profile", choices=sorted(PROFILES), help="preset of defaults: default | cpu | demo")
    return p


def parse_cli(argv=None) -> dict:
    """Only the flags the user actually typed."""
    return vars(build_parser().parse_args(argv))


def settings_from_cli(given: dict) -> Settings:
    """Defaults, then the profile's, then the user's flags."""
    profile = given.get("profile", "demo" if given.get("demo") else "default")
    return dataclasses.replace(Settings(), **{**PROFILES[profile], "profile": profile, **given})


# What may change when a run is resumed; everything else comes from the run's config.json.
RESUMABLE = {"resume", "device", "workers", "cache_dir"}
