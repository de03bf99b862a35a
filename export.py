"""Export a trained run for use outside this code: the network with its preprocessing, as a torch.export program
(.pt2, needs only PyTorch) or ONNX (.onnx, for ONNX Runtime), checked against the run's own predictions.

    python export.py --run runs/X                       # → runs/X/model.pt2, checked on 16 of the run's test images
    python export.py --run runs/X --format onnx         # → runs/X/model.onnx (pip install onnx onnxscript onnxruntime)

The exported model takes a batch of uint8 RGB images (B, 3, H, W), any batch size, at the H x W it was exported for
(default: the size of the run's own image files; --input-size H W for another) and returns (probability of melanoma,
embedding): it crops the centre square, resizes it to the run's --img-size (antialiased bilinear), scales to [0, 1]
and normalises as the run did. The pipeline resizes the shorter side first and rounds to uint8 before cropping, so the
two differ by resampling rounding only: the check reports the largest difference.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import ImageReadMode, decode_image

from augment import to_float
from config import COUNT, Parser, add_settings
from image_cache import decode
from inference import load_run
from metadata import find_layout, locate_images
from splits import read_splits
from utils import UserError, cli_main

TOLERANCE = 0.02  # largest accepted |probability difference| between the exported model and the run


class Deployable(nn.Module):
    """uint8 images (B, 3, H, W) → (probabilities (B,), embeddings (B, D)), preprocessing included.

    The crop is fixed at export for one H x W: a crop that depends on the input's shape would make the exported
    program guard on the orientation of the example image (torch.export specialises min(H, W))."""

    def __init__(self, model: nn.Module, img_size: int, height: int, width: int):
        super().__init__()
        self.model, self.img_size = model, img_size
        side = min(height, width)
        self.rows = slice((height - side) // 2, (height - side) // 2 + side)
        self.columns = slice((width - side) // 2, (width - side) // 2 + side)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        square = images[:, :, self.rows, self.columns].float() / 255
        x = F.interpolate(square, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                          align_corners=False)
        embedding, logit = self.model(x)
        return torch.sigmoid(logit), embedding


def write_export(model: nn.Module, img_size: int, height: int, width: int, path: Path, fmt: str) -> None:
    """Export for uint8 input (B, 3, height, width) with the batch size left free."""
    example = torch.zeros(2, 3, height, width, dtype=torch.uint8)  # a batch of 1 would fix the batch size at 1
    program = torch.export.export(Deployable(model, img_size, height, width).eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    if fmt == "pt2":
        torch.export.save(program, path)
        return
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter needs it
        raise UserError("--format onnx needs the onnx exporter packages: pip install onnx onnxscript onnxruntime")
    torch.onnx.export(program, (example,), str(path), input_names=["images"],
                      output_names=["probability", "embedding"], dynamo=True, optimize=True)


def load_export(path: Path):
    """A callable uint8 (B, 3, H, W) numpy/tensor → (probabilities, embeddings) as numpy, for either format."""
    if path.suffix == ".pt2":
        module = torch.export.load(path).module()
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
    _, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
    paths, missing = locate_images(ids, image_dir)
    if missing:
        raise UserError(f"cannot check the export: {missing}")
    return paths


def read_full_size(path: Path) -> torch.Tensor:
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB)


def largest_difference(exported, model, paths, img_size: int, height: int, width: int) -> tuple[float, int]:
    """Max |probability difference|, and over how many images: the exported model on the files as they are (those of
    the exported size), the run's model on the pipeline's decoding of them."""
    worst, checked = 0.0, 0
    with torch.inference_mode():
        for path in paths:
            image = read_full_size(path)
            if tuple(image.shape[1:]) != (height, width):
                continue
            probability, _ = exported(image[None].numpy())
            _, logit = model(to_float(decode(path, img_size)[None]))
            worst = max(worst, float(np.abs(probability - torch.sigmoid(logit).numpy()).max()))
            checked += 1
    return worst, checked


def run(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder written by driver.py")
    p.add_argument("--format", choices=["pt2", "onnx"], default="pt2",
                   help="pt2: torch.export program (default); onnx: ONNX for ONNX Runtime")
    p.add_argument("--out", help="file to write (default: RUN/model.pt2 or RUN/model.onnx)")
    p.add_argument("--input-size", type=COUNT, nargs=2, metavar=("H", "W"),
                   help="input images' height and width (default: the size of the run's first test image)")
    p.add_argument("--check", type=COUNT, default=16, help="test images the export is checked on (default 16)")
    add_settings(p, ["data_dir", "csv", "image_dir"],
                 help={"data_dir": "where the run's images are now, if they moved (default: the run's)"})
    args = p.parse_args(argv)
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
    height, width = args.input_size or read_full_size(paths[0]).shape[1:]
    write_export(model, s.img_size, height, width, out, args.format)
    difference, checked = largest_difference(load_export(out), model, paths, s.img_size, height, width)
    if not checked:
        out.unlink()
        raise UserError(f"none of the {len(paths)} test images checked is {height} x {width}: cannot check the export")
    if difference > TOLERANCE:
        out.unlink()
        raise UserError(f"the exported model differs from the run by up to {difference:.4f} in probability "
                        f"(more than {TOLERANCE}); nothing written")
    print(f"wrote {out} for uint8 images (B, 3, {height}, {width}); checked on {checked} test images: largest "
          f"probability difference {difference:.2e} (tolerance {TOLERANCE})")


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
