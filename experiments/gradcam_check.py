"""Grad-CAM: does the heat map follow the lesion? Synthetic malignant lesions moved to known places, scored by a run.

    python -m experiments.gradcam_check runs/X      # a run at 64 px, e.g. the demo's

For the last block (layer4, upsampled bilinearly with align_corners=False) and for explain.grad_cam (the
deepest block with at least 7 x 7 cells, each cell drawn at its receptive field's centre), prints the mean heat-map
centroid and its distance from the lesion's centre, and where each layer4 cell's receptive field is centred.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from isic.demo import lesion
from reporting.explain import grad_cam
from scoring.inference import load_run

PLACES = {"centre": (0, 0), "top-left": (-12, -12), "bottom-right": (12, 12), "top-right": (-12, 12)}


def last_block_cam(model, images) -> np.ndarray:
    """The former explain.grad_cam: layer4, upsampled with align_corners=False."""
    store = {}
    hook = model.trunk.layer4.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    with torch.enable_grad():
        grads = torch.autograd.grad(model(images)[1].sum(), store["a"])[0]
    hook.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).detach().numpy()


def receptive_field_centres(model, size: int) -> list:
    """Centroid of |d cell / d input| for the diagonal cells of layer4, on a uniform image."""
    x = torch.full((1, 3, size, size), 0.8, requires_grad=True)
    store = {}
    hook = model.trunk.layer4.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    model(x)
    hook.remove()
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    centres = []
    for i in range(store["a"].shape[-1]):
        g = torch.autograd.grad(store["a"][0, :, i, i].abs().sum(), x, retain_graph=True)[0].abs().sum(1)[0].numpy()
        centres.append((round(float((g * ys).sum() / g.sum()), 1), round(float((g * xs).sum() / g.sum()), 1)))
    return centres


def centroids(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2) centroids of the maps that are not blank, and the mask of those maps."""
    ys, xs = np.mgrid[0:cams.shape[1], 0:cams.shape[2]] + 0.5
    mass = cams.sum((1, 2))
    ok = mass > 0
    return np.stack([(cams * ys).sum((1, 2)), (cams * xs).sum((1, 2))], 1)[ok] / mass[ok, None], ok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("run")
    p.add_argument("--lesions", type=int, default=24)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s, model = load_run(args.run, torch.device("cpu"))
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    size = s.img_size
    print(f"layer4 cells' receptive-field centres (y, x) at {size} px: {receptive_field_centres(model, size)}; "
          f"align_corners=False draws them at {[(i + 0.5) * 32 for i in range(size // 32)]}")
    rng = np.random.default_rng(0)
    base = [lesion(rng, True, size) for _ in range(args.lesions)]
    for place, (dy, dx) in PLACES.items():
        moved = np.stack([np.roll(b, (dy, dx), (0, 1)) for b in base])  # skin at the border: a roll moves the lesion
        images = torch.from_numpy(moved).permute(0, 3, 1, 2).float() / 255
        centre = np.array([size / 2 + dy, size / 2 + dx])
        parts = []
        for name, cams in (("layer4 as before", last_block_cam(model, images)),
                           ("explain.grad_cam", grad_cam(model, images).numpy())):
            found, ok = centroids(cams)
            error = np.linalg.norm(found - centre, axis=1).mean()
            parts.append(f"{name}: centroid ({found[:, 0].mean():.0f}, {found[:, 1].mean():.0f}), "
                         f"{error:.1f} px off" + (f", {(~ok).sum()} blank" if (~ok).any() else ""))
        print(f"lesion {place:<12} at ({centre[0]:.0f}, {centre[1]:.0f}): " + " | ".join(parts))


if __name__ == "__main__":
    main()
