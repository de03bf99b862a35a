"""The prepared GPU measurement (experiments/gpu_bench.py) in its dry run on a CPU: every step runs and lands in one
results file."""
import pytest
import torch

from experiments import gpu_bench


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared CPU, threads that spin-wait for each other make a run crawl
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_dry_run_measures_every_case_and_the_whole_run_into_one_file(tmp_path, one_thread):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_bench.main(["--out", str(out), "--work-dir", str(work), "--tiny", "--device", "cpu"]) == 0
    assert [p.name for p in out.iterdir()] == ["results.md"]
    text = (out / "results.md").read_text()
    assert "| resnet18 32px, resident | 16 | resident | no |" in text
    assert "| resnet18 32px, loader, 0 workers | 16 | loader | no |" in text
    run = text.split("## The default run on 200 generated images")[1]
    assert "exit code 0;" in run and "s from start to report.html;" in run
    for phase in ("data.resident", "training.epoch1", "training.checkpoint.epoch1", "evaluation.score.test",
                  "evaluation.report"):
        assert f"\n{phase} " in run, phase
    assert (work / "default-run" / "report.html").is_file()


def test_asking_for_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: no CUDA device here; --device cpu --tiny is the dry run\n"
