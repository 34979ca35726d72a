"""The shapes world: seeded generator, captions that parse back to the truth, tiny models, CLI, packaged teacher."""

import filecmp
import json
import os

import numpy as np
import pytest

from koala.lab.score import parse_prompt
from koala.lab.shapes import DEFAULT_HELD_OUT, generate_scenes, parse_pairs, render, write_shapes_dataset


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = write_shapes_dataset(str(tmp_path / "a"), num_train=12, num_val=6, seed=3, progress=False)
    b = write_shapes_dataset(str(tmp_path / "b"), num_train=12, num_val=6, seed=3, progress=False)
    c = write_shapes_dataset(str(tmp_path / "c"), num_train=12, num_val=6, seed=4, progress=False)
    assert _files(a) == _files(b) and "train/metadata.jsonl" in _files(a) and "val/000005.png" in _files(a)
    for f in _files(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    assert not filecmp.cmp(os.path.join(a, "train/000000.png"), os.path.join(c, "train/000000.png"), shallow=False)
    # image i does not depend on how many images were asked for
    assert generate_scenes(3, "val", 3)[2].to_json() == generate_scenes(9, "val", 3)[2].to_json()


def test_metadata_rows(tmp_path):
    d = write_shapes_dataset(str(tmp_path / "d"), num_train=5, num_val=2, size=32, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(d, "train", "metadata.jsonl"))]
    assert len(rows) == 5
    for row in rows:
        assert {"file_name", "text", "objects", "relations"} <= set(row)
        assert os.path.isfile(os.path.join(d, "train", row["file_name"]))
        assert 1 <= len(row["objects"]) <= 3
    assert json.load(open(os.path.join(d, "shapes.json")))["size"] == 32


def test_held_out_pairs_absent_from_train_present_in_val():
    train = {(o.color, o.shape) for s in generate_scenes(400, "train", 0, 32) for o in s.objects}
    val = {(o.color, o.shape) for s in generate_scenes(200, "val", 0, 32) for o in s.objects}
    held = set(DEFAULT_HELD_OUT)
    assert not train & held
    assert held <= val
    assert len(train) == 12 - len(held)


def test_captions_parse_back_to_ground_truth():
    for s in generate_scenes(150, "val", 1, 64):
        exp = parse_prompt(s.text)
        assert [(o["color"], o["shape"]) for o in exp.objects] == [(o.color, o.shape) for o in s.objects], s.text
        assert exp.relations == s.relations, s.text
    lengths = {len(s.text.split()) for s in generate_scenes(100, "train", 0)}
    assert min(lengths) <= 4 and max(lengths) >= 15  # templates of varying length


def test_render_and_pairs_errors():
    s = generate_scenes(1, "train", 0, 32)[0]
    img = render(s.objects, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert parse_pairs("red:triangle, blue:circle") == [("red", "triangle"), ("blue", "circle")]
    from koala.errors import KoalaError

    with pytest.raises(KoalaError):
        parse_pairs("red-triangle")


def test_cli_make_data(tmp_path, capsys):
    from koala.cli import main

    out = tmp_path / "data"
    assert main(["lab", "make-data", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "32"]) == 0
    assert len(open(out / "train" / "metadata.jsonl").readlines()) == 4
    assert (out / "val" / "000001.png").is_file()
    assert main(["lab", "make-data", "--out", str(out), "--num-train", "1", "--num-val", "1"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_shapes_pipeline_has_sdxl_topology_and_compresses():
    from koala.families import get_family
    from koala.lab.models import build_shapes_pipeline

    pipe = build_shapes_pipeline(0)
    cfg = pipe.unet.config
    assert list(cfg.transformer_layers_per_block)[1:] == [2, 10] and cfg.addition_embed_type == "text_time"
    assert pipe.vae_scale_factor == 2 and pipe.tokenizer.model_max_length == 32
    student, _ = get_family("sdxl").compress(pipe.unet, "koala-700m")
    assert sum(p.numel() for p in student.parameters()) < 0.8 * sum(p.numel() for p in pipe.unet.parameters())


def test_packaged_teacher_loads_and_generates():
    import torch

    from koala.errors import KoalaError
    from koala.lab.models import default_sampling, load_shapes_teacher, shapes_teacher_dir

    try:
        shapes_teacher_dir()
    except KoalaError as err:  # the teacher ships with the package: its absence is a failure, not a skip
        pytest.fail(f"packaged shapes teacher missing: {err}")
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(shapes_teacher_dir())
    assert pipe.unet.dtype == torch.float32
    pipe = load_shapes_teacher()
    kw = {**default_sampling(), "num_inference_steps": 4}
    img = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kw).images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()


def test_train_teacher_refuses_foreign_output_dir(tmp_path):
    from koala.errors import KoalaError
    from koala.lab.train_teacher import TeacherConfig, train_teacher

    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(KoalaError, match="not a koala teacher") as err:
        train_teacher(TeacherConfig(out=str(out), num_train=4, steps=1, vae_steps=1))
    assert err.value.option == "overwrite"
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_train_teacher_tiny_end_to_end(tmp_path, capsys):
    """VAE phase, U-Net phase (EMA, min-SNR, add_noise), checkpoint scoring and save, in a few seconds."""
    from diffusers import StableDiffusionXLPipeline

    from koala.cli import main

    out = tmp_path / "teacher"
    args = [
        "lab",
        "train-teacher",
        "--out",
        str(out),
        "--num-train",
        "8",
        "--num-val",
        "2",
        "--vae-steps",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 3 and 0.0 <= res["color"] <= 1.0
    meta = json.load(open(out / "koala_teacher.json"))
    assert [row["step"] for row in meta["history"]] == [2, 3]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert pipe.unet.config.transformer_layers_per_block == [1, 2, 10]
    assert pipe.vae.config.scaling_factor != 1.0  # set from the trained VAE's latents


def test_teacher_reads_a_shapes_dataset_root_through_koala_data(tmp_path):
    from koala.lab.train_teacher import read_folder

    root = write_shapes_dataset(str(tmp_path / "d"), num_train=5, num_val=2, size=64, progress=False)
    x, captions = read_folder(root, 32)  # the train split, resized to 32x32
    rows = [json.loads(line) for line in open(os.path.join(root, "train", "metadata.jsonl"))]
    assert x.shape == (5, 3, 32, 32) and captions == [r["text"] for r in rows]
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cli_train_dit_teacher_with_the_packaged_vae(tmp_path, capsys):
    """The PixArt-topology shapes teacher: DiT + T5 trained through the family seam, VAE reused from the packaged
    teacher; the result loads as a PixArtSigmaPipeline, and the EMA copies differ from the initial weights."""
    import torch
    from diffusers import AutoencoderKL, PixArtSigmaPipeline

    from koala.cli import main
    from koala.lab.models import build_shapes_pipeline, shapes_teacher_dir

    out = tmp_path / "dit-teacher"
    args = [
        "lab",
        "train-teacher",
        "--family",
        "pixart",
        "--vae-from",
        shapes_teacher_dir(),
        "--out",
        str(out),
        "--num-train",
        "8",
        "--num-val",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--save-every",
        "0",
        "--threads",
        "1",
        "--fp32",
    ]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 3 and 0.0 <= res["color"] <= 1.0
    pipe = PixArtSigmaPipeline.from_pretrained(str(out))
    assert pipe.transformer.config.num_layers == 12
    vae = AutoencoderKL.from_pretrained(shapes_teacher_dir(), subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae.state_dict().values()))
    init = build_shapes_pipeline(0, "pixart")
    assert not torch.equal(pipe.transformer.proj_out.weight, init.transformer.proj_out.weight)
    assert not torch.equal(pipe.text_encoder.shared.weight, init.text_encoder.shared.weight)
