"""Evaluation and captioning past one process, with explicit --rank / --world-size (no launcher): each rank's part
plus the merge give exactly what one process writes (the same images, scores and captions file, byte for byte), a
rank killed mid-share resumes with nothing redone, and a merge before every rank has finished is refused, naming
what is missing. tests/test_parts_launch.py runs the same under accelerate launch."""

import json
import os

import pytest

from koala.cli import main
from koala.compress import compress
from koala.data.syncap import caption_source, merge_captions
from koala.errors import KoalaError
from koala.eval import run as ev
from koala.testing.images import write_noise_pngs
from koala.utils.parts import part_path, part_paths, share

PROMPTS = ["a red circle", "a blue square", "a red circle left of a blue square"]


def test_part_names_and_shares(tmp_path):
    out = str(tmp_path / "caps.jsonl")
    assert part_path(out, 0, 1) == out and part_path(out, 1, 3) == str(tmp_path / "caps.rank1-of-3.jsonl")
    for p in (part_path(out, 1, 2), part_path(out, 0, 2)):
        open(p, "w").close()
    assert part_paths(out) == [part_path(out, 0, 2), part_path(out, 1, 2)]
    open(out, "w").close()
    assert part_paths(out)[0] == out and len(part_paths(out)) == 3
    items = list(range(7))
    assert sorted(sum((share(items, r, 3) for r in range(3)), [])) == items
    with pytest.raises(KoalaError, match="rank"):
        caption_source({"path": str(tmp_path)}, "x", out, rank=2, world_size=2)


@pytest.fixture(scope="module")
def models(tiny_pipe_dir, tmp_path_factory):
    student = compress(tiny_pipe_dir, "koala-700m", str(tmp_path_factory.mktemp("parts") / "student")).out_dir
    return [ev.EvalModel("teacher", model=tiny_pipe_dir), ev.EvalModel("koala", model=student)]


def _kill_generation_at(monkeypatch, n):
    import koala.inference as inf

    real, calls = inf.generate, {"n": 0, "kill_at": n}

    def gen(*a, **kw):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(inf, "generate", gen)
    return calls


def _same_outputs(one: str, split: str) -> None:
    """The same images (PNG bytes, metadata included) and the same results but for what timing measures."""
    for name in ("teacher", "koala"):
        a, b = os.path.join(one, "images", name), os.path.join(split, "images", name)
        pngs = sorted(f for f in os.listdir(a) if f.endswith(".png"))
        assert pngs == sorted(f for f in os.listdir(b) if f.endswith(".png")) and len(pngs) == 6
        for f in pngs:
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (one, split))
    timing = ("latency_s", "peak_gib", "generated_now")  # measured by the runs that made the images
    strip = lambda r: {**r, "models": [{k: v for k, v in m.items() if k not in timing} for m in r["models"]]}  # noqa: E731
    assert strip(ra) == strip(rb)
    assert all(m["latency_s"] > 0 and m["peak_gib"] > 0 for m in rb["models"])


def test_eval_ranks_resume_and_merge_to_the_one_process_result(models, tmp_path, monkeypatch):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    prompts = ev.read_prompt_set(str(prompts_file))
    s = ev.EvalSettings(seeds=(0, 1), steps=2)
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    ev.run_eval(models, prompts, ev.make_scorers(["shapes"]), one, s, progress=False)

    run = lambda **kw: ev.run_eval(models, prompts, ev.make_scorers(["shapes"]), split, s, progress=False, **kw)  # noqa: E731
    assert run(rank=0, world_size=2) == {"part": 0, "world_size": 2}
    calls = _kill_generation_at(monkeypatch, 3)  # rank 1 is killed at its teacher's 3rd image
    with pytest.raises(KeyboardInterrupt):
        run(rank=1, world_size=2)
    teacher = os.path.join(split, "images", "teacher")
    assert [len(open(os.path.join(teacher, f"index.rank{r}-of-2.jsonl")).readlines()) for r in (0, 1)] == [3, 2]
    with pytest.raises(KoalaError, match="1 of 6 images of model teacher are missing.*prompt 2 .*seed 1"):
        run(merge=True)  # the merge never generates
    assert not os.path.exists(os.path.join(split, "results.json"))
    calls.update(n=0, kill_at=None)
    run(rank=1, world_size=2)
    assert calls["n"] == 1 + 3  # only what the killed rank had not made: 1 teacher image, 3 student images
    res = run(merge=True)
    assert calls["n"] == 4 and not os.listdir(os.path.join(split, "parts"))
    # made in the runs that wrote the parts: the killed run's 2 teacher images are not among them
    assert [(m["n_images"], m["generated_now"]) for m in res["models"]] == [(6, 3 + 1), (6, 3 + 3)]
    assert sorted(os.listdir(os.path.join(split, "scores", "koala"))) == [
        "shapes.rank0-of-2.jsonl",
        "shapes.rank1-of-2.jsonl",
    ]  # every image was scored by the rank that made it; the merge scored none
    _same_outputs(one, split)
    # one process over the parts resumes them: nothing to make, the same table
    again = ev.run_eval(models, prompts, ev.make_scorers(["shapes"]), split, s, progress=False)
    assert calls["n"] == 4
    assert [m["scores"] for m in again["models"]] == [m["scores"] for m in res["models"]]


@pytest.fixture()
def folder(tmp_path):
    return write_noise_pngs(str(tmp_path / "imgs"), 7)


def test_syncap_ranks_resume_and_merge_to_the_one_process_file(tiny_vlm, folder, tmp_path, monkeypatch, capsys):
    import koala.data.syncap as sy

    kw = dict(batch_size=1, max_new_tokens=5, progress=False)
    one, out = str(tmp_path / "one.jsonl"), str(tmp_path / "caps.jsonl")
    caption_source({"path": folder}, tiny_vlm, one, **kw)
    assert len(open(one).readlines()) == 7  # 8 samples, the broken one skipped

    real = sy.load_vlm

    def killed_after(n):
        def load(*a, **k):
            model, proc = real(*a, **k)
            gen, calls = model.generate, {"n": 0}

            def generate(*ga, **gk):
                calls["n"] += 1
                if calls["n"] > n:
                    raise KeyboardInterrupt
                return gen(*ga, **gk)

            model.generate = generate
            return model, proc

        return load

    r0 = caption_source({"path": folder}, tiny_vlm, out, rank=0, world_size=2, **kw)
    assert (r0["captioned"], r0["skipped"]) == (4, 0) and "merged" not in r0  # samples 0, 2, 4, 6
    monkeypatch.setattr(sy, "load_vlm", killed_after(2))
    with pytest.raises(KeyboardInterrupt):
        caption_source({"path": folder}, tiny_vlm, out, rank=1, world_size=2, **kw)
    with pytest.raises(KoalaError, match="2 sample.*the first: 5.png"):  # 1 and 3 captioned, 5 killed; 7 not reached
        merge_captions({"path": folder}, out)
    monkeypatch.setattr(sy, "load_vlm", real)
    r1 = caption_source({"path": folder}, tiny_vlm, out, rank=1, world_size=2, **kw)
    assert (r1["already"], r1["captioned"], r1["skipped"]) == (2, 1, 1)
    assert main(["data", "syncap", folder, "--out", out, "--merge"]) == 0
    assert "merged 2 part(s)" in capsys.readouterr().out
    assert open(out, "rb").read() == open(one, "rb").read()
    assert part_paths(out) == [out]
    # parts left by a second split, finished by one process: it resumes them and merges
    out2 = str(tmp_path / "caps2.jsonl")
    caption_source({"path": folder}, tiny_vlm, out2, rank=2, world_size=3, **kw)
    res = caption_source({"path": folder}, tiny_vlm, out2, **kw)
    assert (res["already"], res["captioned"]) == (2, 5) and res["merged"]["parts"] == 1
    assert open(out2, "rb").read() == open(one, "rb").read()
