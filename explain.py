"""Pictures that explain a score: the gallery of confident hits and misses, with Grad-CAM heat maps."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import plots
from augment import to_float
from inference import Predictions

GALLERY = 4  # cases per row of gallery.png


def grad_cam(model, images) -> torch.Tensor:
    """Grad-CAM of the malignant logit at the trunk's last block: (B, H, W) heat maps scaled to [0, 1]."""
    store = {}
    hook = model.trunk.layer4.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        with torch.enable_grad():
            _, logits = model(images)
            grads = torch.autograd.grad(logits.sum(), store["a"])[0]  # eval mode: each logit sees only its image
    finally:
        hook.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).detach()


def write_gallery(model, dataset, ids, pred: Predictions, threshold: float, path, device, n: int = GALLERY) -> None:
    """gallery.png: the most confident true positives, false positives and false negatives, with Grad-CAM."""
    y, p = pred.targets, pred.probabilities
    called = p >= threshold
    most = np.argsort(-p, kind="stable")  # most melanoma-like first
    pick = lambda mask, order: [i for i in order if mask[i]][:n]  # noqa: E731
    chosen = {"true positives": pick((y == 1) & called, most), "false positives": pick((y == 0) & called, most),
              "false negatives": pick((y == 1) & ~called, most[::-1])}
    rows = {}
    for title, cases in chosen.items():
        if cases:
            images = to_float(torch.stack([dataset[i][0] for i in cases]).to(device))
            cams = grad_cam(model.eval(), images).cpu().numpy()
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        rows[title] = [(images[j], cams[j], f"{ids[i]}\nP={p[i]:.3f}") for j, i in enumerate(cases)]
    plots.gallery_plot(rows, path)
