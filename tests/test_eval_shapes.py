"""The model-free shapes scorer: ~100% on ground-truth renders, ~0 on noise, chance on mismatched prompts."""

import json

import numpy as np
import pytest

from koala.lab.score import detect_objects, label_components, parse_prompt, score_folder, score_pairs
from koala.lab.shapes import generate_scenes, render, write_shapes_dataset


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_renders_score_at_least_98(size):
    scenes = generate_scenes(200, "val", 7, size)
    agg, _ = score_pairs([render(s.objects, size) for s in scenes], [s.text for s in scenes])
    for cat in ("color", "shape", "binding", "spatial"):
        assert agg[cat] >= 0.98, (cat, agg)
    assert agg["n_spatial"] > 30


def test_noise_and_mismatched_prompts_score_near_chance():
    scenes = generate_scenes(150, "val", 8, 64)
    prompts = [s.text for s in scenes]
    rng = np.random.default_rng(0)
    noise, _ = score_pairs([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes], prompts)
    for cat in ("color", "shape", "binding", "spatial"):
        assert noise[cat] <= 0.1, (cat, noise)
    # renders of the *other* scenes: colour/shape overlap by chance, binding and relations rarely
    imgs = [render(s.objects, 64) for s in scenes]
    shuf, _ = score_pairs(imgs[1:] + imgs[:1], prompts)
    assert shuf["binding"] <= 0.3 and shuf["all"] <= 0.15, shuf
    assert 0.2 <= shuf["color"] <= 0.7, shuf


def test_parse_prompt():
    e = parse_prompt(
        "a small red circle to the left of a large blue square, and a green triangle above the blue square"
    )
    assert [(o["color"], o["shape"], o["size"]) for o in e.objects] == [
        ("red", "circle", "small"),
        ("blue", "square", "large"),
        ("green", "triangle", None),
    ]
    assert e.relations == [{"a": 0, "relation": "left of", "b": 1}, {"a": 2, "relation": "above", "b": 1}]
    assert parse_prompt("a picture of a yellow square").objects[0]["shape"] == "square"
    assert parse_prompt("a red circle and a blue square").relations == []


def test_label_components_and_detection():
    m = np.zeros((6, 6), bool)
    m[0, 0:2] = m[3:5, 3:5] = True
    m[1, 5] = True
    labels, n = label_components(m)
    assert n == 3 and labels[0, 0] == labels[0, 1] and labels[3, 3] != labels[0, 0]
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:30, 10:30] = (220, 30, 30)
    (obj,) = detect_objects(img)
    assert obj["color"] == "red" and obj["shape"] == "square" and abs(obj["cx"] - 20) < 0.5


def test_cli_eval_shapes(tmp_path, capsys):
    from PIL import Image, PngImagePlugin

    from koala.cli import main

    d = write_shapes_dataset(str(tmp_path / "d"), num_train=2, num_val=6, progress=False)
    assert main(["eval", "shapes", f"{d}/val", "--json"]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["n_images"] == 6 and agg["binding"] == 1.0
    assert main(["eval", "shapes", f"{d}/val"]) == 0
    assert "binding" in capsys.readouterr().out
    out = tmp_path / "agg.json"
    assert main(["eval", "shapes", f"{d}/val", "--json", str(out)]) == 0  # --json FILE: the file and the table
    assert json.loads(out.read_text()) == agg and "binding" in capsys.readouterr().out
    # PNG tEXt "prompt" instead of metadata.jsonl
    png = tmp_path / "png"
    png.mkdir()
    s = generate_scenes(1, "val", 0)[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", s.text)
    Image.fromarray(render(s.objects, 64)).save(png / "x.png", pnginfo=info)
    agg, per = score_folder(str(png))
    assert agg["all"] == 1.0 and per[0]["text"] == s.text
    assert main(["eval", "shapes", str(tmp_path / "missing")]) == 2
