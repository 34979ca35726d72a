"""The teacher recipe (issue 34): relation-balanced data, word-order negatives, bit-exact resume, file checks."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from koala.errors import KoalaError
from koala.lab.order_loss import binding_swap, hard_negatives, relation_swap
from koala.lab.shapes import RELATIONS, generate_scenes


def test_balanced_scenes_state_every_relation_equally_often():
    scenes = generate_scenes(400, "train", 0, 32, balanced=True)
    rels = Counter(r["relation"] for s in scenes for r in s.relations)
    assert set(rels) == {r.replace("to the ", "") for r in RELATIONS}
    assert max(rels.values()) - min(rels.values()) < 0.25 * max(rels.values())
    for s in scenes:  # the caption's relations hold in the layout, and every multi-object scene states one
        assert len(s.relations) == len(s.objects) - 1
        for r in s.relations:
            a, b = s.objects[r["a"]], s.objects[r["b"]]
            dx, dy = a.cx - b.cx, a.cy - b.cy
            ok = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[r["relation"]]
            assert ok and r["relation"] in s.text
    # the default data set is unchanged (pinned numbers depend on it)
    assert [s.text for s in generate_scenes(5, "train", 0, 32)] != [s.text for s in scenes[:5]]


def test_hard_negatives_have_the_same_words_in_another_order():
    text = "a small red square to the left of a blue triangle, and a green circle above the blue triangle"
    assert relation_swap(text) == (
        "a blue triangle to the left of a small red square, and a green circle above the blue triangle"
    )
    assert binding_swap(text) == (
        "a small blue square to the left of a red triangle, and a green circle above the red triangle"
    )
    assert relation_swap("a red circle and a blue square") is None
    assert hard_negatives(["a red circle", "a red circle above a blue square"]) == [
        (1, "a blue square above a red circle"),
        (1, "a blue circle above a red square"),
    ]
    for _, neg in hard_negatives(["a red circle above a blue square"]):
        assert sorted(neg.split()) == sorted("a red circle above a blue square".split())


def _train(out, **kw):
    from koala.lab.train_teacher import TeacherConfig, train_teacher

    cfg = dict(out=str(out), num_train=8, num_val=1, vae_steps=1, steps=3, batch_size=4, save_every=2, threads=1)
    return train_teacher(TeacherConfig(**{**cfg, **kw}), log=lambda *_: None)


def _tensors(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(root, f), folder)
                out.update({f"{rel}:{k}": v for k, v in load_file(os.path.join(root, f)).items()})
    return out


@pytest.mark.slow  # three tiny training runs with checkpoints: ~30 s on 2 shared cores
def test_teacher_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b", stop_after=2)
    state = json.load(open(tmp_path / "b" / "train_state" / "state.json"))
    assert state["step"] == 2
    with pytest.raises(KoalaError, match="--resume") as err:  # a stopped run is not silently restarted
        _train(tmp_path / "b")
    assert err.value.option == "resume"
    _train(tmp_path / "b", resume=True, steps=999, lr=5.0)  # the saved recipe wins over these
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("train_state") for k in a)
    assert any("opt.state" in k for k in a) and any("ema0.shadow_params" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = [json.load(open(tmp_path / d / "koala_teacher.json"))["history"] for d in "ab"]
    assert [r["step"] for r in hist[1]] == [2, 3]
    assert [{k: r[k] for k in ("color", "binding", "spatial")} for r in hist[0]] == [
        {k: r[k] for k in ("color", "binding", "spatial")} for r in hist[1]
    ]
    # the packaged form drops the state; a resume without one is refused, naming the option
    with pytest.raises(KoalaError, match="no train_state"):
        shutil.rmtree(tmp_path / "b" / "train_state")
        _train(tmp_path / "b", resume=True)


def test_packaged_teacher_files_are_checked_before_loading(tmp_path, monkeypatch):
    """The packaged teacher loads, and a copy with a truncated U-Net file is refused naming the file, before any
    library reads it (as for every model koala reads)."""
    import koala.lab.models as models
    from koala.families import get_family
    from koala.utils.weights import safetensors_header

    src = models.shapes_teacher_dir()
    get_family("sdxl").check_pipeline_dir(src)
    header = safetensors_header(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    pipe = models.load_shapes_teacher()
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder_2.config.hidden_size > 0

    bad = tmp_path / "teacher"
    shutil.copytree(src, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    monkeypatch.setattr(models, "shapes_teacher_dir", lambda: str(bad))
    with pytest.raises(KoalaError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        models.load_shapes_teacher()
    shutil.rmtree(bad / "text_encoder_2")
    with pytest.raises(KoalaError, match="has no text_encoder_2/"):
        models.load_shapes_teacher()
