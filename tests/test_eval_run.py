"""koala eval run: two tiny pipelines x a prompt set x seeds, scored by the shapes scorer and a tiny random CLIP; the
table's numbers equal an independent scoring of the saved images; a killed run resumes with nothing recomputed."""

import json
import os

import numpy as np
import pytest

from koala.cli import main
from koala.compress import compress
from koala.errors import KoalaError
from koala.eval import run as ev

PROMPTS = ["a red circle", "a blue square", "a red circle left of a blue square"]


@pytest.fixture(scope="module")
def models(tiny_pipe_dir, tmp_path_factory):
    student = compress(tiny_pipe_dir, "koala-700m", str(tmp_path_factory.mktemp("ev") / "student")).out_dir
    return [ev.EvalModel("teacher", model=tiny_pipe_dir), ev.EvalModel("koala", model=student)]


def _counting(monkeypatch):
    calls = {"generate": 0, "shapes": 0, "clip": 0}
    import koala.inference as inf

    real = inf.generate

    def gen(*a, **kw):
        calls["generate"] += 1
        if calls.get("kill_at") and calls["generate"] == calls["kill_at"]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(inf, "generate", gen)
    for cls, name in ((ev.ShapesScorer, "shapes"), (ev.ClipScorer, "clip")):
        orig = cls.per_image

        def counted(self, paths, prompts, _orig=orig, _name=name):
            calls[_name] += len(paths)
            return _orig(self, paths, prompts)

        monkeypatch.setattr(cls, "per_image", counted)
    return calls


def test_run_scores_resume_and_table(models, clip_dir, tmp_path, monkeypatch):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n# a comment\n")
    prompts = ev.read_prompt_set(str(prompts_file))
    settings = ev.EvalSettings(seeds=(0, 1), steps=2)
    out = str(tmp_path / "out")
    calls = _counting(monkeypatch)
    calls["kill_at"] = 4  # killed while generating the teacher's 4th image
    with pytest.raises(KeyboardInterrupt):
        ev.run_eval(models, prompts, ev.make_scorers(["shapes", "clip"], clip_dir), out, settings, progress=False)
    assert len(open(os.path.join(out, "images", "teacher", "index.jsonl")).readlines()) == 3
    calls.update(generate=0, kill_at=None)
    res = ev.run_eval(models, prompts, ev.make_scorers(["shapes", "clip"], clip_dir), out, settings, progress=False)
    assert calls["generate"] == 2 * 3 * 2 - 3  # only what the killed run had not made
    assert calls["shapes"] == calls["clip"] == 12
    rows = {m["name"]: m for m in res["models"]}
    assert set(rows) == {"teacher", "koala"} and all(r["n_images"] == 6 for r in rows.values())
    assert rows["koala"]["params"] < rows["teacher"]["params"]
    assert rows["koala"]["latency_s"] > 0 and rows["teacher"]["peak_gib"] > 0

    # the numbers equal an independent scoring of the saved images (their PNGs carry the prompts)
    from PIL import Image

    from koala.eval import clip_scores, load_clip
    from koala.lab.score import score_folder

    for name, row in rows.items():
        folder = os.path.join(out, "images", name)
        agg, _ = score_folder(folder)
        for k in ("color", "shape", "binding", "spatial"):
            assert row["scores"]["shapes"][k] == pytest.approx(agg[k])
        # GenEval's tags, as koala eval shapes reports them for the same images
        tags = {k: v for k, v in agg["geneval"].items() if not k.startswith("n_") and v is not None}
        assert tags and {f"geneval_{k}": v for k, v in tags.items()} == pytest.approx(
            {k: v for k, v in row["scores"]["shapes"].items() if k.startswith("geneval_")}
        )
        files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        imgs = [Image.open(os.path.join(folder, f)).convert("RGB") for f in files]
        texts = [Image.open(os.path.join(folder, f)).info["prompt"] for f in files]
        model, proc = load_clip(clip_dir)
        assert row["scores"]["clip"]["average"] == pytest.approx(float(np.mean(clip_scores(imgs, texts, model, proc))))

    # a third run recomputes nothing and gives the same table
    calls.update(generate=0, shapes=0, clip=0)
    again = ev.run_eval(models, prompts, ev.make_scorers(["shapes", "clip"], clip_dir), out, settings, progress=False)
    assert calls == {"generate": 0, "shapes": 0, "clip": 0, "kill_at": None}
    drop = lambda rows: [{k: v for k, v in r.items() if k != "generated_now"} for r in rows]  # noqa: E731
    assert drop(again["models"]) == drop(res["models"])  # params, latency, memory kept from the run that measured
    table = open(os.path.join(out, "results.md")).read()
    assert "| koala |" in table and "shapes binding" in table and "clip average" in table
    assert os.path.isfile(os.path.join(out, "results.png"))
    assert json.load(open(os.path.join(out, "results.json")))["schema"] == ev.SCHEMA


def test_styles_cli_and_bad_input(models, clip_dir, tmp_path, capsys):
    styles = tmp_path / "hps"
    styles.mkdir()
    (styles / "anime.txt").write_text("a red circle\na blue square\n")
    (styles / "photo.txt").write_text("a photo of a red square\n")
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "run",
            "--model",
            f"koala={models[1].model}",
            "--prompts",
            str(styles),
            "--scorers",
            "clip",
            "--clip",
            clip_dir,
            "--steps",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    row = json.load(open(out / "results.json"))["models"][0]
    clip = row["scores"]["clip"]
    assert set(clip) == {"anime", "photo", "average"}
    assert clip["average"] == pytest.approx((clip["anime"] + clip["photo"]) / 2)  # HPSv2's mean over styles
    assert "koala" in capsys.readouterr().out

    with pytest.raises(KoalaError, match="no such file"):
        ev.read_prompt_set(str(tmp_path / "missing.txt"))
    with pytest.raises(KoalaError, match="unknown scorer"):
        ev.make_scorers(["hpsv3"])
    with pytest.raises(KoalaError, match="CLIP checkpoint"):
        ev.make_scorers(["clip"])
    assert main(["eval", "run", "--unet", "s=x", "--prompts", str(styles), "--out", str(out)]) == 2
    assert "--base" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "run",
                "--model",
                f"a={models[0].model}",
                "--model",
                f"a={models[1].model}",
                "--prompts",
                str(styles),
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_pickscore_scorer_is_the_scaled_cosine(models, clip_dir, tmp_path):
    import torch
    from PIL import Image

    from koala.eval.clip_score import clip_cosines, load_clip

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    res = ev.run_eval(
        models[:1],
        ev.read_prompt_set(str(prompts)),
        ev.make_scorers(["pickscore"], pickscore=clip_dir),
        str(tmp_path / "out"),
        ev.EvalSettings(steps=1),
        progress=False,
    )
    folder = tmp_path / "out" / "images" / "teacher"
    index = [json.loads(x) for x in open(folder / "index.jsonl")]
    model, proc = load_clip(clip_dir)
    cos = clip_cosines(
        [Image.open(folder / r["file"]).convert("RGB") for r in index], [r["prompt"] for r in index], model, proc
    )
    scale = float(torch.exp(model.logit_scale))
    assert res["models"][0]["scores"]["pickscore"]["average"] == pytest.approx(scale * float(np.mean(cos)))
    with pytest.raises(KoalaError, match="PickScore"):
        ev.make_scorers(["pickscore"])


def test_several_benchmarks_in_one_run_share_images(models, clip_dir, tmp_path, monkeypatch, capsys):
    styles = tmp_path / "hps"
    styles.mkdir()
    (styles / "anime.txt").write_text("a red circle\n")
    (styles / "photo.txt").write_text("a blue square\n")
    main_set = tmp_path / "main.txt"
    main_set.write_text("a red circle\na red square\n")
    calls = _counting(monkeypatch)
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "run",
            "--model",
            f"teacher={models[0].model}",
            "--prompts",
            str(main_set),
            "--scorers",
            "shapes",
            "--benchmark",
            f"clip={styles}",
            "--benchmark",
            f"pickscore={main_set}",
            "--clip",
            clip_dir,
            "--pickscore",
            clip_dir,
            "--steps",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(out / "results.json"))
    row = res["models"][0]
    assert set(row["scores"]) == {"shapes", "clip", "pickscore"}
    assert set(row["scores"]["clip"]) == {"anime", "photo", "average"}
    # 'a red circle' is in the main set (style 'all') and HPS-style set (style 'anime'): different keys, 4 images
    assert calls["generate"] == row["n_images"] == 4
    assert set(res["prompts"]) == {"main", "clip", "pickscore"}
    table = open(out / "results.md").read()
    assert "clip average" in table and "pickscore average" in table and "shapes binding" in table


def test_a_full_disk_stops_the_run_and_it_resumes(models, tmp_path, small_disk, monkeypatch):
    prompts = [ev.Prompt("plain", i, text) for i, text in enumerate(PROMPTS)]
    disk = small_disk(3 * 4096)  # tmpfs pages: the index file and two images
    out = os.path.join(disk, "out")
    settings = ev.EvalSettings(seeds=(0,), steps=2)
    folder = os.path.join(out, "images", "teacher")
    with pytest.raises(KoalaError, match=rf"disk full: writing image plain-00002-s0-\w+.png under {folder} failed"):
        ev.run_eval(models[:1], prompts, [], out, settings, progress=False, log=lambda *_: None)
    indexed = [r["file"] for r in ev._read_jsonl(os.path.join(folder, "index.jsonl")).values()]
    assert len(indexed) == 2 and sorted(os.listdir(folder)) == sorted(["index.jsonl", *indexed])  # no temporary
    small_disk.resize(disk, 1 << 20)
    calls = _counting(monkeypatch)
    res = ev.run_eval(models[:1], prompts, [], out, settings, progress=False, log=lambda *_: None)
    assert calls["generate"] == 1 and res["models"][0]["n_images"] == 3
