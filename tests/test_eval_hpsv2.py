"""HPSv2: a tiny random open_clip-layout checkpoint (the HPS_v2_compressed.pt format) scored through koala's
transformers conversion equals an independent forward of open_clip's CLIP written here from its definition;
open_clip's preprocessing is reproduced; bad checkpoints and tokenizers are named."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from koala.cli import main
from koala.errors import KoalaError
from koala.eval.hpsv2 import HPSv2, image_processor, score_folder

WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "anime", "painting"]
VW, TW, LAYERS, PATCH, IMG, EMBED = 128, 128, 2, 8, 32, 32  # 2 heads of 64 in each tower, as open_clip's ViTs


def _block(sd, p, w, rng):
    t = lambda *s: torch.tensor(rng.normal(0, 0.05, s), dtype=torch.float32)  # noqa: E731
    sd.update(
        {
            p + "ln_1.weight": 1 + t(w),
            p + "ln_1.bias": t(w),
            p + "ln_2.weight": 1 + t(w),
            p + "ln_2.bias": t(w),
            p + "attn.in_proj_weight": t(3 * w, w),
            p + "attn.in_proj_bias": t(3 * w),
            p + "attn.out_proj.weight": t(w, w),
            p + "attn.out_proj.bias": t(w),
            p + "mlp.c_fc.weight": t(4 * w, w),
            p + "mlp.c_fc.bias": t(4 * w),
            p + "mlp.c_proj.weight": t(w, 4 * w),
            p + "mlp.c_proj.bias": t(w),
        }
    )


def openclip_state(vocab: int, seed: int = 0) -> dict:
    """Every tensor of an open_clip ViT CLIP state dict, random."""
    rng = np.random.default_rng(seed)
    t = lambda *s: torch.tensor(rng.normal(0, 0.05, s), dtype=torch.float32)  # noqa: E731
    g = IMG // PATCH
    sd = {
        "visual.class_embedding": t(VW),
        "visual.positional_embedding": t(g * g + 1, VW),
        "visual.conv1.weight": t(VW, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + t(VW),
        "visual.ln_pre.bias": t(VW),
        "visual.ln_post.weight": 1 + t(VW),
        "visual.ln_post.bias": t(VW),
        "visual.proj": t(VW, EMBED),
        "token_embedding.weight": t(vocab, TW),
        "positional_embedding": t(77, TW),
        "ln_final.weight": 1 + t(TW),
        "ln_final.bias": t(TW),
        "text_projection": t(TW, EMBED),
        "logit_scale": torch.tensor(4.6052),
    }
    for n in range(LAYERS):
        _block(sd, f"visual.transformer.resblocks.{n}.", VW, rng)
        _block(sd, f"transformer.resblocks.{n}.", TW, rng)
    return sd


def reference_scores(sd, pixels, ids):
    """open_clip's CLIP forward (VisionTransformer + text Transformer, nn.MultiheadAttention, GELU), then HPSv2's
    score: 100 * diag(normalise(image) @ normalise(text).T)."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def blocks(x, prefix, mask=None):  # x: [L, B, W]
        w = x.shape[-1]
        for n in range(LAYERS):
            p = f"{prefix}.{n}."
            h = ln(x, p + "ln_1")
            a, _ = F.multi_head_attention_forward(
                h,
                h,
                h,
                w,
                w // 64,
                sd[p + "attn.in_proj_weight"],
                sd[p + "attn.in_proj_bias"],
                None,
                None,
                False,
                0.0,
                sd[p + "attn.out_proj.weight"],
                sd[p + "attn.out_proj.bias"],
                need_weights=False,
                attn_mask=mask,
            )
            x = x + a
            h = F.linear(
                F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                sd[p + "mlp.c_proj.weight"],
                sd[p + "mlp.c_proj.bias"],
            )
            x = x + h
        return x

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre").transpose(0, 1), "visual.transformer.resblocks").transpose(0, 1)
    img = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    L = ids.shape[1]
    mask = torch.full((L, L), float("-inf")).triu(1)
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = ln(blocks(t.transpose(0, 1), "transformer.resblocks", mask).transpose(0, 1), "ln_final")
    txt = t[torch.arange(t.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return (100 * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)).tolist()


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    from koala.testing.tokenizer import build_clip_tokenizer

    d = tmp_path_factory.mktemp("hps")
    tok = build_clip_tokenizer(str(d / "tokenizer"), WORDS)
    sd = openclip_state(len(tok))
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, str(d / "HPS_v2_tiny.pt"))
    return sd, str(d / "HPS_v2_tiny.pt"), str(d / "tokenizer"), tok


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_scores_equal_an_independent_open_clip_forward(hps):
    sd, ckpt, tok_dir, tok = hps
    scorer = HPSv2(ckpt, tok_dir)
    images, prompts = _images(3), ["a red circle", "a photo of a blue square", "anime painting of a circle"]
    got = scorer.scores(images, prompts)
    pixels = image_processor(IMG)(images=images, return_tensors="pt")["pixel_values"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    np.testing.assert_allclose(got, reference_scores(sd, pixels, ids), rtol=1e-4, atol=1e-4)
    assert len(set(np.round(got, 3))) == 3  # not a constant


def test_preprocessing_is_open_clips_validation_transform():
    """shortest side to the model size (bicubic), centre crop, OpenAI mean / std: computed here with PIL."""
    from PIL import Image

    im = _images(1)[0]  # 48 x 40 (w x h)
    w, h = im.size
    s = IMG / min(w, h)
    r = im.resize((round(w * s), round(h * s)), Image.BICUBIC)
    left, top = (r.size[0] - IMG) // 2, (r.size[1] - IMG) // 2
    arr = np.asarray(r.crop((left, top, left + IMG, top + IMG)), dtype=np.float32) / 255
    ref = (arr - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    got = image_processor(IMG)(images=[im], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, ref, atol=0.02)  # PIL vs the processor's resize: rounding of a few pixels


def test_folder_styles_cli_and_bad_input(hps, tmp_path, capsys):
    sd, ckpt, tok_dir, _ = hps
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = [
        ("a.png", "a red circle", "anime"),
        ("b.png", "a blue square", "anime"),
        ("c.png", "a photo of a red square", "photo"),
    ]
    for im, (name, _, _) in zip(_images(3), rows):
        im.save(folder / name)
    (folder / "bad.png").write_bytes(b"not a png")
    with open(folder / "metadata.jsonl", "w") as f:
        for name, text, style in rows + [("bad.png", "a circle", "photo")]:
            f.write(json.dumps({"file_name": name, "text": text, "style": style}) + "\n")
    res = score_folder(str(folder), ckpt, tok_dir)
    assert res["n_images"] == 3 and len(res["skipped"]) == 1
    assert set(res["styles"]) == {"anime", "photo"}
    assert res["hpsv2"] == pytest.approx((res["styles"]["anime"]["hpsv2"] + res["styles"]["photo"]["hpsv2"]) / 2)
    assert (
        main(
            [
                "eval",
                "hpsv2",
                str(folder),
                "--checkpoint",
                ckpt,
                "--tokenizer",
                tok_dir,
                "--markdown",
                str(tmp_path / "t.md"),
            ]
        )
        == 0
    )
    assert "| average |" in (tmp_path / "t.md").read_text()
    assert "| anime |" in capsys.readouterr().out

    with pytest.raises(KoalaError, match="no such file"):
        HPSv2(str(tmp_path / "missing.pt"), tok_dir)
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, str(tmp_path / "other.pt"))
    with pytest.raises(KoalaError, match="not an open_clip ViT CLIP"):
        HPSv2(str(tmp_path / "other.pt"), tok_dir)
    torch.save({"state_dict": sd, "cfg": KoalaError("x")}, str(tmp_path / "pickled.pt"))  # an object: never unpickled
    with pytest.raises(
        KoalaError, match="pickled.pt holds objects other than tensors and plain values; koala does not"
    ):
        HPSv2(str(tmp_path / "pickled.pt"), tok_dir)
    with pytest.raises(KoalaError, match="tokenizer"):
        HPSv2(ckpt, str(tmp_path / "nowhere"))


def test_eval_run_with_the_hpsv2_scorer(hps, tiny_pipe_dir, tmp_path):
    from PIL import Image

    from koala.eval import run as ev

    _, ckpt, tok_dir, _ = hps
    styles = tmp_path / "prompts"
    styles.mkdir()
    (styles / "anime.txt").write_text("a red circle\n")
    (styles / "photo.txt").write_text("a photo of a blue square\n")
    out = tmp_path / "out"
    res = ev.run_eval(
        [ev.EvalModel("teacher", model=tiny_pipe_dir)],
        ev.read_prompt_set(str(styles)),
        ev.make_scorers(["hpsv2"], hps_checkpoint=ckpt, hps_tokenizer=tok_dir),
        str(out),
        ev.EvalSettings(steps=1),
        progress=False,
    )
    hps_row = res["models"][0]["scores"]["hpsv2"]
    folder = out / "images" / "teacher"
    index = [json.loads(x) for x in open(folder / "index.jsonl")]
    direct = HPSv2(ckpt, tok_dir).scores(
        [Image.open(folder / r["file"]).convert("RGB") for r in index], [r["prompt"] for r in index]
    )
    by_style = {r["style"]: s for r, s in zip(index, direct)}
    assert hps_row["anime"] == pytest.approx(by_style["anime"]) and hps_row["photo"] == pytest.approx(
        by_style["photo"]
    )
    assert hps_row["average"] == pytest.approx(np.mean(direct))
