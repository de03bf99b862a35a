"""What the experiment scripts share: the loss variants they compare and one training run's test metrics."""
from __future__ import annotations

import json
from pathlib import Path

from engine.config import NOT_OUTCOME, Settings, settings_from_cli
from isic.splits import read_splits
from workflow.pipeline import run

# Without BCE the head is untrained, so its validation metric cannot pick an epoch: keep the final weights.
CONTRASTIVE_ONLY = {"w_bce": 0.0, "select_metric": "last"}
# The joint loss with a contrastive term given a fairer chance: more pairs per melanoma from a memory of
# recent batches (256 = 8 batches of 32, about half an epoch of a fold of the sample), only the informative pairs,
# or pairs by diagnosis (needs a 'diagnosis' column, e.g. --extra-csv ISIC_2020_Training_GroundTruth.csv).
CROSS_BATCH_MEMORY = {"xbm": 256}
MINED_PAIRS = {"miner": "multisimilarity"}
DIAGNOSIS_PAIRS = {"pair_labels": "diagnosis"}
# The joint loss keeping lesions apart within a class: NT-Xent between two augmented views of each image
# beside the class term, or a positive margin (normalised distances lie in [0, 2]; random directions sit ~1.4 apart)
# below which same-class pairs are no longer pulled together.
INSTANCE_TERM = {"w_instance": 0.5}
POSITIVE_MARGIN = {"pos_margin": 0.5}
# BCE alone with age, sex and site beside the image embedding (the columns come from the metadata CSV or
# --extra-csv, e.g. the official ground truth joined onto the Kaggle 256 px layout).
WITH_METADATA = {"w_cl": 0.0, "metadata": "age,sex,site"}


def train_and_test(given: dict) -> dict:
    """One driver.py run (flags as parse_cli gives them); its test metrics."""
    return json.loads((run(given) / "test" / "metrics.json").read_text())


def finished_run(run_dir: Path, given: dict, splits_csv: Path) -> dict | None:
    """The test metrics of a run that already finished with these settings on this split, else None."""
    config, metrics = run_dir / "config.json", run_dir / "test" / "metrics.json"
    if not (config.is_file() and metrics.is_file()):
        return None
    # A setting the run's config.json lacks was added later: the run had its default, which keeps old behaviour.
    wanted, done = settings_from_cli(given).to_dict(), Settings.from_dict(json.loads(config.read_text())).to_dict()
    if any(done.get(k) != v for k, v in wanted.items() if k not in NOT_OUTCOME):
        return None
    same_fold = read_splits(run_dir / "splits.csv")[["isic_id", "split"]].equals(
        read_splits(splits_csv)[["isic_id", "split"]])
    if same_fold:
        print(f"reusing {run_dir} (finished with the same settings on this split)", flush=True)
    return json.loads(metrics.read_text()) if same_fold else None
