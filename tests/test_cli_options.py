"""The CLI's shared arguments: choices read from the library constants (building the parser imports no torch) and
``--json [FILE]`` (a file, or stdout for a bare --json or '-') in every command that has it."""

import argparse
import json
import subprocess
import sys

import pytest

from koala.cli import build_parser, main
from koala.cli.options import LibraryChoices


def _actions(parser, path=("koala",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action._name_parser_map.items():
                yield from _actions(sub, (*path, name))
        else:
            yield path, action


def test_building_the_parser_imports_no_torch():
    code = "import sys; from koala.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_library_choices_are_the_library_constants():
    from koala.arch.layer_map import SELECTIONS
    from koala.families.sampling import TEACHER_KINDS
    from koala.inference.pipeline import OFFLOAD, SCHEDULERS
    from koala.utils.devices import DTYPE_NAMES, parse_dtype

    choices = {(" ".join(path), a.dest): a.choices for path, a in _actions(build_parser())}
    assert list(choices["koala compress", "layer_selection"]) == list(SELECTIONS)
    assert list(choices["koala compress", "teacher_kind"]) == list(TEACHER_KINDS)
    assert list(choices["koala generate", "scheduler"]) == list(SCHEDULERS)
    assert list(choices["koala generate", "offload"]) == [o for o in OFFLOAD if o]  # None: no --offload
    dtypes = [c for (_, dest), c in choices.items() if dest in ("dtype", "vae_dtype")]
    assert len(dtypes) == 10 and all(list(c) == list(DTYPE_NAMES) for c in dtypes)
    assert all(parse_dtype(name) is not None for name in DTYPE_NAMES)
    for (where, dest), c in choices.items():  # every library path resolves
        assert c is None or (len(c) > 0 and all(isinstance(n, str) for n in c)), (where, dest)
    assert isinstance(choices["koala eval compbench", "category"], LibraryChoices)


def test_choices_are_checked_and_listed(capsys):
    parser = build_parser()
    args = ["compress", "--teacher", "t", "--student", "s", "--out", "o"]
    assert parser.parse_args([*args, "--layer-selection", "up"]).layer_selection == "up"
    with pytest.raises(SystemExit):
        parser.parse_args([*args, "--layer-selection", "top"])
    assert "invalid choice: 'top' (choose from 'bottom', 'interleave', 'up')" in capsys.readouterr().err


def test_eval_run_help_lists_the_scorers_of_eval_run(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "run", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also inside compbench-color|...
    assert (
        "comma-separated:shapes,clip,hpsv2,pickscore,compbench-color|shape|texture|spatial|non_spatial|complex" in text
    )


@pytest.mark.parametrize(
    "command",
    [
        ["presets"],
        ["bench"],
        ["bench", "train"],
        ["data", "stats", "SRC"],
        ["eval", "shapes", "DIR"],
        ["eval", "clip", "DIR", "--checkpoint", "C"],
        ["eval", "fid", "DIR", "--reference", "R", "--inception", "I"],
    ],
)
def test_json_is_a_file_or_stdout_everywhere(command):
    parser = build_parser()
    assert parser.parse_args(command).json is None
    assert parser.parse_args([*command, "--json"]).json == "-"
    assert parser.parse_args([*command, "--json", "-"]).json == "-"
    assert parser.parse_args([*command, "--json", "r.json"]).json == "r.json"


def test_emit_json_writes_the_file_atomically_or_prints(tmp_path, capsys):
    from koala.cli.options import emit_json

    assert emit_json(None, {"a": 1}) is None and capsys.readouterr().out == ""
    assert emit_json("-", {"a": 1}) is None and json.loads(capsys.readouterr().out) == {"a": 1}
    path = str(tmp_path / "r.json")
    assert emit_json(path, {"a": [1, 2]}, indent=2) == path
    assert json.loads(open(path).read()) == {"a": [1, 2]} and capsys.readouterr().out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
