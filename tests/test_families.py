"""The family seam: SDXL and SD-1.x/2.x (BK-SDM) behind one interface; detection, presets, compression, distill."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from koala import KoalaError
from koala.arch import LayerMap
from koala.cli import main
from koala.compress import compress
from koala.families import FAMILIES, detect_family, family_of, get_family, preset_stats
from koala.testing.tiny import tiny_unet

# BK-SDM paper (Kim et al., 2023), exact U-Net parameter counts of the diffusers configs.
BK_SDM = {"sd-v1": 859_520_964, "bk-sdm-base": 579_384_964, "bk-sdm-small": 482_346_884, "bk-sdm-tiny": 323_384_964}
SD = get_family("sd")


@pytest.mark.parametrize("name", list(BK_SDM))
def test_sd_presets_exact_counts(name):
    row = preset_stats(name, flops=False)
    assert row["family"] == "sd" and row["params"] == BK_SDM[name] == row["paper_params"]


def test_presets_json_lists_every_family(capsys):
    assert main(["presets", "--json", "--no-flops"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {rows[n]["family"] for n in BK_SDM} == {"sd"}
    assert {rows[n]["family"] for n in ("sdxl-base", "koala-700m", "koala-1b", "bk-sdxl")} == {"sdxl"}
    assert rows["bk-sdm-tiny"]["stages"] == 3 and rows["koala-700m"]["stages"] == 3


def test_presets_json_file_or_stdout(tmp_path, capsys):
    out = tmp_path / "presets.json"
    assert main(["presets", "--no-flops", "--json", str(out)]) == 0  # --json FILE: the file, and the table as usual
    table = capsys.readouterr().out
    assert table.strip() and not table.lstrip().startswith("[")
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["koala-700m"]["family"] == "sdxl"
    assert main(["presets", "--json", "-", "--no-flops"]) == 0  # '-' is stdout, as a bare --json
    assert json.loads(capsys.readouterr().out) == list(rows.values())


def test_detection_and_refusals_name_the_family():
    sdxl_cfg = dict(tiny_unet().config)
    sd_cfg = dict(tiny_unet(family="sd").config)
    assert detect_family(sdxl_cfg).name == "sdxl" and detect_family(sd_cfg).name == "sd"
    with pytest.raises(KoalaError, match="not a SDXL model.*looks like a SD-1.x/2.x model: family 'sd'"):
        get_family("sdxl").check(sd_cfg)
    with pytest.raises(KoalaError, match="no supported model family"):
        detect_family({**sd_cfg, "down_block_types": ["AttnDownBlock2D"] * 4})
    with pytest.raises(KoalaError, match="unknown model family 'flux'; choose one of: sdxl, sd, pixart"):
        get_family("flux")
    assert set(FAMILIES) == {"sdxl", "sd", "pixart"}


@pytest.mark.parametrize("preset", ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"])
def test_sd_every_student_tensor_equals_its_teacher_tensor(preset):
    teacher = tiny_unet(seed=3, family="sd").eval()
    student, lmap = SD.compress(teacher, preset)
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, t_state[lmap.teacher_name(name)]), name
    assert lmap.meta["family"] == "sd"
    spec = SD.presets[preset]
    assert len(student.down_blocks) == (spec.stages or 4) and (student.mid_block is None) == (not spec.mid_block)
    assert [len(b.resnets) for b in student.up_blocks] == [2] * len(student.up_blocks)
    x = torch.randn(2, 4, 16, 16)
    out = student(
        x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 7, teacher.config.cross_attention_dim)
    )
    assert out.sample.shape == x.shape and torch.isfinite(out.sample).all()


def test_bk_sdm_tiny_maps_outer_stages_and_skips_the_innermost():
    teacher = tiny_unet(seed=0, family="sd")
    student, lmap = SD.compress(teacher, "bk-sdm-tiny")
    ups = {e.student: e.teacher for e in lmap.of_kind("resnet") if e.stage.startswith("UP")}
    # student decoder stage i is the teacher's i + 1 (the teacher's UP-1, the innermost, is dropped)
    assert ups["up_blocks.0.resnets.0"] == "up_blocks.1.resnets.0"
    assert ups["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.2"
    assert {e.stage for e in lmap.entries} == {"IO", "DW-1", "DW-2", "DW-3", "UP-2", "UP-3", "UP-4"}
    # LF: DW-3 lost its downsampler (no output of the teacher stage's shape), every other stage has one
    assert set(SD.stage_modules(lmap, student, teacher)) == {"DW-1", "DW-2", "UP-2", "UP-3", "UP-4"}


def test_sd_pipeline_compress_loads_and_generates(tmp_path, tiny_sd_pipe_dir):
    out = tmp_path / "bk"
    assert main(["compress", "--teacher", tiny_sd_pipe_dir, "--student", "bk-sdm-small", "--out", str(out)]) == 0
    assert family_of(str(out)).name == "sd"
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.mid_block is None and len(pipe.unet.down_blocks[0].resnets) == 1
    img = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 32, 32, 3)
    teacher = UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd_pipe_dir, "unet"))
    lmap = LayerMap.load(str(out))
    t_state = teacher.state_dict()
    assert all(torch.equal(t, t_state[lmap.teacher_name(n)]) for n, t in pipe.unet.state_dict().items())
    # an SDXL preset for this SD teacher is refused and writes nothing
    assert (
        main(["compress", "--teacher", tiny_sd_pipe_dir, "--student", "koala-700m", "--out", str(tmp_path / "x")]) == 2
    )
    assert not (tmp_path / "x").exists()


def test_sd_distill_tiny_run_features_and_resume_refusal(tiny_sd_pipe_dir, tmp_path):
    """KOALA-style SA-KD on an SD-1.x teacher: BK-SDM-Small student, SA everywhere + LF at the outer stages."""
    from koala.distill import load_config
    from koala.distill.trainer import train

    cfg = load_config(
        "tiny",
        [
            f"teacher.pipeline={tiny_sd_pipe_dir}",
            "student.preset=bk-sdm-small",
            "kd.features={SA: all, LF: [DW-1, UP-4]}",
            f"train.output_dir={tmp_path / 'r'}",
            "train.max_steps=3",
            "train.progress=false",
            "validation.every=3",
            "validation.steps=1",
            "train.caption_dropout=0.5",
            "train.log_every=1",
        ],
    )
    res = train(cfg)
    assert res["step"] == 3 and res["feature_pairs"] > 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss/feat"] > 0 and r["loss/out"] > 0 for r in rows)
    assert {"feat/DW-1", "feat/UP-4", "feat/UP-2"} <= set(rows[-1])
    assert len(os.listdir(tmp_path / "r" / "samples" / "step-0000003")) == 2
    student = UNet2DConditionModel.from_pretrained(os.path.join(res["checkpoint"], "unet"))
    assert student.mid_block is None and LayerMap.load(os.path.join(res["checkpoint"], "unet")).meta["family"] == "sd"
    # a stage the SD student lacks is named in the error
    bad = load_config(
        "tiny",
        [
            f"teacher.pipeline={tiny_sd_pipe_dir}",
            "student.preset=bk-sdm-small",
            "kd.features={LF: [MID]}",
            f"train.output_dir={tmp_path / 'bad'}",
            "train.max_steps=1",
        ],
    )
    with pytest.raises(KoalaError, match="no LF features there"):
        train(bad)


def test_sd_cache_stores_the_family_tensors(tiny_sd_pipe_dir, tmp_path):
    from koala.data import build_cache, encode_batch, make_dataloader

    data = {"type": "synthetic", "num_samples": 4, "size": 40, "random_flip": False, "center_crop": True}
    build_cache(
        data,
        tiny_sd_pipe_dir,
        str(tmp_path / "c"),
        resolution=32,
        batch_size=2,
        shard_size=4,
        latent="mean",
        dtype="fp32",
        progress=False,
    )
    meta = json.loads((tmp_path / "c" / "cache_config.json").read_text())
    assert meta["fingerprint"]["family"] == "sd" and "pooled_prompt_embeds" not in meta["tensors"]
    parts = SD.load_parts(tiny_sd_pipe_dir)
    cached = next(
        iter(
            make_dataloader(
                {"type": "cache", "path": str(tmp_path / "c"), "repeat": False, "shuffle": False},
                batch_size=4,
                resolution=32,
            )
        )
    )
    raw = next(iter(make_dataloader({**data, "repeat": False, "shuffle": False}, batch_size=4, resolution=32)))
    ref = encode_batch(raw, parts, latent="mean")
    assert set(ref) == {"latents", "prompt_embeds"}
    torch.testing.assert_close(cached["prompt_embeds"], ref["prompt_embeds"])
    torch.testing.assert_close(cached["latents"], ref["latents"], rtol=1e-5, atol=1e-5)


def test_student_of_another_family_is_refused(tiny_sd_pipe_dir, tiny_pipe_dir, tmp_path):
    from koala.distill import load_config
    from koala.distill.models import load_models

    compress(tiny_sd_pipe_dir, "bk-sdm-small", str(tmp_path / "s"))
    cfg = load_config("tiny", [f"teacher.pipeline={tiny_pipe_dir}", f"student.path={tmp_path / 's'}"])
    with pytest.raises(KoalaError, match="compressed from a sd teacher but teacher.pipeline is sdxl"):
        load_models(cfg)


def test_testing_floor_knows_every_family():
    """koala.testing may not import koala.families (it is the floor), so its family list is checked here."""
    from koala.testing import tiny

    assert tuple(tiny.FAMILIES) == tuple(FAMILIES)


def test_first_last_stage_aliases_follow_the_family():
    from koala.distill import feature_pairs

    for fam, teacher, last in ((SD, tiny_unet(family="sd"), "UP-4"), (get_family("sdxl"), tiny_unet(), "UP-3")):
        student, lmap = fam.compress(teacher, "bk-sdm-small" if fam is SD else "koala-700m")
        pairs = feature_pairs(lmap, student, teacher, {"LF": ["first", "last"]})
        assert [p.stage for p in pairs] == ["DW-1", last]
