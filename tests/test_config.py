"""The command line is generated from the Settings fields: every setting has its flag, and the flags behave."""
import argparse
import dataclasses

import pytest

from engine.config import (NOT_OUTCOME, RESUMABLE, SEED, Settings, add_settings, build_parser, parse_cli,
                           settings_from_cli)


def flag_dests(parser):
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_setting_has_one_flag_and_every_flag_a_setting():
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert flag_dests(build_parser()) == fields - {"versions", "given"}  # recorded, never typed


def test_help_shows_the_defaults():
    help_text = build_parser().format_help()
    epochs = next(line for line in help_text.splitlines() if line.strip().startswith("--epochs"))
    assert "(default 15)" in epochs


def test_derived_sets():
    assert RESUMABLE == {"resume", "device", "workers", "cache_dir", "neighbours", "neighbours_by", "tensorboard",
                         "resident", "save_every"}
    assert NOT_OUTCOME == {"data_dir", "csv", "image_dir", "duplicates", "extra_csv", "splits", "cache_dir", "out",
                           "overwrite", "resume", "workers", "device", "versions", "neighbours", "given", "tensorboard",
                           "resident", "save_every"}


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "must be at least 1; got 0"),
                                           (["--lr", "abc"], "'abc' is not a number")])
def test_a_bad_value_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error:") and err.strip().count("\n") == 0 and message in err, err


def test_only_typed_flags_override_the_profile():
    assert parse_cli(["--epochs", "3"]) == {"epochs": 3}
    s = settings_from_cli({"profile": "cpu", "epochs": 3})
    assert (s.epochs, s.backbone, s.img_size) == (3, "resnet18", 64)


def test_negative_flags():
    assert parse_cli(["--no-tsne", "--no-normalize-embeddings"]) == {"tsne": False, "normalize_embeddings": False}
    assert settings_from_cli(parse_cli(["--no-tsne"])).tsne is False
    assert parse_cli(["--deterministic"]) == {"deterministic": True}
    assert parse_cli(["--no-deterministic"]) == {"deterministic": False}


def test_add_settings_to_another_parser():
    p = argparse.ArgumentParser()
    add_settings(p, ["workers", "device"], help={"device": "where to run"})
    workers = next(a for a in p._actions if a.dest == "workers")
    assert workers.option_strings == ["--workers"] and workers.type is SEED
    assert vars(p.parse_args([])) == {"workers": None, "device": None}  # a plain parser's defaults
    assert vars(p.parse_args(["--workers", "2", "--device", "cpu"])) == {"workers": 2, "device": "cpu"}
    assert "where to run" in p.format_help()

    suppressed = argparse.ArgumentParser()
    add_settings(suppressed, ["workers"], default=argparse.SUPPRESS)
    assert vars(suppressed.parse_args([])) == {}


def test_every_path_setting_is_stored_absolute(tmp_path, monkeypatch):
    """predict.py --run R reads the run's paths from config.json, from whatever folder it is started in."""
    from workflow import pipeline
    monkeypatch.chdir(tmp_path)
    paths = ("data_dir", "csv", "image_dir", "duplicates", "extra_csv", "splits", "cache_dir")
    s = pipeline.new_settings({**{name: f"rel/{name}" for name in paths}, "out": "run"})
    assert {name: getattr(s, name) for name in paths} == {name: str(tmp_path / "rel" / name) for name in paths}
class ParsedAnyway(Exception):
    """Raised by what a program does after parsing its flags: the mistyped flag was accepted."""


def parsed_anyway(*args, **kwargs):
    raise ParsedAnyway


# What each program does right after parsing is replaced where it would otherwise start real work.
@pytest.mark.parametrize("program, argv, typo, after_parsing", [
    ("driver", ["--epoch", "1"], "--epoch", "run"),
    ("predict", ["--run", "no-such-run", "--spli", "val"], "--spli", "score_run"),
    ("export", ["--run", "no-such-run", "--form", "onnx"], "--form", "load_run"),
    ("experiments.crossval", ["--fold", "2"], "--fold", "find_layout"),  # driver.py's flags reach parse_cli
    ("experiments.fold_ensemble", ["--fold", "2"], "--fold", "fold_ensemble"),
    ("experiments.ablation", ["--seeds", "0", "1", "--ou", "x"], "--ou", "ablation"),
    ("experiments.gradcam_check", ["no-such-run", "--lesion", "3"], "--lesion", "load_run"),
    ("experiments.bench", ["--case", "cpu18"], "--case", "Path"),
    ("experiments.gpu_check", ["--out", "x", "--tin"], "--tin", "Check"),
])
def test_an_abbreviated_flag_is_an_error(capsys, monkeypatch, program, argv, typo, after_parsing):
    module = __import__(program, fromlist=["main"])
    monkeypatch.setattr(module, after_parsing, parsed_anyway)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: {typo}" in err, err
