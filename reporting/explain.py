"""Pictures that explain a score: the gallery of confident hits and misses with Grad-CAM heat maps, and the same
cases beside their most similar training lesions (similar.png)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.augment import to_float
from isic.image_cache import decode
from isic.metadata import find_layout, locate_images
from reporting import plots
from scoring.inference import Predictions
from scoring.references import neighbour_space_name
from utils import UserError

GALLERY = 4  # cases per row of gallery.png
SIMILAR = 5  # training lesions beside each image in similar.png
CONFIDENT = 2  # similar.png: the gallery's most confident cases of each kind...
TYPICAL = 3  # ... then this many queries per class drawn at random (seeded): what retrieval is like for most lesions
FIRST_IMAGES = 12  # predict.py --images: similar.png shows the first 12 images (sorted by file name)
SAME_IMAGE = 1e-3  # a neighbour nearer than this is the query itself (distinct lesions lie ~0.01 apart or more)


MIN_CAM_CELLS = 7  # a coarser map cannot say where: at 64 px layer4 has 2 x 2 cells, layer3 4 x 4, layer2 8 x 8
RESNET_BLOCKS = (("layer4", 32), ("layer3", 16), ("layer2", 8), ("layer1", 4))  # torchvision ResNets, strides


def trunk_blocks(trunk) -> tuple[tuple[str, int], ...]:
    """The trunk's blocks that Grad-CAM may look at, deepest first, with their strides: timm lists a model's in its
    feature_info. A token model (ViT) pools its class token after the last block, so the patch tokens that block
    outputs get no gradient: its maps come from the block before."""
    info = getattr(trunk, "feature_info", None)
    if info is None:
        return RESNET_BLOCKS
    blocks = [(block["module"], block["reduction"]) for block in info]
    if getattr(trunk, "num_prefix_tokens", 0):
        blocks = blocks[:-1]
    return tuple(reversed(blocks))


def cam_layer(size: int, blocks=RESNET_BLOCKS) -> tuple[str, int]:
    """The deepest trunk block whose map has at least MIN_CAM_CELLS cells per side at this image size."""
    return next(((name, stride) for name, stride in blocks if size // stride >= MIN_CAM_CELLS), blocks[-1])


def cell_offset(trunk, stride: int) -> float:
    """Where cell 0 of a stride-s map is centred, in input pixels. Every stride-2 step of a ResNet or EfficientNet
    (odd kernels, padding k // 2) keeps output i over input 2i: 0. A trunk that starts with a patchifying convolution
    (kernel = stride, no padding: ConvNeXt, ViT) covers pixels s*i to s*i + s - 1 with cell i: (s - 1) / 2."""
    stem = next(m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))
    patchify = stem.kernel_size == stem.stride and stem.padding == (0, 0)
    return (stride - 1) / 2 if patchify else 0.0


def upsample_aligned(cam: torch.Tensor, size: int, stride: int, offset: float = 0.0) -> torch.Tensor:
    """(B, 1, h, w) → (B, size, size), each cell drawn where its receptive field is centred: cell i of a stride-s map
    at input pixel s*i + offset (cell_offset).

    For a ResNet (offset 0), bilinear upsampling with align_corners=False would draw cell i at s*i + s/2 - 0.5
    instead: at 64 px with 2 x 2 cells, the cell over the image centre (where lesions are) lands on the bottom-right
    quadrant. Beyond the last cell the map is held constant."""
    h, w = cam.shape[-2:]
    pixels = torch.arange(size, device=cam.device) - offset
    axis = lambda n: (2 * pixels / stride / max(n - 1, 1) - 1).float()  # noqa: E731
    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(len(cam), -1, -1, -1)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def as_map(activation: torch.Tensor, trunk) -> torch.Tensor:
    """A block's output as (B, C, h, w): a token model's (B, prefix + h*w, C) without its class/register tokens, a
    channels-last trunk's (B, h, w, C) (timm's output_fmt NHWC: Swin) permuted."""
    if activation.ndim == 4:
        return activation.permute(0, 3, 1, 2) if getattr(trunk, "output_fmt", "NCHW") == "NHWC" else activation
    if activation.ndim == 3:
        patches = activation[:, getattr(trunk, "num_prefix_tokens", 0):]
        side = math.isqrt(patches.shape[1])
        if side * side == patches.shape[1]:
            return patches.transpose(1, 2).reshape(len(patches), -1, side, side)
    raise UserError(f"Grad-CAM cannot read this trunk's block outputs (shape {tuple(activation.shape)}); "
                    "train with a convolutional or ViT --backbone to draw gallery.png")


def grad_cam(model, images, metadata=None) -> torch.Tensor:
    """Grad-CAM of the malignant logit at cam_layer's block: (B, H, W) heat maps scaled to [0, 1]."""
    store = {}
    name, stride = cam_layer(images.shape[-1], trunk_blocks(model.trunk))
    block = model.trunk.get_submodule(name)
    hook = block.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        with torch.enable_grad():
            _, logits = model(images, metadata)
            grads = torch.autograd.grad(logits.sum(), store["a"])[0]  # eval mode: each logit sees only its image
    finally:
        hook.remove()
    activation, grads = as_map(store["a"], model.trunk), as_map(grads, model.trunk)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
    cam = upsample_aligned(cam.float(), images.shape[-1], stride, cell_offset(model.trunk, stride))
    return (cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).detach()


def cam_note(size: int, blocks=RESNET_BLOCKS) -> str:
    """The caption under gallery.png: which map the heat maps come from and how coarse it is, in plain words."""
    name, stride = cam_layer(size, blocks)
    cells = size // stride
    return (f"Grad-CAM at trunk.{name}, the deepest block whose map has at least {MIN_CAM_CELLS} x {MIN_CAM_CELLS} "
            f"cells at {size} px: {cells} x {cells} cells, each {stride} px wide, smoothed for display. The maps show "
            "roughly where the score came from, not which structure (network, dots, border) caused it.")


def gallery_cases(y, p, threshold: float, n: int = GALLERY) -> dict:
    """The most confident true positives, false positives and false negatives: {title: [row indices]}."""
    called = p >= threshold
    most = np.argsort(-p, kind="stable")  # most melanoma-like first
    pick = lambda mask, order: [int(i) for i in order if mask[i]][:n]  # noqa: E731
    return {"malignant, called malignant (true positives)": pick((y == 1) & called, most),
            "benign, called malignant (false positives)": pick((y == 0) & called, most),
            "malignant, called benign (false negatives)": pick((y == 1) & ~called, most[::-1])}


def similar_cases(confident: dict, y, seed: int) -> dict:
    """similar.png's queries: the CONFIDENT most confident of each of gallery_cases' kinds, then TYPICAL of each class
    drawn at random with `seed` from the images not shown above, so that the figure also shows retrieval for ordinary
    lesions."""
    cases = {title.split(" (")[0]: found[:CONFIDENT] for title, found in confident.items()}
    shown = [i for found in cases.values() for i in found]
    rng = np.random.default_rng(seed)
    for label, name in enumerate(plots.CLASSES):
        pool = np.setdiff1d(np.flatnonzero(np.asarray(y) == label), shown)
        cases[f"{name}, at random"] = sorted(int(i) for i in rng.choice(pool, min(TYPICAL, len(pool)), replace=False))
    return cases


def image_cases(n: int) -> dict:
    """similar.png's queries for predict.py --images: the first FIRST_IMAGES images by file name."""
    return {"new image": list(range(min(FIRST_IMAGES, n)))}


def write_gallery(model, dataset, ids, pred: Predictions, threshold: float, path, device, cases: dict | None = None,
                  n: int = GALLERY, subject: str = "scored images") -> None:
    """gallery.png: the most confident true positives, false positives and false negatives of `subject` (e.g. "test
    split, run demo"), with Grad-CAM."""
    y, p = pred.targets, pred.probabilities
    chosen = cases if cases is not None else gallery_cases(y, p, threshold, n)
    rows = {}
    for title, cases in chosen.items():
        if cases:
            images = to_float(torch.stack([dataset[i][0] for i in cases]).to(device))
            metadata = torch.as_tensor(dataset.metadata[cases], device=device)
            cams = grad_cam(model.eval(), images, metadata).cpu().numpy()
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        rows[title] = [(images[j], cams[j], f"{ids[i]}\nP(melanoma) {p[i]:.3f}") for j, i in enumerate(cases)]
    plots.gallery_plot(rows, path, f"{subject}: where the model looked in its most confident right and wrong calls\n"
                       "(each case: the image with P(melanoma), then the regions that raised that score)",
                       cam_note(dataset[0][0].shape[-1], trunk_blocks(model.trunk)))


def as_picture(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) → float (H, W, 3) in [0, 1], as matplotlib draws it."""
    return image.permute(1, 2, 0).numpy() / 255.0


def training_images(s, ids) -> dict | None:
    """The run's training images by id at the run's image size; None when the run's data is no longer where its
    config.json says (similar.png then cannot be drawn; neighbours.csv still can)."""
    try:
        _, image_dir = find_layout(s.data_dir, s.csv, s.image_dir)
        paths, missing = locate_images(list(ids), image_dir)
    except UserError:
        return None
    if missing:
        return None
    return {i: as_picture(decode(path, s.img_size)) for i, path in zip(ids, paths)}


def write_similar(dataset, captions, labels, cases: dict, distances, rows, refs, s, path,
                  subject: str = "scored images") -> None:
    """similar.png: each case of `cases` ({heading: [indices into dataset]}) of `subject` (e.g. "test split, run
    demo") beside its nearest training lesions (`rows`, `distances`: one row of neighbour indices and distances per
    image). `labels` None: unlabelled images."""
    chosen = [(f"{title} {k} of {len(indices)}", i) for title, indices in cases.items()
              for k, i in enumerate(indices, 1)]
    if not chosen:
        print(f"{path} not drawn: no cases to show")
        return
    needed = list(dict.fromkeys(refs.ids[j] for _, i in chosen for j in rows[i]))
    images = training_images(s, needed)
    if images is None:
        print(f"{path} not drawn: the run's training images are no longer at {s.data_dir or s.image_dir}")
        return
    figure_rows = []
    for heading, i in chosen:
        truth = "label unknown" if labels is None else f"label: {plots.CLASSES[int(labels[i])]}"
        neighbours = [(images[refs.ids[j]], neighbour_caption(refs, j, d), bool(refs.targets[j]),
                       "same image as this\ntraining image" if d < SAME_IMAGE else "")
                      for j, d in zip(rows[i], distances[i])]
        figure_rows.append((heading, (as_picture(dataset[i][0]), f"{captions[i]}\n{truth}"), neighbours))
    plots.similar_plot(figure_rows, path, f"{subject}: each query (left of the line) beside its nearest lesions of "
                       f"the run's training split, nearest first\nd: {neighbour_space_name(s)}; labels from the "
                       "metadata (biopsy or follow-up)")


def neighbour_caption(refs, j: int, distance: float) -> str:
    """Id, label (and diagnosis when known), distance."""
    label = plots.CLASSES[int(refs.targets[j])] + (f" ({refs.diagnosis[j]})" if refs.diagnosis[j] else "")
    return f"{refs.ids[j]}\n{label}\nd={distance:.3f}"
