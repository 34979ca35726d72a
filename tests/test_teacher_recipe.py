"""The teacher recipe (issue 34): relation-balanced data, word-order negatives, bit-exact resume, file checks."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.slow  # four tiny training runs with checkpoints: ~35 s on 2 shared cores
def test_teacher_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path):
    # the image-side order loss draws from the recipe's generator; a changed noise schedule must survive the resume
    rel = dict(relation_weight=0.5, relation_t_min=0, timestep_spacing="trailing", prediction_type="v_prediction")
    rel.update(zero_snr=True)
    _train(tmp_path / "a", **rel)
    _train(tmp_path / "b", stop_after=2, **rel)
    state = json.load(open(tmp_path / "b" / "train_state" / "state.json"))
    assert state["step"] == 2
    with pytest.raises(KoalaError, match="--resume") as err:  # a stopped run is not silently restarted
        _train(tmp_path / "b")
    assert err.value.option == "resume"
    _train(tmp_path / "b", resume=True, steps=999, lr=5.0)  # the saved recipe wins over these
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("train_state") for k in a)
    sched = json.load(open(tmp_path / "b" / "scheduler" / "scheduler_config.json"))
    assert (sched["timestep_spacing"], sched["prediction_type"], sched["rescale_betas_zero_snr"]) == (
        "trailing",
        "v_prediction",
        True,
    )
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

    # --init-from: a fine-tune starts from every weight of the given pipeline (lr 0: nothing moves)
    _train(tmp_path / "c", init_from=str(tmp_path / "a"), lr=0.0, steps=1, save_every=0)
    c = _tensors(tmp_path / "c")
    for k in [k for k in a if not k.startswith("train_state")]:
        assert torch.equal(a[k], c[k]), k
    with pytest.raises(KoalaError, match="--init-from brings its own VAE"):
        _train(tmp_path / "d", init_from=str(tmp_path / "a"), vae_from=str(tmp_path / "a"))
    with pytest.raises(KoalaError, match="needs v-prediction"):
        _train(tmp_path / "d", zero_snr=True)
    with pytest.raises(KoalaError, match="init-from pipeline"):
        _train(tmp_path / "d", init_from=str(tmp_path / "nowhere"))


class _TextOnly:
    """A stand-in family whose 'denoiser' predicts a constant per caption: the caption's conditioning value."""

    def encode_prompts(self, captions, tokenizers, encoders):
        return {"prompt_embeds": torch.tensor([[[float(len(c.split(" above ")[0]))]] for c in captions])}

    def forward(self, denoiser, xt, t, cond):
        return denoiser(cond["prompt_embeds"].reshape(-1, 1, 1, 1).expand_as(xt))

    def prediction(self, out, channels):
        return out


def test_image_order_loss_is_the_relative_margin_hinge():
    from koala.lab.order_loss import image_order_loss

    caps = ["a red circle above a blue square", "a red circle", "a blue square above a red circle"]
    noise = torch.zeros(3, 1, 2, 2)
    batch = {"xt": torch.zeros(3, 1, 2, 2), "t": torch.tensor([900, 900, 100]), "target": noise, "micro": {}}
    scale = torch.nn.Parameter(torch.ones(()))

    def denoiser(x):
        return scale * x

    fam = _TextOnly()
    err = F.mse_loss(
        fam.forward(denoiser, batch["xt"], batch["t"], fam.encode_prompts(caps, [], [])), noise, reduction="none"
    ).mean(dim=(1, 2, 3))
    g = torch.Generator().manual_seed(0)
    # sample 0 is the only eligible one with a negative; either negative of it has a longer first phrase or the same
    loss = image_order_loss(fam, denoiser, [], [], batch, err, caps, [True, True, False], 0.1, g)
    neg = [n for i, n in hard_negatives(caps) if i == 0]
    e_pos = float(len(caps[0].split(" above ")[0])) ** 2
    expected = []
    for n in neg:
        e_neg = float(len(n.split(" above ")[0])) ** 2
        expected.append(max(0.0, 0.1 - (e_neg - e_pos) / (e_neg + e_pos)))
    assert any(abs(float(loss.detach()) - e) < 1e-6 for e in expected)
    loss.backward()
    assert scale.grad is not None
    # nothing eligible: exactly zero
    assert float(image_order_loss(fam, denoiser, [], [], batch, err, caps, [False, True, False], 0.1, g)) == 0.0


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
