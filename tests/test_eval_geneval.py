"""GenEval: the prompt set from the benchmark's templates equals known lines of its evaluation_metadata.jsonl; the
rules (thresholds, counting, overlap, position margin, colour attribution) on synthetic detections; mmdet's instance
post-processing on hand-made logits; the whole scorer with tiny random Mask2Former and CLIP models, resumed; bad
input refused by name; the shapes world's GenEval tags."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from koala.cli import main
from koala.errors import KoalaError
from koala.eval import geneval as ge
from koala.eval.geneval import Detection, Rules

# Facts: lines of the benchmark's prompts/evaluation_metadata.jsonl (djghosh13/geneval), by 1-based line number.
KNOWN_LINES = {
    1: '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    81: '{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}], '
    '"prompt": "a photo of a bench and a sports ball"}',
    254: '{"tag": "counting", "include": [{"class": "parking meter", "count": 2}], "exclude": [{"class": '
    '"parking meter", "count": 3}], "prompt": "a photo of two parking meters"}',
    255: '{"tag": "counting", "include": [{"class": "bench", "count": 4}], "exclude": [{"class": "bench", '
    '"count": 5}], "prompt": "a photo of four benchs"}',
    353: '{"tag": "colors", "include": [{"class": "cake", "count": 1, "color": "red"}], "prompt": "a photo of a red '
    'cake"}',
    354: '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, '
    '"position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}',
    553: '{"tag": "color_attr", "include": [{"class": "pizza", "count": 1, "color": "blue"}, {"class": "baseball '
    'glove", "count": 1, "color": "yellow"}], "prompt": "a photo of a blue pizza and a yellow baseball glove"}',
}
# Facts: the benchmark's per-tag counts (553 lines).
TAG_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_prompt_set_matches_the_benchmark_file(tmp_path, capsys):
    meta = ge.geneval_prompts()
    assert len(meta) == 553
    assert {t: sum(m["tag"] == t for m in meta) for t in ge.TAGS} == TAG_COUNTS
    for line, text in KNOWN_LINES.items():
        assert json.dumps(meta[line - 1]) == text
    out = tmp_path / "prompts"
    assert main(["eval", "geneval-prompts", "--out", str(out)]) == 0
    assert "wrote 553 prompts" in capsys.readouterr().out
    lines = (out / "evaluation_metadata.jsonl").read_text().splitlines()
    assert [lines[n - 1] for n in KNOWN_LINES] == list(KNOWN_LINES.values())
    assert (out / "generation_prompts.txt").read_text().splitlines()[353] == "a photo of a dog right of a teddy bear"
    assert ge.read_metadata(str(out)) == meta  # the folder or the file
    assert main(["eval", "geneval-prompts", "--out", str(out)]) == 2  # exists: refused, nothing touched
    assert (out / "evaluation_metadata.jsonl").read_text().splitlines() == lines


def det(x0, y0, x1, y1, score=0.95):
    return Detection((x0, y0, x1, y1), score)


def test_thresholds_max_objects_and_overlap():
    found = {
        "dog": [det(0, 0, 9, 9, 0.5), det(20, 0, 29, 9, 0.95), det(1, 0, 10, 9, 0.3)],
        "cat": [det(0, 0, 5, 5, 0.2)],
    }
    kept = ge.keep_detections(found, "single_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5] and "cat" not in kept  # > 0.3, highest first
    assert [d.score for d in ge.keep_detections(found, "counting")["dog"]] == [0.95]  # counting: > 0.9
    many = {"cup": [det(i, 0, i + 5, 5, 0.5 + i / 100) for i in range(20)]}
    assert len(ge.keep_detections(many, "two_object")["cup"]) == 16
    # the default max_overlap 1.0 keeps overlapping boxes; 0.5 drops the one at IoU 9 * 10 / (2 * 100 - 90) = 0.82
    assert len(ge.keep_detections(found, "colors", Rules(max_overlap=0.5))["dog"]) == 2
    assert ge.box_iou((0, 0, 9, 9), (1, 0, 10, 9)) == pytest.approx(90 / 110)


def test_counting_is_exact():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    for n, ok in ((2, False), (3, True), (4, False)):
        objs = {"cup": [det(10 * i, 0, 10 * i + 5, 5) for i in range(n)]}
        correct, reason = ge.judge(meta, objs, colors_of=None)
        assert correct is ok, reason


def test_position_rule_and_its_margin():
    a, b = (0, 0, 10, 10), (40, 0, 50, 10)
    assert ge.relative_position(a, b) == {"left of"} and ge.relative_position(b, a) == {"right of"}
    assert ge.relative_position((0, 40, 10, 50), (0, 0, 10, 10)) == {"below"}
    assert ge.relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}  # diagonal: both
    # centres 3 px apart, boxes 20 px wide: the margin 0.1 * (20 + 20) = 4 px swallows the offset
    assert ge.relative_position((0, 0, 20, 20), (3, 0, 23, 20)) == set()
    assert ge.relative_position((0, 0, 20, 20), (3, 0, 23, 20), margin=0.0) == {"left of"}
    # dy / |offset| must pass 0.5: 30 px right and 20 px down is "right of" only
    assert ge.relative_position((30, 20, 40, 30), (0, 0, 10, 10)) == {"right of"}
    meta = json.loads(KNOWN_LINES[354])  # a dog right of a teddy bear
    bear, dog_right, dog_left = det(0, 0, 10, 10), det(40, 0, 50, 10), det(-40, 0, -30, 10)
    assert ge.judge(meta, {"teddy bear": [bear], "dog": [dog_right]}, None)[0] is True
    assert ge.judge(meta, {"teddy bear": [bear], "dog": [dog_left]}, None)[0] is False
    ok, reason = ge.judge(meta, {"dog": [dog_right]}, None)
    assert not ok and "no target for dog" in reason
    # every kept dog is checked against every kept bear of the target
    two_bears = {"teddy bear": [bear, det(100, 0, 110, 10)], "dog": [dog_right]}
    assert ge.judge(meta, two_bears, None)[0] is True  # the target group holds only the first `count` (1) bear


def test_colour_attribution():
    meta = json.loads(KNOWN_LINES[553])  # a blue pizza and a yellow baseball glove
    objs = {"pizza": [det(0, 0, 5, 5)], "baseball glove": [det(9, 9, 20, 20)]}
    calls = []

    def colors(table):
        def f(name, dets):
            calls.append((name, len(dets)))
            return [table[name]] * len(dets)

        return f

    assert ge.judge(meta, objs, colors({"pizza": "blue", "baseball glove": "yellow"}))[0] is True
    assert calls == [("pizza", 1), ("baseball glove", 1)]
    ok, reason = ge.judge(meta, objs, colors({"pizza": "yellow", "baseball glove": "blue"}))
    assert not ok and "expected blue pizza" in reason and "expected yellow baseball glove" in reason
    assert ge.judge(meta, {"pizza": objs["pizza"]}, colors({"pizza": "blue"}))[0] is False  # a glove is missing


def test_summary_is_the_mean_over_tags():
    rows = [{"tag": "colors", "correct": c, "prompt": p} for c, p in ((1, "a"), (0, "a"), (0, "b"), (0, "b"))]
    rows += [{"tag": "counting", "correct": 1, "prompt": "c"}]
    s = ge.summarize(rows)
    assert s["tags"]["colors"]["score"] == 0.25 and s["tags"]["counting"]["score"] == 1.0
    assert s["overall"] == pytest.approx((0.25 + 1.0) / 2) and s["correct_images"] == pytest.approx(2 / 5)
    assert s["correct_prompts"] == pytest.approx(2 / 3)


def test_instances_follow_mmdet_post_processing():
    from koala.eval.geneval_models import instances

    cls = torch.full((3, 6), -10.0)
    cls[0, 4], cls[1, 5], cls[2, 1] = 10.0, 10.0, 3.0  # query 1 is "no object" (the last class)
    masks = torch.full((3, 8, 8), -5.0)
    masks[0, 2:5, 1:7] = 4.0
    masks[2, 0:2, 0:2] = 2.0
    scores, labels, boxes, binary = instances(cls, masks, (8, 8), max_per_image=2)
    order = scores.argsort(descending=True)
    assert labels[order].tolist() == [4, 1]
    assert boxes[order[0]].tolist() == [1, 2, 7, 5] and boxes[order[1]].tolist() == [0, 0, 2, 2]
    p = cls.softmax(-1)
    expected = p[0, 4] * torch.sigmoid(torch.tensor(4.0))  # class probability x mean mask probability inside
    assert scores[order[0]].item() == pytest.approx(expected.item(), rel=1e-5)
    assert binary[order[0]].sum().item() == 18


# ------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    d = str(tmp_path_factory.mktemp("m2f") / "tiny-mask2former")
    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=swin,
        num_labels=80,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=10,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_attention_heads=2,
        use_pretrained_backbone=False,
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(d)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(d)
    return d


def _layout(root, metas, n=2, size=(72, 48)):
    rng = np.random.default_rng(0)
    for i, m in enumerate(metas):
        sub = root / f"{i:05d}"
        (sub / "samples").mkdir(parents=True)
        (sub / "metadata.jsonl").write_text(json.dumps(m))
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                sub / "samples" / f"{k:05d}.png"
            )
    return root


def test_whole_scorer_with_tiny_models_resumes(detector_dir, clip_dir, tmp_path, monkeypatch, capsys):
    from koala.eval import geneval_models as gm

    metas = [json.loads(KNOWN_LINES[n]) for n in (1, 254, 353, 354)]
    folder = _layout(tmp_path / "images", metas)
    bench = gm.GenEval(detector_dir, clip_dir, rules=Rules(threshold=0.0, counting_threshold=0.0))
    res = gm.score_folder(str(folder), bench, images_per_prompt=2, progress=False)
    rows = res["per_image"]
    assert len(rows) == 8 and res["n_prompts"] == 4
    for r, m in zip(rows, [m for m in metas for _ in range(2)]):
        kept = r["details"]
        missing = [q["class"] for q in m["include"] if len(kept.get(q["class"], [])) < q["count"]]
        if missing:  # what the detector kept decides the counts, as the rules say
            assert not r["correct"] and f"expected {missing[0]}>=" in r["reason"]
        if m["tag"] == "counting":
            n = len(kept.get("parking meter", []))
            assert r["correct"] == (n == 2)
        for boxes in kept.values():
            assert all(0 <= b[0] <= b[2] <= 72 and 0 <= b[1] <= b[3] <= 48 for b in boxes)
    assert res["overall"] == pytest.approx(np.mean([v["score"] for v in res["tags"].values()]))
    assert any(kept for kept in (r["details"] for r in rows))  # threshold 0: the detector's instances are judged

    # resumed: nothing is judged again, and a lost line is judged once more with the same answer
    judged = []
    real = gm.GenEval.evaluate
    monkeypatch.setattr(gm.GenEval, "evaluate", lambda self, im, m: judged.append(1) or real(self, im, m))
    again = gm.score_folder(str(folder), bench, images_per_prompt=2, progress=False)
    assert judged == [] and again["per_image"] == rows
    path = folder / "koala_geneval.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    assert gm.score_folder(str(folder), bench, images_per_prompt=2, progress=False)["per_image"] == rows
    assert judged == [1]

    # the CLI (default thresholds) writes the table and the JSON
    out = tmp_path / "geneval.json"
    args = ["eval", "geneval", str(folder), "--detector", detector_dir, "--clip", clip_dir, "--no-progress"]
    assert main(args + ["--images-per-prompt", "2", "--json", str(out), "--results", str(tmp_path / "r.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "overall (mean over tags)" in table and "position" in table
    assert json.loads(out.read_text())["n_images"] == 8


def test_colour_crops_are_masked_on_grey(clip_dir, monkeypatch):
    from koala.eval.geneval_models import ColorClassifier

    clf = ColorClassifier(clip_dir)
    seen = []
    real = clf.processor

    def capture(images=None, **kw):
        seen.extend(images)
        return real(images=images, **kw)

    monkeypatch.setattr(clf, "processor", capture)
    monkeypatch.setattr(clf, "_classifier", lambda name: torch.nn.functional.normalize(torch.randn(10, 16), dim=-1))
    image = Image.new("RGB", (20, 10), (250, 0, 0))
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:8] = True
    (color,) = clf.colors(image, "apple", [Detection((3, 2, 9, 6), 0.9, mask)])
    assert color in ge.COLORS
    crop = np.asarray(seen[0])
    assert crop.shape == (4, 6, 3)  # cropped to the box
    assert (crop[:, 1:5] == (250, 0, 0)).all() and (crop[:, 0] == (153, 153, 153)).all()  # outside the mask: #999


def test_bad_input_is_named(detector_dir, clip_dir, tmp_path, capsys):
    from koala.eval import geneval_models as gm

    with pytest.raises(KoalaError, match=r"config.json field model_type is 'clip', not 'mask2former'"):
        gm.Mask2FormerDetector(clip_dir)
    folder = _layout(tmp_path / "images", [json.loads(KNOWN_LINES[1])] * 2)
    os.remove(folder / "00001" / "samples" / "00001.png")
    with pytest.raises(KoalaError, match=r"00001/samples has 1 image\(s\)"):
        ge.read_layout(str(folder), images_per_prompt=2)
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(KNOWN_LINES[1] + "\n" + KNOWN_LINES[81][:-5] + "\n")
    with pytest.raises(KoalaError, match=rf"{meta} line 2: not valid JSON"):
        ge.read_metadata(str(meta))
    meta.write_text(KNOWN_LINES[1].replace('"bench"', '"spaceship"') + "\n")
    with pytest.raises(KoalaError, match=rf"{meta} line 1: include\[0\]: class 'spaceship' is not a GenEval class"):
        ge.read_metadata(str(meta))
    args = ["eval", "geneval", str(folder), "--detector", clip_dir, "--clip", clip_dir]
    assert main(args) == 2
    meta.write_text(KNOWN_LINES[1] + "\n")
    run = ["eval", "run", "--model", f"m={clip_dir}", "--benchmark", f"geneval={meta}", "--out", str(tmp_path / "o")]
    assert main(run + ["--geneval-clip", clip_dir]) == 2
    assert "(option --geneval-detector)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any generation


def test_eval_run_geneval_benchmark(tiny_pipe_dir, detector_dir, clip_dir, tmp_path):
    from koala.eval import run as ev

    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(KNOWN_LINES[n] for n in (1, 353)) + "\n")
    name, prompts, scorers = ev.geneval_benchmark(str(meta), detector_dir, clip_dir, limit=None)
    assert [p.text for p in prompts] == ["a photo of a bench", "a photo of a red cake"]
    settings = ev.EvalSettings(steps=2, seeds=(0, 1), width=64, height=64)
    res = ev.run_eval(
        [ev.EvalModel("teacher", model=tiny_pipe_dir)], [], [], str(tmp_path / "run"), settings,
        progress=False, log=lambda *_: None, benchmarks=[(name, prompts, scorers)],
    )  # fmt: skip
    agg = res["models"][0]["scores"]["geneval"]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "scores" / "teacher" / "geneval.jsonl")]
    assert len(rows) == 4 and {r["tag"] for r in rows} == {"single_object", "colors"}
    by_tag = {t: np.mean([r["correct"] for r in rows if r["tag"] == t]) for t in ("single_object", "colors")}
    assert agg == {"overall": pytest.approx(np.mean(list(by_tag.values()))), **by_tag}
    assert "geneval overall" in (tmp_path / "run" / "results.md").read_text()


# ------------------------------------------------------------------------------------------- shapes world
def test_shapes_world_reports_geneval_tags():
    from koala.lab.geneval_tags import geneval_tags
    from koala.lab.score import parse_prompt, score_pairs
    from koala.lab.shapes import ShapeObject, render

    red_c, blue_c = (
        ShapeObject("red", "circle", "large", 16, 32, 10),
        ShapeObject("blue", "circle", "large", 48, 32, 10),
    )
    green_s = ShapeObject("green", "square", "large", 48, 32, 10)
    images = [render([red_c]), render([red_c, blue_c]), render([red_c, green_s]), render([red_c])]
    prompts = [
        "a red circle",
        "a red circle to the left of a blue circle",
        "a blue circle to the left of a green square",  # the circle is red: colour attribution fails
        "a red circle and a blue circle",  # only one circle: counting and two_object fail
    ]
    agg, per = score_pairs(images, prompts)
    tags = [p["geneval"] for p in per]
    assert tags[0] == {**dict.fromkeys(ge.TAGS), "single_object": 1.0, "colors": 1.0}
    assert tags[1]["counting"] == 1.0 and tags[1]["position"] == 1.0 and tags[1]["color_attr"] == 1.0
    assert tags[2]["two_object"] == 1.0 and tags[2]["color_attr"] == 0.0 and tags[2]["counting"] is None
    assert tags[2]["position"] == 0.0  # no blue circle to relate
    assert tags[3]["counting"] == 0.0 and tags[3]["two_object"] == 0.0
    g = agg["geneval"]
    assert g["counting"] == 0.5 and g["n_counting"] == 2 and g["single_object"] == 1.0 and g["n_colors"] == 1
    assert g["overall"] == pytest.approx(np.mean([g[t] for t in ge.TAGS if g[t] is not None]))
    # the position rule is GenEval's: "right of" fails where the scene has the circle on the left
    right = geneval_tags(parse_prompt("a red circle to the right of a blue circle"), per[1]["detected"])
    assert right["position"] == 0.0


def test_ground_truth_shapes_pass_every_geneval_tag():
    """Rendered scenes are what their captions say: every GenEval tag that applies holds (GenEval's position rule
    agrees with the relations the shapes world states), and noise fails."""
    from koala.lab.score import score_pairs
    from koala.lab.shapes import generate_scenes, render

    scenes = generate_scenes(24, "val", 0, 64)
    agg, _ = score_pairs([render(s.objects, 64) for s in scenes], [s.text for s in scenes])
    g = agg["geneval"]
    assert all(g[f"n_{t}"] > 0 for t in ge.TAGS)  # 24 scenes hold every kind of prompt
    assert all(g[t] == 1.0 for t in ge.TAGS) and g["overall"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (len(scenes), 64, 64, 3), dtype=np.uint8)
    assert score_pairs(list(noise), [s.text for s in scenes])[0]["geneval"]["overall"] < 0.5
