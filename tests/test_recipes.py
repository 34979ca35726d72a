"""YAML recipes and key=value overrides (koala.recipes) and the shipped distillation recipes."""

import math

import pytest

from koala import KoalaError
from koala.distill.config import DEFAULTS, load_config
from koala.recipes import REPO_CONFIGS, load_recipe, parse_override


def test_parse_override_values():
    assert parse_override("train.lr=1e-5") == ("train.lr", 1e-5)  # no dot: still a float
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=null") == ("a", None) and parse_override("a=") == ("a", None)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("kd.features={SA: all, LF: [DW-1, UP-3]}")[1] == {"SA": "all", "LF": ["DW-1", "UP-3"]}
    assert parse_override("x=a=b") == ("x", "a=b")
    assert math.isnan(parse_override("x=.nan")[1])
    for bad in ("novalue", "=3", "a..b=1", "a=[1,"):
        with pytest.raises(KoalaError):
            parse_override(bad)


def test_recipe_merge_extends_and_unknown_keys(tmp_path):
    defaults = {"a": {"x": 1, "y": 2}, "feat": {"SA": "all"}, "open": {}}
    (tmp_path / "base.yaml").write_text("a: {x: 10}\nfeat: {SA: all, LF: [DW-1]}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\na: {y: 20}\nfeat: {LF: all}\nopen: {anything: 1}\n")
    cfg = load_recipe(str(tmp_path / "child.yaml"), ["a.x=5"], defaults, atomic=("feat",), open_sections=("open",))
    assert cfg == {"a": {"x": 5, "y": 20}, "feat": {"LF": "all"}, "open": {"anything": 1}}
    with pytest.raises(KoalaError, match=r"unknown key 'a.z'"):
        load_recipe(None, ["a.z=1"], defaults)
    with pytest.raises(KoalaError, match="did you mean a.x"):
        load_recipe(None, ["a.xx=1"], defaults)
    with pytest.raises(KoalaError, match="not found"):
        load_recipe("no-such-recipe", [], defaults)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(KoalaError, match="loops"):
        load_recipe(str(tmp_path / "loop.yaml"), [], defaults)


def test_shipped_recipes_resolve_by_name_and_match_paper():
    names = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    assert {"tiny", "bk-baseline", "koala-lightning-700m", "koala-lightning-1b", "koala-turbo-700m",
            "koala-turbo-1b"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert set(cfg) == set(DEFAULTS)
    for name, preset, res in (("koala-lightning-700m", "koala-700m", 1024), ("koala-lightning-1b", "koala-1b", 1024),
                              ("koala-turbo-700m", "koala-700m", 512), ("koala-turbo-1b", "koala-1b", 512)):
        cfg = load_config(name)
        t = cfg["train"]
        assert cfg["student"]["preset"] == preset and t["resolution"] == res
        assert t["lr"] == 1e-5 and t["max_steps"] == 500_000 and t["mixed_precision"] == "fp16"
        assert t["batch_size"] * t["grad_accum"] * 4 == 128  # 4 GPUs in the paper
        assert cfg["kd"]["features"] == {"SA": "all", "LF": ["DW-1", "UP-3"]}
    assert load_config("koala-lightning-700m")["teacher"]["unet_path"]
    assert load_config("koala-turbo-1b")["teacher"]["unet_path"] is None
    assert load_config("bk-baseline")["kd"]["features"] == {"LF": "all"}
    assert load_config(None, ["teacher.pipeline=x"])["kd"]["features"] == {"SA": "all", "LF": ["DW-1", "UP-3"]}


def test_config_checks_name_the_field():
    with pytest.raises(KoalaError, match="teacher.pipeline is required"):
        load_config(None)
    for override, field in (("kd.features={XA: all}", "XA"), ("kd.features={SA: [UP-9]}", "kd.features.SA"),
                            ("loss.feat=-1", "loss.feat"), ("train.mixed_precision=fp8", "mixed_precision"),
                            ("data.caption_dropout=2", "caption_dropout"), ("kd.layer_selection=top", "layer_selection"),
                            ("train.grad_accum=1.5", "grad_accum")):
        with pytest.raises(KoalaError, match=field):
            load_config("tiny", [override])
