"""The one settings object: every step reads it, the CLI fills it, the run folder keeps it as config.json.

Each setting is declared once, as a field of `Settings`: its default, help text, flag, type or choices, argparse
group, whether it may change on --resume and whether it changes what a run computes. The command line, RESUMABLE
and NOT_OUTCOME are all derived from those fields.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

GROUPS = ("data", "model", "loss", "optimisation", "run")

# Profiles change the defaults; flags given on the command line still win.
PROFILES = {
    "default": {},
    # Runs anywhere in a few minutes on generated data (driver.py --demo).
    "demo": dict(backbone="resnet18", img_size=64, epochs=6, batch_size=32, lr=1e-3, workers=0, warmup_epochs=0.5,
                 ema=0.0),  # 140 steps in all: too few for a moving average to settle
    # Small enough for a 2-core CPU on the 740-image sample (about 13 minutes on a 2-core AMD EPYC).
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


def setting(default=None, help=None, *, group=None, type=None, choices=None, flag=None, action=None,
            resumable=False, outcome=True, factory=None):
    """A Settings field with everything the command line needs to know about it.

    help: "{default}" in it becomes the default; a setting without help has no flag.
    flag: the option string, by default --name-with-dashes (the value always lands in the field's name).
    resumable: may be given again with --resume (everything else comes from the run's config.json).
    outcome: False for settings that only say where things are or how fast they run, not what is computed.
    """
    metadata = dict(help=help, group=group, type=type, choices=choices, flag=flag, action=action,
                    resumable=resumable, outcome=outcome)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Settings:
    # data
    data_dir: Optional[str] = setting(None, "dataset folder, e.g. the Kaggle 'ISIC 2020 JPG 256x256 RESIZED' layout",
                                      group="data", outcome=False)  # a known layout, see dataset.find_layout
    csv: Optional[str] = setting(None, "metadata CSV (isic_id or image_name, patient_id, target); use with --image-dir",
                                 group="data", outcome=False)
    image_dir: Optional[str] = setting(None, "folder with <id>.jpg/.jpeg/.png images; use with --csv",
                                       group="data", outcome=False)
    duplicates: Optional[str] = setting(None, "CSV of duplicate pairs (image_name_1, image_name_2) kept in one split",
                                        group="data", outcome=False)
    extra_csv: Optional[str] = setting(None, "CSV of more columns (e.g. diagnosis) joined onto the metadata by "
                                       "image id (isic_id or image_name), e.g. the official "
                                       "ISIC_2020_Training_GroundTruth.csv", group="data", outcome=False)
    splits: Optional[str] = setting(None, "use this splits.csv (isic_id, split) instead of making a new split",
                                    group="data", outcome=False)  # e.g. cross-validation's folds
    split_by: str = setting("patient", "leakage-free split unit (default {default})", group="data",
                            choices=["patient", "image"])
    val_frac: float = setting(0.15, "validation fraction (default {default})", group="data", type=float)
    test_frac: float = setting(0.10, "test fraction (default {default})", group="data", type=float)
    img_size: int = setting(256, "square image side in pixels (default {default})", group="data", type=COUNT)
    # decoded uint8 images, memory-mapped, reused across runs
    cache_dir: str = setting("cache", "where decoded images are cached (default {default})", group="data",
                             resumable=True, outcome=False)
    no_cache: bool = setting(False, "decode images on the fly instead of caching them", group="data",
                             action="store_true")
    skip_bad_images: bool = setting(False, "drop unreadable images instead of stopping", group="data",
                                    action="store_true")
    # None: chosen by pipeline.loader_workers from the device and data path; config.json records the number used
    workers: Optional[int] = setting(None, "data loader worker processes (default: 0 on a CPU reading the image "
                                     "cache, min(4, cores) on a GPU or with --no-cache)",
                                     group="data", type=SEED, resumable=True, outcome=False)
    # "auto": on a GPU when the image cache takes at most half its free memory (dataset.RESIDENT_SHARE)
    resident: str = setting("auto", "hold the decoded images in the device's memory and draw every batch from there "
                            "by index (same batches, same order): auto = on a GPU when the cache takes at most half "
                            "its free memory, never on a CPU (default {default})", group="data",
                            choices=["auto", "on", "off"], resumable=True, outcome=False)
    # model
    backbone: str = setting("resnet50", "trunk: resnet18, resnet34, resnet50 (torchvision) or any timm model name, "
                            "e.g. efficientnet_b3, convnext_tiny, vit_small_patch16_224 (default {default})",
                            group="model")
    weights: str = setting("none", "none | imagenet | PATH to the trunk's weights, a .safetensors or .pth state dict "
                           "(default {default})", group="model")
    embedding_dim: int = setting(64, "embedding size (default {default})", group="model", type=COUNT)
    metadata: str = setting("", "patient metadata the head sees beside the image embedding: a comma list of age, sex, "
                            "site (columns of the metadata CSV or of --extra-csv, e.g. the official ground truth); "
                            "default none", group="model")
    # loss
    w_bce: float = setting(1.0, "weight of the BCE term (default {default})", group="loss", type=NON_NEGATIVE)
    w_cl: float = setting(1.0, "weight of the contrastive term (default {default})", group="loss", type=NON_NEGATIVE)
    w_instance: float = setting(0.0, "weight of the instance term: NT-Xent between two augmented views of each "
                                "training image, every other image of the batch a negative (per process under "
                                "torchrun: each its own negatives); costs a second forward pass of the batch; "
                                "0 = off (default {default})", group="loss", type=NON_NEGATIVE)
    instance_temperature: float = setting(0.1, "temperature of the instance term's NT-Xent (default {default})",
                                          group="loss", type=POSITIVE)
    pos_margin: float = setting(0.0, "contrastive positive margin (default {default})", group="loss",
                                type=NON_NEGATIVE)
    neg_margin: float = setting(1.0, "contrastive negative margin (default {default})", group="loss",
                                type=NON_NEGATIVE)
    normalize_embeddings: bool = setting(True, "use raw instead of L2-normalised embeddings in the contrastive "
                                         "distance", group="loss", flag="--no-normalize-embeddings",
                                         action="store_false")
    xbm: int = setting(0, "cross-batch memory: pair each batch also with the last N training embeddings "
                       "(pytorch-metric-learning CrossBatchMemory; per process under torchrun); 0 = off "
                       "(default {default})", group="loss", type=SEED)
    miner: str = setting("none", "pair miner for the contrastive term: only the pairs it picks count "
                         "(default {default})", group="loss", choices=["none", "multisimilarity", "batchhard"])
    pair_labels: str = setting("target", "labels that make contrastive pairs: target (benign/malignant) or "
                               "diagnosis (the metadata's 'diagnosis' column, see --extra-csv; the head keeps the "
                               "target) (default {default})", group="loss", choices=["target", "diagnosis"])
    # optimisation
    epochs: int = setting(15, "epochs (default {default})", group="optimisation", type=COUNT)
    batch_size: int = setting(64, "training batch, half benign half malignant; per process under torchrun "
                              "(default {default})", group="optimisation", type=COUNT)
    eval_batch_size: int = setting(256, "evaluation batch (default {default})", group="optimisation", type=COUNT)
    lr: float = setting(3e-4, "peak learning rate of AdamW (default {default})", group="optimisation", type=POSITIVE)
    # train.peak_lr applies it; the sampler keeps every batch half benign, half malignant at any size
    lr_scaling: str = setting("none", "none: --lr as given; linear: --lr times the batch (all processes together) "
                              "over 64, the batch --lr was chosen at (default {default})", group="optimisation",
                              choices=["none", "linear"])
    # AdamW (decoupled); not on BatchNorm weights or biases
    weight_decay: float = setting(0.05, "AdamW weight decay of weight matrices and kernels (default {default})",
                                  group="optimisation", type=NON_NEGATIVE)
    warmup_epochs: float = setting(1.0, "linear warm-up before cosine decay (default {default})",
                                   group="optimisation", type=NON_NEGATIVE)
    ema: float = setting(0.999, "keep and evaluate a moving average of the weights with this decay per step; "
                         "0 turns it off (default {default})", group="optimisation", type=NON_NEGATIVE)
    # A resume replays from last.pt's epoch; best.pt is written whenever validation improves, whatever this says
    save_every: int = setting(1, "write last.pt every N epochs (and after the last one, or when stopped by a signal); "
                              "best.pt is written whenever validation improves; --resume continues from last.pt's "
                              "epoch (default {default})", group="optimisation", type=COUNT, resumable=True,
                              outcome=False)
    select_metric: str = setting("pauc", "validation metric that picks best.pt, or 'last' for the final epoch's "
                                 "weights (default {default})", group="optimisation", choices=["pauc", "auroc", "last"])
    # run
    out: Optional[str] = setting(None, "run folder (default: a new folder under runs/)", group="run", outcome=False)
    seed: int = setting(42, "seed for split, sampler and weights (default {default})", group="run", type=SEED)
    device: str = setting("auto", "compute device (default {default})", group="run",
                          choices=["auto", "cpu", "cuda", "mps"], resumable=True, outcome=False)
    deterministic: Optional[bool] = setting(None, "repeatable kernels (default: on for CPU, off on GPU)", group="run",
                                            action=argparse.BooleanOptionalAction)
    compile: bool = setting(False, "torch.compile the model", group="run", action="store_true")
    sync_bn: bool = setting(False, "under torchrun on GPUs: SyncBatchNorm, BatchNorm statistics over every "
                            "process's batch", group="run", action="store_true")
    tsne: bool = setting(True, "skip the t-SNE panel of embeddings.png", group="run", flag="--no-tsne",
                         action="store_false")
    tensorboard: bool = setting(True, "write no TensorBoard event files (default: RUN/tb, for tensorboard --logdir)",
                                group="run", flag="--no-tensorboard", action="store_false", resumable=True,
                                outcome=False)
    tta: bool = setting(False, "also evaluate val/test with 8-fold flip/rotation test-time augmentation "
                        "(metrics.json 'tta'; 8x the evaluation time)", group="run", action="store_true")
    # how evaluation finds the nearest training lesions: nothing trained or scored for the diagnosis depends on it
    neighbours_by: str = setting("look", "what the nearest training lesions (similar.png, neighbours.csv, retrieval "
                                 "metrics) are nearest in: look (the trunk's feature statistics) or embedding (the "
                                 "class embedding kNN scores with; default {default})", group="run",
                                 choices=["look", "embedding"], resumable=True)
    # only what neighbours.csv lists: nothing trained or scored depends on it
    neighbours: int = setting(5, "nearest training lesions listed per image in neighbours.csv (default {default})",
                              group="run", type=COUNT, resumable=True, outcome=False)
    resume: Optional[str] = setting(None, "continue the interrupted run in this folder", group="run",
                                    resumable=True, outcome=False)
    overwrite: bool = setting(False, "replace an existing run folder given by --out", group="run",
                              action="store_true", outcome=False)
    check_data: bool = setting(False, "validate the data, write OUT/splits.csv and OUT/data_report.txt, exit "
                               "(non-zero if unusable)", group="run", action="store_true")
    check_images: bool = setting(False, "with --check-data: also decode every image (slow)", group="run",
                                 action="store_true")
    demo: bool = setting(False, "generate a small synthetic dataset and train on it (CPU-sized)", group="run",
                         action="store_true")
    profile: str = setting("default", "preset of defaults: default | cpu | demo", group="run",
                           choices=sorted(PROFILES))
    versions: dict = setting(factory=dict, outcome=False)  # library versions, recorded by the run itself
    given: list = setting(factory=list, outcome=False)  # the settings the user typed (or a script passed), by name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

# What may change when a run is resumed; everything else comes from the run's config.json.
RESUMABLE = {name for name, f in FIELDS.items() if f.metadata["resumable"]}
# Settings that say where things are or how fast they run, not what is computed.
NOT_OUTCOME = {name for name, f in FIELDS.items() if not f.metadata["outcome"]}


class Parser(argparse.ArgumentParser):
    """Bad flags end with one line, like every other user error (argparse would print the whole usage first).
    No abbreviations: argparse would take a mistyped `--epoch 1` for `--epochs 1`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def flag_of(name: str) -> str:
    """The option string of a setting, as the user types it (e.g. tensorboard → --no-tensorboard)."""
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def add_settings(parser, names, *, default=None, help=None):
    """Add the flags of the named settings to a parser or argument group (e.g. predict.py's --workers, --device).

    default: what a flag that was not typed leaves behind. None: the parser's own argument_default (for a plain
    ArgumentParser: None, False for store_true, True for store_false); argparse.SUPPRESS: nothing at all.
    help: {name: text} to replace a setting's help where it means something else in that program.
    """
    for name in names:
        f = FIELDS[name]
        meta = f.metadata
        if meta["help"] is None:
            raise ValueError(f"setting {name!r} has no command-line flag")
        text = (help or {}).get(name, meta["help"])
        if f.default is not dataclasses.MISSING:
            text = text.format(default=f.default)
        kwargs = {key: meta[key] for key in ("type", "choices", "action") if meta[key] is not None}
        if default is not None:
            kwargs["default"] = default
        parser.add_argument(flag_of(name), dest=name, help=text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Train and evaluate a Siamese ResNet (BCE + contrastive loss) for melanoma detection on ISIC 2020.",
        argument_default=argparse.SUPPRESS,  # only flags the user typed override the profile's defaults
    )
    for group in GROUPS:
        add_settings(p.add_argument_group(group), [name for name, f in FIELDS.items() if f.metadata["group"] == group])
    return p


def parse_cli(argv=None) -> dict:
    """Only the flags the user actually typed."""
    return vars(build_parser().parse_args(argv))


def settings_from_cli(given: dict) -> Settings:
    """Defaults, then the profile's, then the user's flags."""
    profile = given.get("profile", "demo" if given.get("demo") else "default")
    return dataclasses.replace(Settings(), **{**PROFILES[profile], "profile": profile, **given})
