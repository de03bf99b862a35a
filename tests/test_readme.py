"""The README's commands against the programs: flags that exist, the --resume list, and what the walk runs."""
import re

import pytest

from engine.config import RESUMABLE, build_parser
import export
import predict
import sample
from conftest import ROOT
from experiments.readme_check import as_walked, readme_commands, skip_reason

README = (ROOT / "README.md").read_text()
COMMANDS = readme_commands(README)


def test_resume_flags_in_the_readme_are_the_programs():
    line = next(c for c in COMMANDS if "driver.py --resume" in c)
    listed = set(re.findall(r"--[a-z-]+", line.split("may also take:")[1]))
    flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    assert listed == {flags[name] for name in RESUMABLE - {"resume"}}


@pytest.mark.parametrize("script", ["driver.py", "predict.py", "sample.py", "export.py"])
def test_every_flag_in_the_readme_is_a_flag_of_its_program(script):
    parser = {"driver.py": build_parser, "predict.py": predict.build_parser, "sample.py": sample.build_parser,
              "export.py": export.build_parser}
    known = set(parser[script]()._option_string_actions)
    typed = [c.split("#")[0].split(script)[1] for c in COMMANDS if f"{script} " in c]
    used = {flag for c in typed for flag in re.findall(r"(?<=\s)--[a-z][a-z-]*", c)}
    assert used and used <= known, used - known


def test_the_walk_runs_untagged_commands_with_tiny_settings_and_skips_tagged_ones():
    assert len(COMMANDS) > 15
    assert skip_reason("python driver.py --data-dir D   # [GPU] [download] big") == "[GPU] [download]"
    assert skip_reason("python predict.py --run runs/first   # its test split") is None
    walked = as_walked('python driver.py --data-dir "$ISIC_DATA" --out runs/x   # a comment')
    assert walked.startswith('python driver.py --data-dir "$ISIC_DATA" --out runs/x --backbone resnet18')
    assert "#" not in walked and "--epochs 1" in walked
    resume = "python driver.py --resume runs/x"
    assert as_walked(f"{resume}   # may also take: --device") == resume
    assert as_walked("make install") == "make -o .venv/.installed install"
    walked_or_tagged = [c for c in COMMANDS if skip_reason(c) is None]
    assert any("driver.py --demo" in c for c in walked_or_tagged)
    assert all(not c.startswith(("export ", "pip ", "torchrun ")) for c in walked_or_tagged)
