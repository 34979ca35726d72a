"""koala eval clip: CLIP score from a local checkpoint (a tiny random CLIP built here), checked against
torchmetrics' clip_score with the same model; prompts from PNG metadata; unreadable images skipped and counted."""

import json

import numpy as np
import pytest
import torch

from koala.errors import KoalaError
from koala.eval import clip_scores, load_clip, score_folder

WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "left", "right"]


def _images(n=4, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle", "a blue square", "a photo of a red square left of a blue circle", "a blue circle"]


def test_clip_score_equals_torchmetrics(clip_dir):
    tm = pytest.importorskip("torchmetrics.functional.multimodal")
    model, processor = load_clip(clip_dir)
    images = _images()
    ours = clip_scores(images, PROMPTS, model, processor, batch_size=3)

    class Features(torch.nn.Module):  # torchmetrics 1.9 expects the transformers-4 return type (a tensor)
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **kw):
            return self.m.get_image_features(*a, **kw).pooler_output

        def get_text_features(self, *a, **kw):
            return self.m.get_text_features(*a, **kw).pooler_output

    wrapped = Features(model)
    for img, prompt, s in zip(images, PROMPTS, ours):
        ref = tm.clip_score(
            torch.from_numpy(np.asarray(img)).permute(2, 0, 1), prompt, model_name_or_path=lambda: (wrapped, processor)
        )
        assert abs(float(ref) - s) < 1e-3, (prompt, float(ref), s)
    assert all(0 < s <= 100 for s in ours) and len({round(s, 4) for s in ours}) == 4


def test_folder_with_png_prompts_and_an_unreadable_image(clip_dir, tmp_path, capsys):
    from koala.cli import main
    from koala.inference.generate import png_info

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (img, p) in enumerate(zip(_images(), PROMPTS)):
        img.save(folder / f"{i}.png", pnginfo=png_info({"prompt": p, "seed": i}))
    png_only = score_folder(str(folder), clip_dir)  # prompts from the PNG 'prompt' chunks
    assert png_only["n_images"] == 4 and not png_only["skipped"]
    (folder / "9.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # unreadable: skipped and counted
    rows = [{"file_name": f"{i}.png", "text": p} for i, p in enumerate(PROMPTS)] + [
        {"file_name": "9.png", "text": "a red circle"}
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = score_folder(str(folder), clip_dir)
    assert res["n_images"] == 4 and len(res["skipped"]) == 1 and res["skipped"][0]["file_name"] == "9.png"
    assert abs(res["clip_score"] - png_only["clip_score"]) < 1e-6
    model, processor = load_clip(clip_dir)
    assert abs(res["clip_score"] - float(np.mean(clip_scores(_images(), PROMPTS, model, processor)))) < 1e-4
    out = tmp_path / "clip.json"
    assert main(["eval", "clip", str(folder), "--checkpoint", clip_dir, "--json", str(out)]) == 0
    assert "CLIP score" in capsys.readouterr().out and json.loads(out.read_text())["n_images"] == 4


def test_bad_checkpoints_are_named(tmp_path, clip_dir):
    with pytest.raises(KoalaError, match="no config.json"):
        load_clip(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(KoalaError, match="model_type is 't5', not 'clip'"):
        load_clip(str(tmp_path))
    with pytest.raises(KoalaError, match="no metadata.jsonl and no PNG"):
        score_folder(str(tmp_path), clip_dir)


def test_pickscore_subcommand_is_the_scaled_cosine(clip_dir, tmp_path, capsys):
    from koala.cli import main
    from koala.eval.clip_score import clip_cosines

    folder = tmp_path / "imgs"
    folder.mkdir()
    texts = ["a red circle", "a blue square"]
    for i, im in enumerate(_images(2)):
        im.save(folder / f"{i}.png")
    with open(folder / "metadata.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n")
    assert main(["eval", "pickscore", str(folder), "--checkpoint", clip_dir, "--json", str(tmp_path / "p.json")]) == 0
    assert "| PickScore |" in capsys.readouterr().out
    res = json.load(open(tmp_path / "p.json"))
    model, proc = load_clip(clip_dir)
    from PIL import Image

    cos = clip_cosines([Image.open(folder / f"{i}.png").convert("RGB") for i in range(2)], texts, model, proc)
    assert res["pickscore"] == pytest.approx(float(model.logit_scale.exp()) * float(np.mean(cos)))
