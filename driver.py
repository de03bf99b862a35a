"""Train and evaluate the Siamese melanoma classifier end to end: data → split → train → val/test evaluation.

    python driver.py --demo                                   # synthetic data, CPU-sized, a few minutes
    python driver.py --data-dir DATA                          # full run (ResNet50, 256 px, 15 epochs)
    python driver.py --resume runs/X                          # continue an interrupted run
    torchrun --standalone --nproc_per_node 4 driver.py ...    # data-parallel on 4 GPUs (--batch-size is per GPU)
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from engine.config import parse_cli
from workflow.pipeline import run
from utils import cli_main


def main(argv=None) -> int:
    try:
        return cli_main(lambda argv: run(parse_cli(argv)), argv)
    except KeyboardInterrupt:  # a second Ctrl-C: last.pt still holds the last finished epoch
        print("error: stopped at once by a second interrupt; continue with: python driver.py --resume RUN_FOLDER",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
