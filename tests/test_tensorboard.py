"""TensorBoard files of a run (tensorboard_log.py), read back with TensorBoard's own readers: the curves against
history.csv, the HParams, the projector against the test split; a resumed run's stream; a real TensorBoard server
(and a headless browser, where one is installed) on a loopback port."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins import projector
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter

import driver
import predict
from reporting import tensorboard_log
import train
from conftest import tiny
from engine.config import Settings
from engine.losses import build_loss
from isic.image_cache import decode
from modules import SiameseNet

def board(run) -> EventAccumulator:
    """The run's event stream as TensorBoard reads it (every value kept, orphaned steps purged)."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag) -> tuple[list, list]:
    found = events.Scalars(tag)
    return [e.step for e in found], [e.value for e in found]


def flags(data, cache):
    return ["--data-dir", str(data), "--cache-dir", str(cache), *tiny(2)]


@pytest.fixture(scope="module")
def tiny_run(finished_run):
    return finished_run[0]


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """A run stopped by SIGTERM in epoch 2 after two logged syncs (one every 2 steps), then resumed."""
    out, cache = tmp_path_factory.mktemp("tb") / "resumed", tmp_path_factory.mktemp("cache")
    real_steps, real_epoch, epoch_ends = tensorboard_log.Board.steps, tensorboard_log.Board.epoch, []

    def epoch(self, row):
        real_epoch(self, row)
        epoch_ends.append(self.scheduler.last_epoch)

    def steps(self, window):
        real_steps(self, window)
        if epoch_ends and self.scheduler.last_epoch >= epoch_ends[0] + 4:
            raise train.Interrupted("SIGTERM")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "SYNC_EVERY", 2)
        patch.setattr(tensorboard_log.Board, "epoch", epoch)
        patch.setattr(tensorboard_log.Board, "steps", steps)
        assert driver.main([*flags(tiny_data, cache), "--out", str(out)]) == 2
        written = raw_steps(out, "step/loss")
        patch.setattr(tensorboard_log.Board, "steps", real_steps)
        assert driver.main(["--resume", str(out)]) == 0
    return out, epoch_ends[0], written


def raw_steps(run, tag) -> list:
    """The steps of `tag` as the event files hold them, without TensorBoard's purge."""
    found = []
    for path in sorted((run / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            found += [event.step for value in event.summary.value if value.tag == tag]
    return found


def test_steps_are_logged_at_the_host_syncs_from_host_values(tmp_path, monkeypatch):
    """The loss of each window since the last sync, from the array that sync already copied to the host."""
    monkeypatch.setattr(train, "SYNC_EVERY", 2)
    s = Settings(backbone="resnet18", embedding_dim=8, epochs=1)
    torch.manual_seed(0)
    model, generator = SiameseNet("resnet18", 8), torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator),
                torch.tensor([0.0, 1.0] * 4), torch.tensor([0, 1] * 4), torch.zeros(8, 0)) for _ in range(5)]
    optimizer, scheduler = train.build_optimizer(model, s, len(batches))
    windows = []

    class Recording(tensorboard_log.Board):
        def steps(self, window):
            windows.append((self.scheduler.last_epoch, window))
            super().steps(window)
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)
    with SummaryWriter(tmp_path) as writer:
        stepper = train.Stepper(model, build_loss(s), optimizer, scheduler, no_scaling, lambda images: images,
                                torch.device("cpu"))
        train.train_one_epoch(stepper, batches, 1, 1, board=Recording(writer, scheduler))
    assert [step for step, _ in windows] == [2, 4, 5]
    assert all(isinstance(window, np.ndarray) and len(window) == n for (_, window), n in zip(windows, (2, 2, 1)))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    steps, values = scalars(events, "step/bce")
    assert steps == [2, 4, 5]
    np.testing.assert_allclose(values, [window[:, 1].mean() for _, window in windows], rtol=1e-6)
    assert scalars(events, "step/lr")[1][-1] == pytest.approx(scheduler.get_last_lr()[0])


@pytest.mark.slow
def test_event_files_hold_history_csv_per_epoch(tiny_run):
    events, history = board(tiny_run), pd.read_csv(tiny_run / "history.csv")
    steps_per_epoch = events.Scalars("epoch/val_auroc")[0].step
    assert steps_per_epoch > 2
    for column in history.columns.drop("epoch"):
        steps, values = scalars(events, f"epoch/{column}")
        assert steps == list(history["epoch"] * steps_per_epoch), column
        np.testing.assert_allclose(values, history[column], rtol=1e-6, atol=1e-7, err_msg=column)
    steps, values = scalars(events, "step/loss")
    assert steps == [steps_per_epoch, 2 * steps_per_epoch]  # the last step of an epoch syncs (SYNC_EVERY > steps)
    assert all(np.isfinite(values)) and scalars(events, "step/lr")[1][-1] == pytest.approx(history["lr"].iloc[-1])


@pytest.mark.slow
def test_hparams_hold_the_settings_and_final_metrics(tiny_run):
    events = board(tiny_run)
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["backbone"].string_value == "resnet18" and start["epochs"].number_value == 2
    assert start["deterministic"].string_value == "none" and not {"out", "cache_dir", "check_data"} & set(start)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {f"hparams/{split}_{name}" for split in ("val", "test")
                                                             for name in ("auroc", "pauc")}
    for split in ("val", "test"):
        metrics = json.loads((tiny_run / split / "metrics.json").read_text())
        for name in ("auroc", "pauc"):
            assert scalars(events, f"hparams/{split}_{name}")[1] == [pytest.approx(metrics[name], abs=1e-6)]
    assert {"test/roc", "test/pr", "test/calibration", "test/gallery", "test/similar"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_projector_rows_and_sprite_match_the_test_split(tiny_run, tiny_data):
    config = text_format.Parse((tiny_run / "tb" / "projector_config.pbtxt").read_text(), projector.ProjectorConfig())
    (info,) = config.embeddings
    splits = pd.read_csv(tiny_run / "splits.csv", dtype={"patient_id": str})
    test = splits[splits["split"] == "test"]
    predictions = pd.read_csv(tiny_run / "test" / "predictions.csv")
    table = pd.read_csv(tiny_run / "tb" / info.metadata_path, sep="\t", dtype={"patient": str})
    assert list(table.columns) == ["isic_id", "label", "probability", "patient"]  # no diagnosis in the demo data
    assert list(table["isic_id"]) == list(test["isic_id"]) == list(predictions["isic_id"])
    assert list(table["label"]) == ["malignant" if t else "benign" for t in test["target"]]
    assert list(table["patient"]) == list(test["patient_id"])
    np.testing.assert_allclose(table["probability"], predictions["probability"], atol=1e-4)
    embeddings = np.loadtxt(tiny_run / "tb" / info.tensor_path, delimiter="\t")
    assert embeddings.shape == (len(test), 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)  # the normalised space
    side = 32  # the run's image size: smaller than THUMBNAIL, so each cell is the image the model saw
    assert list(info.sprite.single_image_dim) == [side, side]
    sprite = np.asarray(Image.open(tiny_run / "tb" / info.sprite.image_path))
    columns = math.ceil(math.sqrt(len(test)))
    assert sprite.shape == (columns * side, columns * side, 3)
    for i in (0, 1, len(test) - 1):
        row, column = divmod(i, columns)
        cell = sprite[row * side:(row + 1) * side, column * side:(column + 1) * side]
        image = decode(tiny_data / "train-image" / "image" / f"{test['isic_id'].iloc[i]}.jpg", side)
        np.testing.assert_array_equal(cell, image.permute(1, 2, 0).numpy())
    empty = columns ** 2 - len(test)
    assert not sprite[-side:, (columns - empty) * side:].any()  # cells after the last image stay black


@pytest.mark.slow
def test_a_resumed_run_logs_each_epoch_and_step_once(resumed_run):
    out, steps_per_epoch, written = resumed_run
    assert written[-2:] == [steps_per_epoch + 2, steps_per_epoch + 4]  # logged by the interrupted epoch 2
    events, history = board(out), pd.read_csv(out / "history.csv")
    steps, values = scalars(events, "epoch/val_auroc")
    assert steps == [steps_per_epoch, 2 * steps_per_epoch]
    np.testing.assert_allclose(values, history["val_auroc"], rtol=1e-6)
    steps = scalars(events, "step/loss")[0]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * steps_per_epoch
    assert raw_steps(out, "step/loss").count(steps_per_epoch + 2) == 2  # in the files twice, read once
    assert len(scalars(events, "hparams/test_auroc")[0]) == 1


@pytest.mark.slow
def test_no_tensorboard_and_check_data_write_no_event_files(tiny_data, tmp_path):
    out = tmp_path / "checked"
    assert driver.main(["--data-dir", str(tiny_data), "--out", str(out), "--check-data"]) == 0
    assert not (out / "tb").exists()
    out = tmp_path / "off"
    assert driver.main([*flags(tiny_data, tmp_path / "cache"), "--epochs", "1", "--out", str(out),
                        "--no-tensorboard"]) == 0
    assert (out / "test" / "metrics.json").is_file() and not (out / "tb").exists()


# ---------------------------------------------------------------- a real TensorBoard server on a loopback port

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(read, seconds=90):
    """read()'s first truthy answer, polled for at most `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            answer = read()
            if answer:
                return answer
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer within {seconds} s")


@pytest.fixture(scope="module")
def server(resumed_run):
    out = resumed_run[0]
    port = free_port()
    command = [shutil.which("tensorboard", path=os.path.dirname(sys.executable)) or "tensorboard",
               "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", out
    finally:
        os.killpg(child.pid, signal.SIGTERM)  # the server and the data server it started
        child.communicate(timeout=30)


@pytest.mark.slow
def test_a_tensorboard_server_serves_the_runs_scalars(server):
    url, out = server
    assert wait_for(lambda: "tb" in get(f"{url}/data/runs"))
    scalars_of = f"{url}/data/plugin/scalars/scalars?run=tb&tag="
    served = wait_for(lambda: get(scalars_of + urllib.parse.quote("epoch/val_auroc", safe="")))
    history = pd.read_csv(out / "history.csv")
    np.testing.assert_allclose([value for _, _, value in served], history["val_auroc"], rtol=1e-6)
    steps = [step for _, step, _ in get(scalars_of + urllib.parse.quote("step/loss", safe=""))]
    assert steps == sorted(set(steps))  # the interrupted epoch's steps once, as in EventAccumulator


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None,
                    reason="no headless Chromium installed (chromium, chromium-browser, google-chrome)")
def test_headless_chromium_draws_the_scalars_page(server, tmp_path):
    url, _ = server
    wait_for(lambda: get(f"{url}/data/plugin/scalars/tags"))
    shot = tmp_path / "scalars.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800", "--virtual-time-budget=20000",
                    f"--screenshot={shot}", f"{url}/#scalars"], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 800)
    assert len(image.getcolors(1200 * 800)) > 50  # the page and its charts drawn, not a blank window


@pytest.mark.slow
def test_predict_adds_new_images_to_a_projector_of_their_own(tiny_run, tiny_data, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    names = sorted(p.name for p in (tiny_data / "train-image" / "image").iterdir())[:5]
    for name in names:
        shutil.copy(tiny_data / "train-image" / "image" / name, folder / name)
    out = tmp_path / "out"
    assert predict.main(["--run", str(tiny_run), "--images", str(folder), "--out", str(out), "--projector"]) == 0
    config = text_format.Parse((out / "tb" / "projector_config.pbtxt").read_text(), projector.ProjectorConfig())
    assert [e.tensor_name for e in config.embeddings] == ["images"]
    table = pd.read_csv(out / "tb" / "images" / "metadata.tsv", sep="\t")
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(table["isic_id"]) == [n.removesuffix(".jpg") for n in names] == list(predictions["isic_id"])
    np.testing.assert_allclose(table["probability"], predictions["probability"], atol=1e-4)
    assert np.loadtxt(out / "tb" / "images" / "tensors.tsv", delimiter="\t").shape == (5, 16)


@pytest.mark.slow
def test_predict_projector_needs_other_data(tiny_run, capsys):
    assert predict.main(["--run", str(tiny_run), "--projector"]) == 2
    assert capsys.readouterr().err.startswith("error: --projector is for other data")
