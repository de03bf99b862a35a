"""What the experiment scripts share: the loss variants they compare and one training run's test metrics."""
from __future__ import annotations

import json

from pipeline import run

# Without BCE the head is untrained, so its validation metric cannot pick an epoch: keep the final weights.
CONTRASTIVE_ONLY = {"w_bce": 0.0, "select_metric": "last"}
# The joint loss with a contrastive term given a fairer chance (issue #14): more pairs per melanoma from a memory of
# recent batches (256 = 8 batches of 32, about half an epoch of a fold of the sample), only the informative pairs,
# or pairs by diagnosis (needs a 'diagnosis' column, e.g. --extra-csv ISIC_2020_Training_GroundTruth.csv).
CROSS_BATCH_MEMORY = {"xbm": 256}
MINED_PAIRS = {"miner": "multisimilarity"}
DIAGNOSIS_PAIRS = {"pair_labels": "diagnosis"}
# BCE alone with age, sex and site beside the image embedding (issue #16; the columns come from the metadata CSV or
# --extra-csv, e.g. the official ground truth joined onto the Kaggle 256 px layout).
WITH_METADATA = {"w_cl": 0.0, "metadata": "age,sex,site"}


def train_and_test(given: dict) -> dict:
    """One driver.py run (flags as parse_cli gives them); its test metrics."""
    return json.loads((run(given) / "test" / "metrics.json").read_text())
