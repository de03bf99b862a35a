"""CUDA and torchrun correctness (#18), shown on the CPU wherever a mock or CPU autocast can show it: the precision
each GPU generation gets and resuming across precisions, the weight average without host syncs (its `gpu` test checks
that on CUDA), float32 scores under bf16 autocast, checkpoints with more CUDA random states than GPUs, --compile with
--sync-bn, a GPU that PyTorch cannot use, and every torchrun rank stopping within seconds of one rank's failure."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine import devices
import train
from conftest import ROOT, tiny
from engine.config import Settings
from engine.devices import autocast_dtype, pick_device
from engine.weight_average import WeightAverage
from isic.demo import make_dataset
from modules import SiameseNet
from train import TrainingState, precision_change
from utils import UserError, rng_state, set_rng_state

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------- 1. precision by compute capability

@pytest.mark.parametrize("capability, expected", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                                  ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_precision_follows_compute_capability_not_emulated_bf16(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on a T4: emulation counts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(torch.device("cuda")) == expected
    assert autocast_dtype(torch.device("cpu")) is None


def training_state(precision):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "float16")
    return TrainingState(model, None, optimizer, scheduler, scaler, precision=precision)


def test_a_bf16_run_resumes_in_fp16_with_a_fresh_loss_scale_and_says_so():
    checkpoint = training_state("bfloat16").state_dict(Settings())
    assert checkpoint["scaler"] == {} and checkpoint["precision"] == "bfloat16"
    on_a_t4 = training_state("float16")
    on_a_t4.load_state_dict(checkpoint)  # GradScaler.load_state_dict refuses an empty state
    assert on_a_t4.scaler.get_scale() == 2.0 ** 16
    note = precision_change(checkpoint, "float16")
    assert note.startswith("note: the epochs so far were trained in bfloat16, this device continues in float16")
    assert precision_change(checkpoint, "bfloat16") is None
    fp16 = training_state("float16")
    fp16.scaler.scale(torch.ones(()))
    fp16.scaler.update(1024.0)
    older = {k: v for k, v in fp16.state_dict(Settings()).items() if k != "precision"}  # before "precision" was kept
    assert "trained in float16, this device continues in bfloat16" in precision_change(older, "bfloat16")
    training_state("bfloat16").load_state_dict(older)  # a disabled scaler ignores the saved loss scale


# ---------------------------------------------------------------- 2. the weight average

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


def train_with_averages(steps, decay=0.9):
    model = small_net()
    ours, theirs = WeightAverage(model, decay), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                                              use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 3, 8, 8, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    return model, ours, theirs


def test_weight_average_equals_swa_utils_ema_and_copies_integer_buffers():
    model, ours, theirs = train_with_averages(steps=12)
    mine, reference = ours.module.state_dict(), theirs.module.state_dict()
    assert mine.keys() == model.state_dict().keys()  # checkpoints keep the model's keys
    for name, value in mine.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)
        else:  # num_batches_tracked: copied from the model, not a truncated average of a counter
            assert value.item() == model.state_dict()[name].item() == 12
    assert not torch.equal(mine["0.weight"], model.state_dict()["0.weight"])  # it does average


def test_weight_average_counter_is_a_python_int_not_a_tensor():
    _, ours, theirs = train_with_averages(steps=3)
    assert ours.updates == 3 and isinstance(ours.updates, int)
    assert all(name.startswith("module.") for name, _ in ours.named_buffers())  # no n_averaged tensor to sync on
    assert int(theirs.n_averaged) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_weight_average_update_makes_no_host_sync_on_cuda():
    model = SiameseNet("resnet18", 16).cuda()
    average = train.moving_average(model, 0.99, 1000)
    average.update_parameters(model)  # the first update copies
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            average.update_parameters(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert average.updates == 4


# ---------------------------------------------------------------- 3. scores in float32 under bf16 autocast

def test_embeddings_and_logits_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = SiameseNet("resnet18", 16).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings, logits = model(images)
            features = model.trunk(images)
        assert features.dtype == torch.bfloat16  # the trunk still runs in bf16
        expected_embeddings = model.embedder(features.float())
        expected_logits = model.head(expected_embeddings).squeeze(1)
    assert embeddings.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected_embeddings, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


# ---------------------------------------------------------------- 5. CUDA random states

def test_a_checkpoint_with_more_cuda_states_than_gpus_resumes(monkeypatch):
    state = rng_state()
    assert state["cuda"] == []  # never saved: seed_epoch reseeds the GPUs' generators every epoch
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 4  # an older file, written on a 4-GPU machine

    def set_rng_state_all(states):
        if len(states) > torch.cuda.device_count():
            raise IndexError("device index out of range")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    set_rng_state(state)
    assert rng_state()["cuda"] == []


# ---------------------------------------------------------------- 6. --compile with --sync-bn

def test_compile_with_sync_bn_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "world_size", lambda: 2)
    with pytest.raises(UserError, match="--compile with --sync-bn is not supported"):
        train.fit(SiameseNet("resnet18", 16), None, Settings(compile=True, sync_bn=True), tmp_path,
                  torch.device("cuda"))


# ---------------------------------------------------------------- 7. a GPU that PyTorch cannot use

def test_a_gpu_pytorch_cannot_use_is_named(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pick_device("auto").type == "cpu"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("warning: an NVIDIA GPU is present but PyTorch")
    assert "built for CUDA 13.0" in warning and warning.strip().endswith("running on the CPU")
    with pytest.raises(UserError, match="--device cuda was asked for, but an NVIDIA GPU is present .* CUDA 13.0"):
        pick_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: nothing to say
    assert pick_device("auto").type == "cpu" and capsys.readouterr().err == ""


def test_no_warning_without_an_nvidia_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.setattr(devices, "Path", lambda p: tmp_path / "no-such-folder")
    assert devices.gpu_hidden_from_torch() is None


# ---------------------------------------------------------------- 4. torchrun: one rank fails, every rank stops

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("failing") / "data", n_images=120, malignant_rate=0.2, size=40,
                        seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("fail, failure, others_say", [
    ("save", "planted failure: cannot write last.pt", "stopped because rank 0 failed (its own error line says why)"),
    ("nan", "loss became nan at epoch 1, step 2", "loss became non-finite on another rank"),
    ("data", "planted failure: cannot read the images on rank 1",
     "stopped because rank 1 failed (its own error line says why)"),
    ("step", "rank 1 failed during epoch 1: RuntimeError: planted failure: CUDA out of memory",
     "rank 0 lost contact with another rank during epoch 1")])
def test_every_rank_stops_within_seconds_of_one_rank_failing(small_data, tmp_path, fail, failure, others_say):
    result = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "failing_rank.py"), "--data-dir", str(small_data),
                             "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *tiny(2)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FAIL": fail})
    ended = time.time()
    planted = float(re.search(r"planted at ([\d.]+)", result.stderr)[1])
    assert result.returncode != 0
    # Seconds, not a collective's timeout (10 minutes and more): the process exits and torchrun's own shutdown alone
    # have taken 15-30 s on a busy 2-core machine.
    assert ended - planted < 60, result.stderr[-3000:]
    assert result.stderr.count(failure) == 1, result.stderr[-3000:]  # said once, by the rank that failed
    assert others_say in result.stderr, result.stderr[-3000:]
    assert "]: Traceback" not in result.stderr, result.stderr[-3000:]  # no rank's ("[rank1]: Traceback ...")
