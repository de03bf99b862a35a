"""The full-scale check: a run on a generated dataset of ISIC 2020's shape, with every default output, timed by phase.

    python -m experiments.scale_check                 # 33,126 images, resnet18 at 32 px, one epoch (make scale-check)
    python -m experiments.scale_check --decode-only   # only the decode's cost: full against DCT-scaled, side by side

The dataset (data/scale-check, generated once, reused by later calls) has the official training set's shape: 33,126
images, 2,056 patients with from one to dozens of images each, 1.8% malignant. Sizes are mixed so that every decode
path runs: 10% are 6000 x 4000 JPEGs (the largest originals), 15% between 1024 x 768 and 1872 x 1404, the rest
256 x 256 as in the Kaggle resized set. To save disk and generation time, the images are copies of a few hundred
distinct generated lesions (eight at 6000 x 4000), hard-linked under many names: each name is still a file of its
own to open, decode and cache. Prints the phase table of timings.json and the peak memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from engine import timings
from isic.demo import lesion
from isic.image_cache import decode, resize_and_crop
from workflow.pipeline import run
from utils import cli_main

DATA = Path("data/scale-check")
IMAGES, PATIENTS, MALIGNANT = 33_126, 2_056, 0.018
# (share of the images, their sizes, distinct generated lesions per class)
SIZES = ((0.10, [(6000, 4000)], 4), (0.15, [(1024, 768), (1600, 1200), (1872, 1404)], 12), (0.75, [(256, 256)], 400))


def images_per_patient(rng, images: int, patients: int) -> np.ndarray:
    """Heavy-tailed counts summing to `images`: most patients have a handful of images, a few have dozens."""
    weights = rng.lognormal(0, 1.0, patients)
    return 1 + rng.multinomial(images - patients, weights / weights.sum())


def distinct_image(rng, malignant: bool, size: tuple[int, int]) -> Image.Image:
    """A generated lesion (demo.lesion, drawn at a few hundred pixels) enlarged to `size`, with pixel-level grain so
    that a large JPEG carries detail to decode, as a photograph does."""
    side = max(size)
    image = Image.fromarray(lesion(rng, malignant, min(side, 320))).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(image.crop(((side - size[0]) // 2, (side - size[1]) // 2,
                                    (side + size[0]) // 2, (side + size[1]) // 2)), dtype=np.int16)
    grain = rng.integers(-3, 4, size=pixels.shape[:2], dtype=np.int16)[..., None]
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))


def generate(root: Path, images: int = IMAGES, patients: int = PATIENTS, seed: int = 0, sizes=SIZES,
             malignant: float = MALIGNANT) -> Path:
    """root/train-metadata.csv (written last: its presence means the set is complete) and train-image/image/."""
    root = Path(root)
    if (root / "train-metadata.csv").is_file():
        return root
    rng = np.random.default_rng(seed)
    image_dir, pool_dir = root / "train-image" / "image", root / "distinct"
    image_dir.mkdir(parents=True, exist_ok=True)
    pool_dir.mkdir(parents=True, exist_ok=True)
    counts = images_per_patient(rng, images, patients)
    patient_ids = np.repeat([f"IP_{p:07d}" for p in range(len(counts))], counts)
    targets = np.zeros(images, int)
    targets[rng.choice(images, round(malignant * images), replace=False)] = 1
    size_class = rng.choice(len(sizes), images, p=[share for share, _, _ in sizes])
    print(f"generating {images} images of {patients} patients in {root} (distinct lesions hard-linked) ...", flush=True)
    pools = {}
    for k, (_, shapes, distinct) in enumerate(sizes):
        for target in (0, 1):
            pools[k, target] = []
            for j in range(distinct):
                path = pool_dir / f"size{k}-{'malignant' if target else 'benign'}-{j}.jpg"
                distinct_image(rng, bool(target), shapes[j % len(shapes)]).save(path, quality=90)
                pools[k, target].append(path)
    ids = [f"ISIC_{1_000_000 + i:07d}" for i in range(images)]
    for i, isic_id in enumerate(ids):
        pool = pools[size_class[i], targets[i]]
        os.link(pool[rng.integers(len(pool))], image_dir / f"{isic_id}.jpg")
    frame = pd.DataFrame({"isic_id": ids, "patient_id": patient_ids, "target": targets})
    frame.to_csv(root / "train-metadata.csv")  # with the unnamed index column, as Kaggle's file has
    return root


def dct_scaled(path, size: int) -> torch.Tensor:
    """A JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8: PIL's draft) still covering `size`, then resized and
    cropped: faster than image_cache.decode, but not what a user who decodes the file in full gets, so not used."""
    with Image.open(path) as pil:
        pil.draft("RGB", (size, size))
        return resize_and_crop(torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1), size)


def decode_comparison(paths, size: int, rounds: int = 3) -> dict:
    """Images/s of one process decoding `paths` as the pipeline does (in full, then resized) and at a DCT scale,
    side by side in alternating rounds, and the pixel difference between the two (in grey levels of 255)."""
    seconds = {"full": 0.0, "scaled": 0.0}
    differences = []
    for _ in range(rounds):
        for name, fn in (("full", decode), ("scaled", dct_scaled)):
            started = time.perf_counter()
            results = [fn(p, size) for p in paths]
            seconds[name] += time.perf_counter() - started
            if name == "full":
                reference = results
        differences += [(a.int() - b.int()).abs() for a, b in zip(reference, results)]
    delta = torch.stack(differences).float()
    n = rounds * len(paths)
    return {"full_images_per_s": n / seconds["full"], "scaled_images_per_s": n / seconds["scaled"],
            "speedup": seconds["full"] / seconds["scaled"], "mean_abs_diff": float(delta.mean()),
            "max_abs_diff": float(delta.max()), "images": len(paths), "rounds": rounds}


def print_decode_comparison(paths, what: str, size: int) -> None:
    r = decode_comparison(paths, size)
    print(f"decoding {r['images']} {what} to {size} px, {r['rounds']} rounds, one process: in full (the pipeline) "
          f"{r['full_images_per_s']:.2f} images/s, DCT-scaled (not used) {r['scaled_images_per_s']:.2f} images/s: "
          f"the full decode takes {r['speedup']:.2f}x as long; |difference| mean {r['mean_abs_diff']:.3f}, max "
          f"{r['max_abs_diff']:.0f} grey levels of 255", flush=True)


def peak_memory() -> str:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return f"peak memory (resident): {own:.2f} GB in the run's process, {workers:.2f} GB in the largest worker"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help=f"where the generated dataset is kept (default {DATA})")
    p.add_argument("--out", default="runs/scale-check", help="run folder, replaced (default runs/scale-check)")
    p.add_argument("--images", type=int, default=IMAGES, help=f"images (default {IMAGES}; patients scale along)")
    p.add_argument("--img-size", type=int, default=32, help="image side of the run (default 32)")
    p.add_argument("--decode-size", type=int, default=256, help="target side of the decode comparison (default 256)")
    p.add_argument("--decode-only", action="store_true", help="only the side-by-side decode comparison")
    p.add_argument("--decode-files", help="with --decode-only: compare on the first 200 JPEGs of this folder instead "
                                          "of the generated 6000 x 4000 ones (e.g. a Kaggle 256 x 256 image folder)")
    args = p.parse_args(argv)
    if args.decode_only and args.decode_files:
        files = sorted(Path(args.decode_files).glob("*.jpg"))[:200]
        return print_decode_comparison(files, f"JPEGs of {args.decode_files}", args.decode_size)
    root = generate(Path(args.data), args.images, max(2, round(PATIENTS * args.images / IMAGES)))
    print_decode_comparison(sorted((root / "distinct").glob("size0-*.jpg")), "distinct 6000 x 4000 JPEGs",
                            args.decode_size)
    if args.decode_only:
        return
    out = run({"data_dir": str(root), "backbone": "resnet18", "img_size": args.img_size, "epochs": 1,
               "out": args.out, "overwrite": True})
    print(f"\n{timings.format_table(timings.read(out / 'timings.json'))}")
    print(timings.summary(timings.read(out / "timings.json")))
    print(peak_memory())


if __name__ == "__main__":
    sys.exit(cli_main(main))
