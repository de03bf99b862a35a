"""What the experiment scripts share: the loss variants they compare and one training run's test metrics."""
from __future__ import annotations

import json

from pipeline import run

# Without BCE the head is untrained, so its validation metric cannot pick an epoch: keep the final weights.
CONTRASTIVE_ONLY = {"w_bce": 0.0, "select_metric": "last"}


def train_and_test(given: dict) -> dict:
    """One driver.py run (flags as parse_cli gives them); its test metrics."""
    return json.loads((run(given) / "test" / "metrics.json").read_text())
