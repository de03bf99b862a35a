"""Export a trained run for use outside this code: the network with its preprocessing, as a torch.export program
(.pt2, needs only PyTorch) or ONNX (.onnx, for ONNX Runtime), checked against the run's own predictions.

    python export.py --run runs/X                       # → runs/X/model.pt2, checked on 16 of the run's test images
    python export.py --run runs/X --format onnx         # → runs/X/model.onnx (pip install onnx onnxscript onnxruntime)

The exported model takes a batch of uint8 RGB images (B, 3, H, W) of any batch size, height and width (each at least
2 pixels; the images of one batch share their H x W), each a file decoded in full (PIL's Image.open(f).convert("RGB")),
and returns (probability of melanoma, embedding). Inside is the second half of the pipeline's decode
(image_cache.resize_and_crop): the shorter side resized to the run's --img-size (antialiased bilinear, rounded to
integers after the horizontal and after the vertical pass, as torchvision resizes uint8 images), the centre square
cropped, scaled to [0, 1]; the network normalises as the run did. The export is checked on the first --check test
images, read as a user reads them, against the run's model on the pipeline's decode of the same files (what its
predictions.csv came from), and on a portrait and a landscape crop of each.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.augment import to_float
from engine.config import COUNT, Parser, add_settings
from isic.image_cache import decode, resize_and_crop
from isic.metadata import find_layout, locate_images
from isic.splits import read_splits
from scoring.inference import load_run
from utils import UserError, atomic_path, cli_main

TOLERANCE = 0.002  # largest accepted |probability difference| between the exported model and the run


def centre_offset(excess):
    """round(excess / 2) as Python rounds (halves to even), the offset of torchvision's center_crop, in integer
    arithmetic that torch.export keeps symbolic."""
    half = excess // 2
    return half + (excess % 2) * (half % 2)


def resample(images: torch.Tensor, height, width) -> torch.Tensor:
    """One antialiased bilinear resize, rounded to integers as a uint8 resize is."""
    resized = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (resized + 0.5).floor()  # halves up, as uint8 resizing rounds (torch.round takes them to even)


class Deployable(nn.Module):
    """uint8 images (B, 3, H, W) → (probabilities (B,), embeddings (B, D)), preprocessing included.

    image_cache.resize_and_crop in operations whose sizes stay symbolic in H and W: no branch on the orientation (the
    shorter side by sym_min), and the crop by index_select (narrow would make the program guard on the orientation of
    the example it was traced with)."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        self.model, self.img_size = model, img_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.img_size
        height, width = images.shape[-2:]
        shorter = torch.sym_min(height, width)
        new_height, new_width = size * height // shorter, size * width // shorter  # torchvision's int(size * h / w)
        x = resample(resample(images.float(), height, new_width), new_height, new_width)  # horizontal, then vertical
        keep = torch.arange(size, device=images.device)
        x = x.index_select(2, keep + centre_offset(new_height - size))
        x = x.index_select(3, keep + centre_offset(new_width - size))
        embedding, logit = self.model(x / 255)
        return torch.sigmoid(logit), embedding


def write_export(model: nn.Module, img_size: int, path: Path, fmt: str) -> None:
    """Export for uint8 input (B, 3, H, W) with batch size, height and width left free."""
    # Traced on a batch of 2 and a shape no other dimension equals: an example of size 1, or H = W, or H or W equal
    # to img_size, would fix that dimension.
    example = torch.zeros(2, 3, img_size + 13, img_size + 29, dtype=torch.uint8)
    free = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    program = torch.export.export(Deployable(model, img_size).eval(), (example,), dynamic_shapes=(free,))
    if fmt == "pt2":
        with open(path, "wb") as f:  # a handle: torch warns about a path without the .pt2 suffix (a temporary file)
            torch.export.save(program, f)
        return
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter needs it
        raise UserError("--format onnx needs the onnx exporter packages: pip install onnx onnxscript onnxruntime")
    # Weights inside the one file (under ONNX's 2 GB limit): written beside it, they would keep the temporary name.
    torch.onnx.export(program, (example,), str(path), input_names=["images"],
                      output_names=["probability", "embedding"], dynamo=True, optimize=True, external_data=False)


def load_export(path: Path, fmt: str | None = None):
    """A callable uint8 (B, 3, H, W) numpy/tensor → (probabilities, embeddings) as numpy, for either format
    (by default the file's suffix)."""
    if (fmt or Path(path).suffix.lstrip(".")) == "pt2":
        with open(path, "rb") as f:  # a handle: torch warns about a path without the .pt2 suffix (a temporary file)
            module = torch.export.load(f).module()
        return lambda images: tuple(t.detach().numpy() for t in module(torch.as_tensor(images)))
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an .onnx export needs ONNX Runtime: pip install onnxruntime") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: tuple(session.run(None, {"images": np.asarray(images)}))


def check_images(run_dir: Path, s, n: int) -> list[Path]:
    """The first `n` images of the run's test split, as files: the export is checked on what users will feed it."""
    splits = read_splits(run_dir / "splits.csv")
    ids = list(splits.loc[splits["split"] == "test", "isic_id"][:n])
    if not ids:
        raise UserError(f"{run_dir / 'splits.csv'} has no test images to check the export on")
    _, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
    paths, missing = locate_images(ids, image_dir)
    if missing:
        raise UserError(f"cannot check the export: {missing}")
    return paths


def as_a_user_reads(path) -> torch.Tensor:
    """The file decoded in full by PIL, as the README tells a user of the export: uint8 (3, H, W)."""
    with Image.open(path) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)


def shapes_to_check(image: torch.Tensor) -> list[torch.Tensor]:
    """The image as it is, and a portrait and a landscape crop of it with an odd side: the shapes users may feed,
    whatever shapes the test split holds."""
    side = min(image.shape[-2:])
    narrow = side * 2 // 3 | 1
    return [image, image[:, :side, :narrow], image[:, :narrow, :side]]


def largest_difference(exported, model, paths, img_size: int) -> tuple[float, int]:
    """Max |probability difference|, and over how many images: the exported model on the files as a user reads them,
    the run's model on the pipeline's decode of the same files (image_cache.decode, what the run's predictions.csv
    came from); and on the crops, the exported model against the run's model on the pipeline's resize_and_crop."""
    worst, checked = 0.0, 0
    with torch.inference_mode():
        for path in paths:
            image, *crops = shapes_to_check(as_a_user_reads(path))
            pairs = [(image, decode(path, img_size))] + [(crop, resize_and_crop(crop, img_size)) for crop in crops]
            for given, pipeline in pairs:
                probability, _ = exported(given[None].numpy())
                _, logit = model(to_float(pipeline[None]))
                worst = max(worst, float(np.abs(probability - torch.sigmoid(logit).numpy()).max()))
                checked += 1
    return worst, checked


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--format", choices=["pt2", "onnx"], default="pt2",
                   help="pt2: torch.export program (default); onnx: ONNX for ONNX Runtime")
    p.add_argument("--out", help="file to write (default: RUN/model.pt2 or RUN/model.onnx)")
    p.add_argument("--check", type=COUNT, default=16, help="test images the export is checked on (default 16)")
    add_settings(p, ["data_dir", "csv", "image_dir"],
                 help={"data_dir": "where the run's images are now, if they moved (default: the run's)"})
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run)
    s, model = load_run(run_dir, torch.device("cpu"))
    if s.metadata:
        raise UserError(f"{run_dir} was trained with --metadata {s.metadata}: exporting its metadata branch and encoder "
                        "is not supported yet; export a run trained on images alone")
    if args.data_dir or args.csv:
        s.data_dir, s.csv, s.image_dir = args.data_dir, args.csv, args.image_dir
    model = model.to(memory_format=torch.contiguous_format)
    out = Path(args.out) if args.out else run_dir / f"model.{args.format}"
    paths = check_images(run_dir, s, args.check)
    with atomic_path(out) as written:  # a file that fails its check is never left behind
        write_export(model, s.img_size, written, args.format)
        difference, checked = largest_difference(load_export(written, args.format), model, paths, s.img_size)
        if difference > TOLERANCE:
            raise UserError(f"the exported model differs from the run by up to {difference:.4f} in probability "
                            f"(more than {TOLERANCE}); nothing written")
    print(f"wrote {out} for uint8 images (B, 3, H, W) of any size; checked on {checked} images ({len(paths)} test "
          f"images, each also cropped to a portrait and a landscape): largest probability difference "
          f"{difference:.2e} (tolerance {TOLERANCE})")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
