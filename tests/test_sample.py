import pandas as pd

from conftest import in_process
from isic.demo import make_dataset
from isic.metadata import load_metadata


def test_sample_keeps_whole_patients_both_classes_and_the_official_csvs(tmp_path):
    source = make_dataset(tmp_path / "src", n_images=60, malignant_rate=0.3, size=16, seed=1)
    full = load_metadata(source / "train-metadata.csv")
    pd.DataFrame({"image_name": full["isic_id"], "patient_id": full["patient_id"], "sex": "female",
                  "target": full["target"]}).to_csv(source / "ISIC_2020_Training_GroundTruth.csv", index=False)
    ids = full["isic_id"].tolist()
    pd.DataFrame({"image_name_1": ids[:3], "image_name_2": ids[3:6]}).to_csv(
        source / "ISIC_2020_Training_Duplicates.csv", index=False)
    out = tmp_path / "out"
    assert in_process("sample.py", "--data-dir", source, "--out", out, "--patients", 6, "--seed", 3) == 0
    sample = load_metadata(out / "train-metadata.csv")
    chosen = set(sample["patient_id"])
    assert len(chosen) == 6 and sample["target"].nunique() == 2
    assert set(full[full["patient_id"].isin(chosen)]["isic_id"]) == set(sample["isic_id"])  # whole patients
    assert sorted(p.stem for p in (out / "train-image" / "image").iterdir()) == sorted(sample["isic_id"])
    assert (out / "train-metadata.csv").read_text().startswith(",isic_id,")  # Kaggle's header, index column too
    truth = pd.read_csv(out / "ISIC_2020_Training_GroundTruth.csv")
    assert set(truth["image_name"]) == set(sample["isic_id"])
    pairs = pd.read_csv(out / "ISIC_2020_Training_Duplicates.csv")
    assert pairs.isin(set(sample["isic_id"])).any(axis=1).all()


def test_sample_refuses_an_existing_folder_in_one_line(tmp_path, capsys):
    source = make_dataset(tmp_path / "src", n_images=20, size=16, seed=1)
    assert in_process("sample.py", "--data-dir", source, "--out", source, "--patients", 2) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: --out") and stderr.count("\n") == 1
