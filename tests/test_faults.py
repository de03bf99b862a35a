"""Faults a long run meets, on real tiny runs: SIGKILL in the middle of a save, SIGTERM, a checkpoint carrying pickled
code, a NaN loss; and the promise behind --resume: killed and resumed, a run ends exactly as an uninterrupted one."""
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import driver
import train
from conftest import ROOT, in_process, tiny
from engine.checkpoints import load_checkpoint, save_checkpoint
from isic.demo import make_dataset
from utils import UserError

TINY = tiny(3, workers=None)

# driver.main in a child process with one function patched, to put a fault at an exact point of a real run.
# In a child process: torch.save of last.pt at `epoch` puts half of the file on disk, then SIGKILLs the process.
HALF_SAVE = r"""
import io, os, signal
import torch
def plant_half_save(epoch):
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch and ".last.pt." in str(f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
"""
CHILD = HALF_SAVE + r"""
import dataclasses, inspect, sys, time
import driver, train
mode, epoch, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "kill-in-save":  # SIGKILL halfway through writing last.pt of `epoch`
    plant_half_save(epoch)
if mode == "pause-in-step":  # step 2 of `epoch` creates `marker`, then waits for the test's signal before going on
    real_epoch = train.train_one_epoch
    def one_epoch(*args, **kwargs):
        bound = inspect.signature(real_epoch).bind(*args, **kwargs)
        if bound.arguments["epoch"] == epoch:
            augment, steps = bound.arguments["step"].augment, []
            def slow_augment(images):
                steps.append(1)
                if len(steps) == 2:
                    open(marker, "w").close()
                    stop, waited = signal.getsignal(signal.SIGTERM).__self__, time.time()  # train.StopRequest
                    while not stop.signal and time.time() < waited + 120:
                        time.sleep(0.05)
                return augment(images)
            bound.arguments["step"] = dataclasses.replace(bound.arguments["step"], augment=slow_augment)
        return real_epoch(*bound.args, **bound.kwargs)
    train.train_one_epoch = one_epoch
sys.exit(driver.main(sys.argv[4:]))
"""


def start(*args):
    # One thread each: results then match between these runs whatever the load, and two can share the 2 cores.
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(child, check=None):
    stdout, stderr = child.communicate(timeout=600)
    if check is not None:
        assert child.returncode == check, stderr[-3000:]
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def history(out):
    return pd.read_csv(out / "history.csv").drop(columns="seconds")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return make_dataset(root / "data", n_images=120, malignant_rate=0.2, size=40, seed=1), root / "cache"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An uninterrupted run with the default flags (which builds the image cache); then, side by side, the same run
    with 2 loader workers (what min(4, cores) gives a GPU user here), and two runs SIGKILLed halfway through writing
    last.pt after epoch 2: one with the default flags, one with 2 workers. The latter is resumed in the background
    with `--resume` alone, as a user would."""
    root = tmp_path_factory.mktemp("runs")
    given = ["--data-dir", data[0], "--cache-dir", data[1], *TINY]
    assert in_process("driver.py", *given, "--out", root / "reference") == 0  # alone: it builds the image cache
    again = start("driver.py", *given, "--workers", "2", "--out", root / "again", "--deterministic")
    killed = start("-c", CHILD, "kill-in-save", 2, "-", *given, "--out", root / "killed")
    killed_with_workers = start("-c", CHILD, "kill-in-save", 2, "-", *given, "--workers", "2",
                                "--out", root / "killed-2-workers")
    finish(again, check=0)
    killed = finish(killed)
    leftovers = sorted(p.name for p in (root / "killed").iterdir() if p.name.startswith("."))  # before a resume
    assert finish(killed_with_workers).returncode == -signal.SIGKILL
    resumed_with_workers = start("driver.py", "--resume", root / "killed-2-workers")
    return {"reference": root / "reference", "again": root / "again", "killed": (root / "killed", killed, leftovers),
            "resumed with workers": (root / "killed-2-workers", resumed_with_workers)}


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


@pytest.fixture(scope="module")
def killed(runs):
    return runs["killed"]


@pytest.fixture(scope="module")
def terminated(killed):
    """--resume of the killed run (replays epoch 2), stopped by SIGTERM at step 2 of epoch 3."""
    out, marker = killed[0], killed[0].parent / "paused"
    child = start("-c", CHILD, "pause-in-step", 3, marker, "--resume", out)
    deadline = time.time() + 300
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    result = finish(child)
    return out, result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def resumed(terminated):
    """A second --resume, with the same command-line defaults, finishes the run."""
    out = terminated[0]
    return out, finish(start("driver.py", "--resume", out), check=0)


def assert_same_results(out, reference):
    """history.csv (all columns but seconds), val/test metrics.json and the checkpoints' weights equal."""
    pd.testing.assert_frame_equal(history(out), history(reference), check_exact=False, rtol=0, atol=1e-6)
    for split in ("val", "test"):
        got, want = (json.loads((run / split / "metrics.json").read_text()) for run in (out, reference))
        assert got == want, split
    for name in ("best.pt", "last.pt"):
        got, want = (load_checkpoint(run / name)["model"] for run in (out, reference))
        assert all(torch.allclose(got[k].float(), want[k].float(), rtol=0, atol=1e-6) for k in want)


@pytest.mark.slow
def test_sigkill_mid_save_keeps_previous_checkpoint(killed):
    out, result, leftovers = killed
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = load_checkpoint(out / "last.pt")  # the epoch-1 file, whole: the half-written one never replaced it
    assert last["epoch"] == 1 and [row["epoch"] for row in last["history"]] == [1]
    assert load_checkpoint(out / "best.pt")["epoch"] in (1, 2)
    assert sorted(p.name for p in out.iterdir() if ".pt" in p.name) == [*leftovers, "best.pt", "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_says_how_to_resume(terminated):
    out, returncode, stdout, stderr = terminated
    assert returncode == 2, stderr[-3000:]
    assert "resuming at epoch 2 of 3" in stdout
    assert f"error: stopped by SIGTERM during epoch 3; last.pt holds epoch 2, continue with: " \
           f"python driver.py --resume {out}" in stderr
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and list(history(out)["epoch"]) == [1, 2]
    assert not list(out.rglob("*.tmp"))  # the resume cleared what the SIGKILL left


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(reference, resumed):
    out, result = resumed
    assert "resuming at epoch 3 of 3" in result.stdout
    assert_same_results(out, reference)


@pytest.mark.slow
def test_resumed_run_with_loader_workers_matches_uninterrupted_run(runs):
    """Persistent workers once drew their seed from the global stream in the first epoch of each process only: the
    replayed epoch after a resume then differed from the uninterrupted run's."""
    out, child = runs["resumed with workers"]
    result = finish(child, check=0)
    assert "workers: 2" in result.stdout and "resuming at epoch 2 of 3" in result.stdout
    assert_same_results(out, runs["again"])


@pytest.mark.slow
def test_same_seed_gives_identical_history(runs):
    # The reference run built the image cache, this one found it, and read it with 2 loader workers instead of the
    # default: none of that may change the result.
    pd.testing.assert_frame_equal(history(runs["again"]), history(runs["reference"]), check_exact=True)
    metrics = [(run / "test" / "metrics.json").read_text() for run in (runs["again"], runs["reference"])]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoints(data, tmp_path, monkeypatch, capsys):
    real_epoch = train.train_one_epoch

    def nan_at_step_3_of_epoch_2(*args, **kwargs):
        bound = inspect.signature(real_epoch).bind(*args, **kwargs)
        if bound.arguments["epoch"] == 2:
            loss_fn, calls = bound.arguments["step"].loss_fn, []

            def poisoned(*a):
                calls.append(1)
                loss, *rest = loss_fn(*a)
                return (loss * float("nan") if len(calls) == 3 else loss), *rest
            poisoned.w_instance = loss_fn.w_instance  # the loop reads whether to draw a second view
            bound.arguments["step"] = dataclasses.replace(bound.arguments["step"], loss_fn=poisoned)
        return real_epoch(*bound.args, **bound.kwargs)

    monkeypatch.setattr(train, "train_one_epoch", nan_at_step_3_of_epoch_2)
    out = tmp_path / "nan"
    code = driver.main(["--data-dir", str(data[0]), "--cache-dir", str(data[1]), "--out", str(out), "--workers", "0",
                        *TINY])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "error: loss became nan at epoch 2, step 3" in stderr and "last.pt holds epoch 1, best.pt epoch 1" in stderr
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(out / name)
        assert checkpoint["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert list(history(out)["epoch"]) == [1]


class RunsCode:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the checkpoint ran code')",)


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "malicious" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": {"fc.weight": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    yield path, marker
    # The payload is live: an unsafe load does run it. (Only here, after every check, and on a file we made.)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "the checkpoint ran code"
    marker.unlink()


def test_checkpoint_with_pickled_code_is_refused(malicious):
    path, marker = malicious
    with pytest.raises(UserError, match=r"refusing to load .*pickled Python objects.*Unsupported global: GLOBAL exec"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["--weights", "--resume"])
def test_cli_refuses_pickled_code(malicious, data, how, capsys):
    path, marker = malicious
    if how == "--weights":
        argv = ["--data-dir", str(data[0]), "--cache-dir", str(data[1]), "--out", str(path.parent.parent / "w"),
                "--workers", "0", "--weights", str(path), *TINY]
    else:
        (path.parent / "config.json").write_text(json.dumps({"out": str(path.parent)}))
        argv = ["--resume", str(path.parent)]
    assert driver.main(argv) == 2
    assert f"error: refusing to load {path}: it holds pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()


def test_failed_save_leaves_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    folder = tmp_path / "save"
    save_checkpoint(folder / "last.pt", {"epoch": 1, "weights": torch.ones(3)})
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as file:
            file.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of a save

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder / "last.pt", {"epoch": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    assert os.listdir(folder) == ["last.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UserError, match="cannot read checkpoint .*damaged or not a PyTorch file"):
        load_checkpoint(path)
