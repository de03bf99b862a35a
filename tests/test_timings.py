"""timings.py: each phase's wall time in timings.json, kept across a resume, and the one-line summary."""
import json

import pytest

from engine import timings


def test_phases_are_written_as_they_end_and_summarised(tmp_path):
    path = tmp_path / "timings.json"
    with timings.recording(path):
        with timings.phase("data.cache") as p:
            p.note = "10 images"
        written = json.loads(path.read_text())  # already there: an interrupted run keeps what it measured
        with timings.part("test"):
            with timings.phase("evaluation.score"):
                pass
    assert [p["name"] for p in written["phases"]] == ["data.cache"] and written["phases"][0]["note"] == "10 images"
    table = json.loads(path.read_text())
    assert [p["name"] for p in table["phases"]] == ["data.cache", "evaluation.score.test"]
    assert table["total_seconds"] == pytest.approx(sum(p["seconds"] for p in table["phases"]))
    assert set(table) == {"phases", "total_seconds"}


def test_a_resumed_run_adds_to_the_phases_it_had(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(timings.table([{"name": "training.epoch1", "seconds": 5.0}])))
    with timings.recording(path, keep=True):
        with timings.phase("training.epoch2"):
            pass
    assert [p["name"] for p in timings.read(path)] == ["training.epoch1", "training.epoch2"]
    with timings.recording(path):  # a new run (--overwrite) starts afresh
        with timings.phase("data.split"):
            pass
    assert [p["name"] for p in timings.read(path)] == ["data.split"]


def test_nothing_is_kept_outside_a_recording_or_from_a_failed_block(tmp_path):
    path = tmp_path / "timings.json"
    with timings.phase("data.cache"):  # a library function called by something that does not record
        pass
    with timings.recording(path):
        with pytest.raises(ValueError):
            with timings.phase("data.split"):
                raise ValueError
        with timings.phase("data.metadata"):
            pass
    assert [p["name"] for p in timings.read(path)] == ["data.metadata"]


def test_the_summary_adds_up_each_group_in_order():
    phases = [{"name": "evaluation.tsne.test", "seconds": 20.0}, {"name": "data.cache", "seconds": 100.4},
              {"name": "training.epoch1", "seconds": 60.0}, {"name": "validation.epoch1", "seconds": 13.0},
              {"name": "training.epoch2", "seconds": 60.0}, {"name": "evaluation.score.test", "seconds": 49.0},
              {"name": "data.split", "seconds": 9.6}]
    assert timings.summary(phases) == "312 s: data 110, training 120, validation 13, evaluation 69"
    assert "total" in timings.format_table(phases).splitlines()[-1]
