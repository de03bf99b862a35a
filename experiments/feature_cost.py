"""What the colour/texture description of visual_similarity.py costs beside embedding the same images, side by side.

    OMP_NUM_THREADS=1 python -m experiments.feature_cost
"""
from __future__ import annotations

import time

import torch

from modules import SiameseNet
from scoring.visual_similarity import image_features


def best_time(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def main(images: int = 16, side: int = 256, backbone: str = "resnet50") -> None:
    torch.set_num_threads(1)
    batch = torch.randint(0, 256, (images, 3, side, side), dtype=torch.uint8)
    model = SiameseNet(backbone, img_size=side).eval()
    describe = best_time(lambda: image_features(batch), 3)
    embed = best_time(lambda: model(batch.float() / 255), 2)
    print(f"{images} images of {side} px, one thread: features {describe:.3f} s, {backbone} embedding {embed:.3f} s, "
          f"ratio {describe / embed:.4f}")


if __name__ == "__main__":
    main()
