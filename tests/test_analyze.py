"""koala analyze: numbers, not just files -- per-stage sums, self-similarity, teacher-vs-student, PCA shapes."""

import json
import os

import pytest
import torch

from koala.analyze import analyze_latency, analyze_params, analyze_sa_pca, analyze_similarity
from koala.arch.stats import forward_flops
from koala.cli import main
from koala.compress import compress
from koala.families import family_of, get_family, preset_stats

PROMPTS = ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    "preset,teacher", [("koala-700m", "sdxl-base"), ("dit-m", "pixart-sigma-xl"), ("bk-sdm-tiny", "sd-v1")]
)
def test_params_per_stage_sum_to_the_presets_counts(preset, teacher, tmp_path):
    res = analyze_params(preset, str(tmp_path), resolution=512)
    rows = res["models"]
    assert list(rows) == ["teacher", preset]  # a student preset is shown next to its family's teacher
    for name, count in (
        ("teacher", preset_stats(teacher, flops=False)["params"]),
        (preset, preset_stats(preset, flops=False)["params"]),
    ):
        r = rows[name]
        assert sum(sum(c.values()) for c in r["params"].values()) == r["total_params"] == count
        assert sum(r["flops"].values()) == r["total_flops"]
    fam = get_family(res["family"])
    cfg = fam.student_config(fam.reference_config, preset)
    assert rows[preset]["total_flops"] == forward_flops(fam.build_model(cfg, "meta"), fam.dummy_inputs(cfg, 64))
    assert (
        os.path.getsize(res["files"]["png"]) > 0 and json.load(open(res["files"]["json"]))["family"] == res["family"]
    )
    if preset == "koala-700m":  # the depth cut shows where the paper made it: DW-3 / UP-1 attention, no MID
        t, s = rows["teacher"]["params"], rows[preset]["params"]
        # DW-3 self-attention: 1 of 2 attention blocks kept, 5 of its 10 layers: a quarter of the teacher's
        assert s["DW-3"]["self-attention"] == t["DW-3"]["self-attention"] // 4
        assert "MID" not in s or not sum(s["MID"].values())


def test_params_of_a_student_directory_use_its_layer_map(tiny_pipe_dir, tmp_path):
    compress(tiny_pipe_dir, "koala-1b", str(tmp_path / "s"))
    res = analyze_params(str(tmp_path / "s"), str(tmp_path / "out"), resolution=64)
    t, s = res["models"]["teacher"], res["models"][str(tmp_path / "s")]
    assert t["total_params"] > s["total_params"] and set(s["params"]) <= set(t["params"])


def test_latency_covers_every_stage(tiny_pipe_dir, tmp_path):
    res = analyze_latency(tiny_pipe_dir, str(tmp_path), resolution=32, repeats=2, progress=False)
    ms = res["ms"]
    assert set(ms) == {"IO", "DW-1", "DW-2", "DW-3", "MID", "UP-1", "UP-2", "UP-3", "total"}
    assert all(v > 0 for k, v in ms.items() if k != "IO")
    assert sum(v for k, v in ms.items() if k != "total") == pytest.approx(ms["total"], rel=1e-6)
    assert json.load(open(res["files"]["json"]))["ms"] == ms and os.path.getsize(res["files"]["png"]) > 0


def test_similarity_self_is_one_symmetric_and_teacher_vs_itself(tiny_pipe_dir, tmp_path):
    fam = family_of(tiny_pipe_dir)
    from koala.families import model_config

    same = fam.teacher_spec(model_config(tiny_pipe_dir)).to_dict()
    same.pop("description"), same.pop("paper_params")
    compress(tiny_pipe_dir, same, str(tmp_path / "same"))  # a "student" that equals its teacher
    res = analyze_similarity(
        tiny_pipe_dir, str(tmp_path / "o"), PROMPTS, student=str(tmp_path / "same" / "unet"), steps=2, progress=False
    )
    assert res["forwards"] == 2 * len(PROMPTS)
    deep = next(g for k, g in res["groups"].items() if k.startswith("DW-3"))
    m = torch.tensor(deep["matrix"])
    assert m.shape == (10, 10) and torch.allclose(m, m.T, atol=1e-6)
    assert torch.allclose(m.diagonal(), torch.ones(10, dtype=m.dtype), atol=1e-5)
    assert all(abs(p["cosine"] - 1) < 1e-5 for p in res["student_vs_teacher"].values())
    assert os.path.getsize(res["files"]["png"]) > 0
    # a real student (KOALA-700M: fewer layers, own weights after compression only) is matched layer by layer
    compress(tiny_pipe_dir, "koala-700m", str(tmp_path / "k"))
    res = analyze_similarity(
        tiny_pipe_dir, str(tmp_path / "o2"), PROMPTS[:1], student=str(tmp_path / "k" / "unet"), steps=2, progress=False
    )
    cos = [p["cosine"] for p in res["student_vs_teacher"].values()]
    # DW-2 1 block x 2 layers, DW-3 1 x 5, no MID, UP-1 2 blocks x 5, UP-2 2 x 2
    assert len(cos) == 2 + 5 + 2 * 5 + 2 * 2 and all(-1 <= c <= 1 + 1e-6 for c in cos)
    assert min(cos) < 0.99  # removed layers and blocks change what the kept ones see


def test_sa_pca_shapes_and_ranges(tiny_pipe_dir, tmp_path):
    compress(tiny_pipe_dir, "koala-700m", str(tmp_path / "k"))
    res = analyze_sa_pca(
        tiny_pipe_dir, str(tmp_path / "o"), "a red circle", student=str(tmp_path / "k" / "unet"), timestep=500, steps=4
    )
    assert set(res["rows"]) == {"teacher", "student"}
    t = res["rows"]["teacher"]
    assert set(t) == {"DW-2", "DW-3", "MID", "UP-1", "UP-2"}  # every stage with self-attention
    for stage, v in t.items():
        h, w = v["grid"]
        assert h * w == v["tokens"][0] and len(v["explained_variance"]) == 3
        assert 0 <= sum(v["explained_variance"]) <= 1 + 1e-9
    assert "MID" not in res["rows"]["student"]  # KOALA-700M has no mid block
    assert os.path.getsize(res["files"]["png"]) > 0


def test_pca_rgb_is_in_range():
    from koala.analyze.features import pca_rgb

    rgb, var = pca_rgb(torch.randn(64, 16), 32, 32)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1 and var == sorted(var, reverse=True)


def test_cli_params_and_pixart_sa_pca(tiny_pixart_dir, tmp_path, capsys):
    assert main(["analyze", "params", "koala-700m", "--out", str(tmp_path / "p")]) == 0
    assert "teacher: 2,567,463,684 params" in capsys.readouterr().out
    assert (
        main(
            [
                "analyze",
                "sa-pca",
                tiny_pixart_dir,
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    out = json.load(open(tmp_path / "d" / "sa_pca.json"))
    assert set(out["rows"]["model"]) == {f"B-{k}" for k in range(1, 7)}  # a DiT: one stage per block
    assert main(["analyze", "similarity", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "e")]) == 2
