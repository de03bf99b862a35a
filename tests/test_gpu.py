"""GPU code paths. On CUDA: tests marked `gpu` (skipped without a GPU; `make gpu-check` runs them). On the CPU, the
parts PyTorch lets a CPU exercise: bf16 autocast, torch.compile (with a C++ compiler), checkpoints tagged as CUDA
tensors read with map_location, and the dry run of experiments/gpu_check.py."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from engine.checkpoints import load_checkpoint, save_checkpoint
from conftest import ROOT, tiny
from engine.config import Settings
from engine.losses import JointLoss
from modules import SiameseNet
from scoring.inference import load_run
from train import build_optimizer, moving_average

CUDA = torch.cuda.is_available()
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]
# A tiny run's probabilities, bf16 on a GPU against float32 on a CPU: bf16 moves them by about 0.001 (measured with
# autocast on a CPU), another seed's run by about 0.09.
BF16_PROBABILITY_TOLERANCE = 0.005


def tiny_model(device, seed=0):
    torch.manual_seed(seed)
    return SiameseNet("resnet18", 16).to(device).to(memory_format=torch.channels_last)


def batch(device, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    return images, torch.tensor([0.0, 1.0] * (n // 2), device=device)


def loss_and_grads(model, images, targets, amp_dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings, logits = model(images)
    loss = JointLoss()(embeddings, logits, targets)[0]
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_on_channels_last_is_finite_and_matches_fp32(device):
    model = tiny_model(device).train()
    images, targets = batch(device)
    loss32, grads32 = loss_and_grads(model, images, targets, None)
    loss16, grads16 = loss_and_grads(model, images, targets, torch.bfloat16)
    assert torch.isfinite(loss16) and torch.isfinite(grads16).all()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    # bf16 keeps 8 bits of mantissa through 18 layers of an untrained network: the gradient keeps its direction
    # (cosine 0.88 on the CPU, where unrelated directions give about 0) but not 3 digits
    assert torch.nn.functional.cosine_similarity(grads16, grads32, dim=0) > 0.7


def cxx_compiler():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=[pytest.mark.slow, pytest.mark.skipif(
        not cxx_compiler(), reason="no C++ compiler: torch.compile's CPU backend (inductor) needs one")]),
    pytest.param("cuda", marks=ON_GPU)])
def test_compiled_model_gives_the_eager_outputs(device):
    model = tiny_model(device).eval()
    images, _ = batch(device, n=4)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)


def save_as_if_on_cuda(path, checkpoint, monkeypatch):
    """torch.save with every tensor tagged 'cuda:0', as a GPU run writes them: loading such a file on a machine
    without CUDA fails unless map_location moves the tensors."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(path, checkpoint)


@pytest.mark.skipif(CUDA, reason="shows a CUDA-tagged file failing without map_location, which needs a CPU-only box")
def test_a_checkpoint_written_on_a_gpu_evaluates_on_a_cpu(tmp_path, monkeypatch):
    s = Settings(backbone="resnet18", embedding_dim=16, img_size=32)
    model = tiny_model("cpu").eval()
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    save_as_if_on_cuda(tmp_path / "best.pt", {"model": model.state_dict(), "ema": None}, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really is CUDA-tagged
        torch.load(tmp_path / "best.pt", weights_only=True)
    assert load_checkpoint(tmp_path / "best.pt")["model"]["head.weight"].device.type == "cpu"
    _, loaded = load_run(tmp_path, torch.device("cpu"))
    images, _ = batch("cpu", n=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[1], model(images)[1])


# ---------------------------------------------------------------- on a CUDA GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_a_run_trained_on_cuda_is_scored_by_predict_on_the_cpu(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = dict(capture_output=True, text=True, cwd=ROOT, timeout=300)
    trained = subprocess.run([sys.executable, "driver.py", "--data-dir", str(tiny_data), "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache"), "--device", "cuda", *tiny(3)], **common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "device: cuda" in trained.stdout
    on_gpu = pd.read_csv(out / "test" / "predictions.csv")
    shutil.rmtree(out / "test")
    scored = subprocess.run([sys.executable, "predict.py", "--run", str(out), "--device", "cpu", "--workers", "0"],
                            **common)
    assert scored.returncode == 0, scored.stderr[-2000:]
    on_cpu = pd.read_csv(out / "test" / "predictions.csv")
    # Per image, not AUROC: after 3 tiny epochs the scores lie within about 0.02 of each other, so bf16 rounding can
    # swap two of them, and one swap among 16 images moves AUROC by several hundredths.
    assert on_cpu["isic_id"].tolist() == on_gpu["isic_id"].tolist()
    assert (on_cpu["probability"] - on_gpu["probability"]).abs().max() < BF16_PROBABILITY_TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_weight_average_and_optimiser_state_live_on_the_gpu():
    device = torch.device("cuda")
    model = tiny_model(device).train()
    ema = moving_average(model, 0.9, 100)
    optimizer, _ = build_optimizer(model, Settings(epochs=1), 10)
    loss, _ = loss_and_grads(model, *batch(device), torch.bfloat16)
    optimizer.step()
    ema.update_parameters(model)
    assert {t.device.type for t in [*ema.parameters(), *ema.buffers()]} == {"cuda"}
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and {t.device.type for t in moments} == {"cuda"}  # AdamW keeps only its step count on the CPU


# ---------------------------------------------------------------- experiments/gpu_check.py

@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_summary(tmp_path):
    """The check's dry run (tiny sizes, CPU, gloo): every step passes or is skipped for want of CUDA."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--out", str(out), "--device", "cpu",
                             "--tiny", "--work-dir", str(tmp_path / "work"), "--budget", "1500"],
                            capture_output=True, text=True, cwd=ROOT, timeout=1600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = (out / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:]
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    status = {row[0].lstrip("| "): row[1] for row in rows}
    assert set(status) >= {"environment", "tests marked gpu", "train 2 epochs", "re-score with predict.py",
                           "kill after epoch 1, resume", "bench (eager)", "torchrun, 1 process", "bench (--compile)"}
    assert set(status.values()) <= {"pass", "skipped"} and status["train 2 epochs"] == "pass"
    assert "identical to the uninterrupted run" in summary and "backend gloo" in summary
    assert sorted(p.name for p in out.iterdir()) == ["bench-eager.json", "steps.log", "summary.md"]


def rescored(n=450, auroc=0.8004, cell=301, precision_at_1=0.7143, queries=70, hub_max=8):
    """test/metrics.json as a GPU re-scoring may give it (the defaults: each value off by an event of bf16 noise)."""
    return {"n": n, "auroc": auroc, "confusion_matrix": [[cell, 380 - cell], [10, 60]],
            "retrieval": {"per_class": {"malignant": {"precision_at_1": precision_at_1, "queries": queries}},
                          "hub_max@5": hub_max}}


def test_rescoring_allows_discrete_metrics_an_event_or_two_and_sizes_none():
    from experiments.gpu_steps import differing_metrics
    first = rescored(auroc=0.8, cell=300, precision_at_1=0.7, hub_max=7)
    assert len(differing_metrics(first, rescored())) == 5
    assert all(difference <= allowed for _, difference, allowed in differing_metrics(first, rescored()))
    for change, where in [(dict(n=449), "n"), (dict(auroc=0.81), "auroc"), (dict(queries=71), "queries"),
                          (dict(precision_at_1=0.75), "precision_at_1"), (dict(hub_max=10), "hub_max@5"),
                          (dict(cell=305), "confusion_matrix[0][0]")]:
        beyond = [w for w, difference, allowed in differing_metrics(first, rescored(**change)) if difference > allowed]
        assert len(beyond) >= 1 and beyond[0].endswith(where), (change, beyond)


def test_gpu_check_fails_when_a_step_fails(tmp_path, monkeypatch):
    """A failing step makes the exit code 1 and is marked FAIL; the steps after it still run."""
    from experiments import gpu_check

    def broken(c):
        raise gpu_check.Failure("planted failure")
    monkeypatch.setattr(gpu_check, "steps", lambda c: [("environment", lambda c: "ok"), ("planted", broken),
                                                       ("after", lambda c: "ran")])
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--work-dir", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| planted | FAIL |" in summary and "planted failure" in summary and "| after | pass |" in summary


# ---------------------------------------------------------------- defaults that fit the device; supported versions

def test_loader_workers_by_device_and_data_path():
    from workflow.pipeline import DECODE_WORKERS, loader_workers
    assert loader_workers(torch.device("cpu"), cached=True) == 0  # the cache costs the main process almost nothing
    assert loader_workers(torch.device("cpu"), cached=False) == DECODE_WORKERS == min(4, os.cpu_count())
    assert loader_workers(torch.device("cuda"), cached=True) == DECODE_WORKERS


def test_a_torch_older_than_supported_stops_with_one_line():
    from utils import version_problem
    assert version_problem({"torch": "2.11.0+cu130", "torchvision": "0.26.0"}) is None  # a GPU image's
    assert "torch 2.2.2 is older" in version_problem({"torch": "2.2.2", "torchvision": "0.17.2"})
    assert "torchvision 0.17.0 is older" in version_problem({"torch": "2.3.0", "torchvision": "0.17.0"})
    result = subprocess.run([sys.executable, "-c", "import torch; torch.__version__ = '2.2.0'; import driver"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: torch 2.2.0 is older than this code supports (torch 2.3 and torchvision 0.18 or newer); install "
        "requirements.txt's versions or a newer build"]
