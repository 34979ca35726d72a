"""T2I-CompBench: B-VQA's yes-probability equals what transformers' own generate scores give, phrase products,
the spatial rule on hand-made boxes for every relation, the 3-in-1 mix, non-spatial CLIP as a raw cosine; tiny random
BLIP VQA and OWL-ViT checkpoints run end to end; bad input is named."""

import json
import math

import numpy as np
import pytest
import torch

from koala.cli import main
from koala.errors import KoalaError
from koala.eval import compbench as cb

WORDS = [
    "a",
    "green",
    "bench",
    "blue",
    "bowl",
    "red",
    "car",
    "dog",
    "on",
    "the",
    "left",
    "of",
    "yes",
    "no",
    "photo",
    "round",
    "cookie",
    "square",
    "container",
]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    d = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", "?"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            bos_token_id=vocab.index("[DEC]"),
            pad_token_id=0,
            sep_token_id=3,
            encoder_hidden_size=32,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    out = str(d / "blip-vqa")
    BlipForQuestionAnswering(cfg).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(
        out
    )
    return out


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from koala.testing.tokenizer import build_clip_tokenizer

    d = tmp_path_factory.mktemp("owl")
    tok = build_clip_tokenizer(str(d / "tok"), WORDS)
    torch.manual_seed(0)
    cfg = OwlViTConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    out = str(d / "owl")
    OwlViTForObjectDetection(cfg).save_pretrained(out)
    tok.model_max_length = 16
    OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    ).save_pretrained(out)
    return out


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)) for _ in range(n)]


def test_phrases_objects_and_relations_of_compbench_templates():
    assert cb.noun_phrases("a green bench and a blue bowl") == ["a green bench", "a blue bowl"]
    assert cb.noun_phrases("a round cookie and a square container.") == ["a round cookie", "a square container"]
    assert cb.relation_of("a dog on the left of a bench") == "on the left of"
    assert cb.relation_of("a car next to a dog") == "next to" and cb.relation_of("a red car") is None
    assert cb.spatial_objects("a girl on the top of a wooden table") == ("person", "table")
    assert cb.spatial_objects("a dog on the left of a bench") == ("dog", "bench")
    assert cb.drop_adjectives("The red hat was next to the brown coat rack.") == "The hat was next to the coat rack."


def test_yes_probability_equals_generate_scores_and_bvqa_is_the_product(blip_dir):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    vqa = cb.BlipVQA(blip_dir)
    images = _images(2)
    got = vqa.yes_prob(images, ["a green bench?", "a blue bowl?"])
    model, proc = BlipForQuestionAnswering.from_pretrained(blip_dir).eval(), BlipProcessor.from_pretrained(blip_dir)
    for im, q, g in zip(images, ["a green bench?", "a blue bowl?"], got):
        inputs = proc(images=im, text=q, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, do_sample=False
            )
        logits = out.scores[0][0]
        ref = 1 / (1 + math.exp(float(logits[vqa.no] - logits[vqa.yes])))  # P(yes) / (P(yes) + P(no))
        assert g == pytest.approx(ref, rel=1e-4)
    prompts = ["a green bench and a blue bowl", "a red car"]
    b = vqa.bvqa(images, prompts)
    p = vqa.yes_prob([images[0], images[0], images[1]], ["a green bench?", "a blue bowl?", "a red car?"])
    assert b == pytest.approx([p[0] * p[1], p[2]], rel=1e-5)


@pytest.mark.parametrize(
    "relation,box2,expected",
    [
        ("on the left of", (300, 0, 400, 100), 1.0),  # object 2 to the right: object 1 is on its left
        ("on the left of", (-300, 0, -200, 100), 0.0),
        ("on the right of", (-300, 0, -200, 100), 1.0),
        ("on the top of", (0, 300, 100, 400), 1.0),  # y grows downwards: object 2 below
        ("on the bottom of", (0, -300, 100, -200), 1.0),
        ("on the left of", (40, 0, 140, 100), 0.1 / (60 * 100 / (2 * 100 * 100 - 60 * 100))),  # overlapping: 0.1 / IoU
        ("near", (100, 0, 200, 100), 1.0),
        ("next to", (400, 400, 500, 500), 150 / 400),
        ("on top of", (0, 300, 100, 400), 0.0),  # the benchmark never scores 'on top of' (kept)
    ],
)
def test_position_rule(relation, box2, expected):
    assert cb.position_score((0, 0, 100, 100), box2, relation) == pytest.approx(expected)


def test_spatial_image_score_and_complex_mix(owl_dir, monkeypatch):
    assert cb.spatial_score((0.9, (0, 0, 10, 10)), (0.8, (300, 0, 310, 10)), "on the left of") == pytest.approx(0.925)
    assert cb.spatial_score((0.9, (0, 0, 10, 10)), (0.8, (-300, 0, -290, 10)), "on the left of") == 0.0  # 0.425 < 0.5
    assert cb.spatial_score((1.0, (0, 0, 1, 1)), None, "near") == 0.0 and cb.spatial_score(None, None, "near") == 0.0
    det = cb.Detector(owl_dir, threshold=0.0)  # a random tiny OWL-ViT runs end to end
    found = det.best(_images(1)[0], ["dog", "bench"])
    assert len(found) == 2 and all(f is None or 0 <= f[0] <= 1 for f in found)
    monkeypatch.setattr(cb.Detector, "best", lambda self, im, names: [(0.9, (0, 0, 10, 10)), (0.8, (300, 0, 310, 10))])
    assert det.spatial(_images(1), ["a dog on the left of a bench"]) == [pytest.approx(0.925)]
    bench = cb.CompBench(vqa="x", detector="x", clip="x")
    bench._models = {"vqa": type("V", (), {"bvqa": lambda self, i, p: [0.4, 0.6]})(), "detector": det}
    monkeypatch.setattr(cb.CompBench, "clip", lambda self, images, texts: [0.3, 0.2])
    got = bench.score("complex", _images(2), ["a dog on the left of a bench", "The dog chased the red car."])
    assert got == pytest.approx([(0.4 + 0.925) / 2, (0.6 + 0.2) / 2])


def test_non_spatial_is_the_raw_clip_cosine(clip_dir):
    from koala.eval.clip_score import clip_cosines, clip_scores, load_clip

    model, proc = load_clip(clip_dir)
    ims, texts = _images(3), ["a red circle", "a blue square", "a photo of a circle"]
    cos = clip_cosines(ims, texts, model, proc)
    assert [100 * max(c, 0) for c in cos] == pytest.approx(clip_scores(ims, texts, model, proc))
    bench = cb.CompBench(clip=clip_dir)
    assert bench.score("non_spatial", ims, texts) == pytest.approx(cos)


def test_cli_folder_and_bad_input(blip_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images(2)):
        im.save(folder / f"{i}.png")
    with open(folder / "metadata.jsonl", "w") as f:
        for i, t in enumerate(["a green bench and a blue bowl", "a red car"]):
            f.write(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n")
    assert (
        main(
            [
                "eval",
                "compbench",
                str(folder),
                "--category",
                "color",
                "--vqa",
                blip_dir,
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    res = json.load(open(tmp_path / "r.json"))
    assert res["n_images"] == 2 and 0 < res["score"] < 1
    assert main(["eval", "compbench", str(folder), "--category", "spatial", "--vqa", blip_dir]) == 2
    assert "detector" in capsys.readouterr().err
    with pytest.raises(KoalaError, match="model_type"):
        cb.Detector(blip_dir)
    with pytest.raises(KoalaError, match="no config.json"):
        cb.BlipVQA(str(tmp_path))
    with pytest.raises(KoalaError, match="complex_val_spatial"):
        cb.CompBench(complex_lists=str(tmp_path))


def test_eval_run_with_a_compbench_scorer(blip_dir, tiny_pipe_dir, tmp_path):
    from PIL import Image

    from koala.eval import run as ev

    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a green bench and a blue bowl\na red car\n")
    bench = cb.CompBench(vqa=blip_dir)
    res = ev.run_eval(
        [ev.EvalModel("teacher", model=tiny_pipe_dir)],
        ev.read_prompt_set(str(prompts)),
        ev.make_scorers(["compbench-color"], compbench=bench),
        str(tmp_path / "out"),
        ev.EvalSettings(steps=1),
        progress=False,
    )
    folder = tmp_path / "out" / "images" / "teacher"
    index = [json.loads(x) for x in open(folder / "index.jsonl")]
    direct = bench.score(
        "color", [Image.open(folder / r["file"]).convert("RGB") for r in index], [r["prompt"] for r in index]
    )
    assert res["models"][0]["scores"]["compbench-color"]["score"] == pytest.approx(np.mean(direct))
    with pytest.raises(KoalaError, match="needs a BLIP VQA checkpoint"):
        ev.make_scorers(["compbench-shape"])
