"""The config surface, generated: Hypothesis writes malformed recipes and ``key=value`` overrides for ``koala
distill --config`` (wrong types, unknown keys, YAML syntax errors, numbers no setting can hold, empty strings) and
malformed data sections for ``koala data stats --config``. Each is refused in-process by ``koala.cli.main`` with
exit 2, one line on stderr naming the key (or the recipe file, for YAML that does not parse), and no traceback.

Only invalid inputs are generated, and ``--print-config`` stops a config that was (wrongly) accepted before any
model loads: an accepted one exits 0 and fails the test, nothing trains."""

import contextlib
import io
import os
import tempfile
import typing
from dataclasses import fields, is_dataclass

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from koala.cli import main  # noqa: E402
from koala.data.config import DEFAULTS as DATA_DEFAULTS  # noqa: E402
from koala.distill.config import DistillConfig  # noqa: E402


def _leaves(cls, prefix=""):
    """(dotted key, kind) of every typed setting of the schema: int, float, bool, str, list (Any: skipped)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if is_dataclass(base):
            yield from _leaves(base, f"{key}.")
        elif typing.get_origin(base) in (list, typing.List):
            yield key, "list"
        elif base in (int, float, bool, str):
            yield key, base.__name__


LEAVES = list(_leaves(DistillConfig))
SECTIONS = [f.name for f in fields(DistillConfig)]
KNOWN = {k for k, _ in LEAVES} | {k.rsplit(".", 1)[0] for k, _ in LEAVES} | set(SECTIONS)
# values of the wrong type per kind (YAML text): none of them converts to the kind
WRONG = {
    "int": ["abc", "[1, 2]", "{a: 1}", "1.5", "true", "2 apples"],
    "float": ["abc", "[1.0]", "{a: 1}", "true", "fast"],
    "bool": ["maybe", "[true]", "{a: 1}", "1.5", "sure"],
    "str": ["[1, 2]", "{a: 1}", "[]"],
    "list": ["abc", "{a: 1}", "[[1, 2]]", "[{a: 1}]"],
}
HUGE_INT = st.integers(19, 400).map(lambda n: str(10**n)) | st.integers(19, 60).map(lambda n: f"-{10**n}")
HUGE_FLOAT = HUGE_INT | st.sampled_from([".inf", "-.inf", ".nan", "1e400", "-1e999"])
NAME = st.from_regex(r"[a-z][a-z0-9_]{1,11}", fullmatch=True)
BROKEN_YAML = [  # one line that stops the file from parsing, after a valid start
    "{k}: [1, 2",
    "{k}: {{a: 1",
    "{k}: 'not closed",
    '{k}: "not closed',
    "{k}: *no_such_anchor",
    "- {k}",
    "{k}: 1\n   bad: indentation",
    "{k}: @reserved",
    "{k}: a: b",
]


def _case(key: str, value: str, draw):
    """(overrides, recipe mapping, the name the message must hold): ``key`` set to the YAML text ``value`` as an
    override or in a recipe file."""
    if draw(st.booleans()):  # as an override
        return [f"{key}={value}"], None, key
    node: dict = {}
    parts = key.split(".")
    cur = node
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = yaml.safe_load(value)
    return [], node, key


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["unknown", "wrong_type", "huge", "empty", "yaml", "data"]))
    if kind == "unknown":
        section = draw(st.sampled_from(["", *(s for s in SECTIONS if s != "data"), "train.ema"]))  # data: below
        name = draw(NAME.filter(lambda n: f"{section}.{n}".strip(".") not in KNOWN and n != "extends"))
        key = f"{section}.{name}" if section else name
        return _case(key, "1", draw)
    if kind == "wrong_type":
        key, leaf = draw(st.sampled_from(LEAVES))
        return _case(key, draw(st.sampled_from(WRONG[leaf])), draw)
    if kind == "huge":
        key, leaf = draw(st.sampled_from([(k, t) for k, t in LEAVES if t in ("int", "float")]))
        return _case(key, draw(HUGE_INT if leaf == "int" else HUGE_FLOAT), draw)
    if kind == "empty":
        key, _ = draw(st.sampled_from([(k, t) for k, t in LEAVES if t != "list"] + [("student.preset", "str")]))
        return _case(key, draw(st.sampled_from(["''", '""'])), draw)
    if kind == "data":
        return _data_case(draw)
    key, _ = draw(st.sampled_from(LEAVES))
    line = draw(st.sampled_from(BROKEN_YAML)).format(k=key.rsplit(".", 1)[-1])
    return [], f"extends: tiny\ntrain:\n  lr: 1.0e-4\n{line}\n", None  # None: the recipe file is named


def _data_case(draw):
    """A malformed ``data`` key (the open mapping checked by koala.data): unknown, wrong type, huge, empty."""
    how = draw(st.sampled_from(["unknown", "flag", "count", "number", "name"]))
    if how == "unknown":
        key = draw(NAME.filter(lambda n: n not in DATA_DEFAULTS))
        return _case(f"data.{key}", "1", draw)
    key, values = {
        "flag": (["center_crop", "random_flip", "shuffle", "drop_last"], ["maybe", "3", "[true]", "''"]),
        "count": (
            ["min_size", "shuffle_buffer", "num_samples", "size"],
            ["abc", "1.5", "-3", "''", "[1]", str(10**30)],
        ),
        "number": (["nsfw_threshold", "max_aspect"], ["abc", ".inf", ".nan", "-1", "''", "[1]", "1e400"]),
        "name": (
            ["caption_column", "image_column", "split", "nsfw_label", "syncap_file"],
            ["''", "'  '", "{a: 1}", "3"],
        ),
    }[how]
    return _case(f"data.{draw(st.sampled_from(key))}", draw(st.sampled_from(values)), draw)


def _run(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue(), out.getvalue()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)
@given(malformed())
def test_malformed_distill_configs_are_refused_by_name(case):
    overrides, recipe, name = case
    with tempfile.TemporaryDirectory() as tmp:
        config = "tiny"
        if recipe is not None:
            config = os.path.join(tmp, "recipe.yaml")
            with open(config, "w") as f:
                f.write(recipe if isinstance(recipe, str) else "extends: tiny\n" + yaml.safe_dump(recipe))
        code, err, out = _run(["distill", "--config", config, *overrides, "--print-config"])
    lines = err.strip().splitlines()
    assert code == 2, f"accepted (exit {code}): {case}\n{out[:300]}"
    assert "Traceback" not in err and "error: unexpected" not in err, err
    assert len(lines) == 1 and lines[0].startswith("koala distill: error: "), err
    named = name if name is not None else config
    assert named in lines[0], f"{named} not named in: {lines[0]}"


@st.composite
def data_recipe(draw):
    """A data config file with one malformed key (an override drawn by _data_case is written into the file)."""
    overrides, recipe, name = _data_case(draw)
    if recipe is None:
        key, value = overrides[0].split("=", 1)
        recipe = {"data": {key.split(".", 1)[1]: yaml.safe_load(value)}}
    return recipe, name


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)
@given(data_recipe())
def test_malformed_data_sections_are_refused_by_koala_data(case):
    recipe, name = case
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "data.yaml")
        with open(config, "w") as f:
            f.write(yaml.safe_dump(recipe))
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        code, err, _ = _run(["data", "stats", images, "--type", "folder", "--config", config])
    lines = err.strip().splitlines()
    assert code == 2, f"accepted (exit {code}): {recipe}"
    assert "Traceback" not in err and "error: unexpected" not in err, err
    assert len(lines) == 1 and name in lines[0], f"{name} not named in: {err}"


def test_the_generated_cases_cover_every_kind():
    """The strategy reaches each kind of malformation (so the property above covers them all)."""
    seen = set()

    @settings(max_examples=60, derandomize=True, database=None)
    @given(malformed())
    def collect(case):
        overrides, recipe, name = case
        seen.add("yaml" if isinstance(recipe, str) else "override" if overrides else "recipe")
        seen.add("data" if name and name.startswith("data.") else "schema")

    collect()
    assert seen == {"yaml", "override", "recipe", "data", "schema"}
