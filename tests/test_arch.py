"""Presets, compression with teacher-weight initialisation, and the layer map (issue: foundation)."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from koala import KoalaError
from koala.arch import LAYER_MAP_FILE, LayerMap, UNetSpec, select_layers
from koala.cli import main
from koala.compress import compress
from koala.families import get_family
from koala.testing.tiny import tiny_unet
from koala.testing.tiny import unet_config as tiny_unet_config

SDXL = get_family("sdxl")
PRESETS, SDXL_BASE_UNET_CONFIG = SDXL.presets, SDXL.reference_config
compress_unet, student_config, teacher_spec = SDXL.compress, SDXL.student_config, SDXL.teacher_spec

# Table 2 of the paper, exact counts from the diffusers configs.
TABLE2 = {"sdxl-base": 2_567_463_684, "bk-sdxl": 1_717_277_764, "koala-1b": 1_161_184_324, "koala-700m": 782_822_724}


def _unet_inputs(unet, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, c.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        },
    )


@pytest.mark.parametrize("name", list(TABLE2))
def test_paper_presets_match_table2(name):
    cfg = student_config(SDXL_BASE_UNET_CONFIG, name)
    n = sum(p.numel() for p in SDXL.build_model(cfg, "meta").parameters())
    assert n == TABLE2[name]
    assert round(n / 1e6) == round(PRESETS[name].paper_params / 1e6) or abs(n - PRESETS[name].paper_params) < 1e6


@pytest.mark.slow
def test_presets_json_cli(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["name"]: r for r in rows}
    assert set(TABLE2) <= set(by)
    for name, n in TABLE2.items():
        r = by[name]
        assert r["params"] == n and isinstance(r["params"], int)
        assert r["tflops_1024"] > r["tflops_512"] > 0
        assert "transformer_depth" in r and "mid_block" in r
    assert by["koala-700m"]["mid_block"] is False and by["koala-1b"]["transformer_depth"] == [0, 2, 6]
    ratio = by["sdxl-base"]["tflops_1024"] / by["koala-700m"]["tflops_1024"]
    assert 2.3 < ratio < 2.7


def test_select_layers_matches_paper_sets():
    assert select_layers(10, 6, "bottom") == [0, 1, 2, 3, 4, 5]
    assert [i + 1 for i in select_layers(10, 6, "interleave")] == [1, 3, 5, 7, 9, 10]
    assert [i + 1 for i in select_layers(10, 5, "up")] == [6, 7, 8, 9, 10]
    assert select_layers(10, 5, "interleave") == [0, 2, 4, 6, 8]
    with pytest.raises(KoalaError):
        select_layers(2, 3)


@pytest.mark.parametrize("preset", ["koala-700m", "koala-1b", "bk-sdxl"])
def test_every_student_tensor_equals_its_teacher_tensor(tiny_teacher, preset):
    student, lmap = compress_unet(tiny_teacher, preset)
    t_state = tiny_teacher.state_dict()
    s_state = student.state_dict()
    assert s_state, "student has no tensors"
    for name, tensor in s_state.items():
        src = t_state[lmap.teacher_name(name)]
        assert torch.equal(tensor, src), name
        assert tensor.data_ptr() != src.data_ptr(), "student must own copies, not views of the teacher"
    # No tensor left at random init: the state dict is exactly what we copied.
    assert not any(p.is_meta for p in student.parameters())
    spec = PRESETS[preset]
    depth = [len(a.transformer_blocks) for a in student.down_blocks[2].attentions]
    assert depth == [spec.down_depth[2]] * spec.encoder_layers[2]
    assert (student.mid_block is None) == (not spec.mid_block)


def test_decoder_last_resnet_maps_to_teacher_last(tiny_teacher):
    student, lmap = compress_unet(tiny_teacher, "koala-700m")
    res = {e.student: e.teacher for e in lmap.of_kind("resnet") if e.stage.startswith("UP")}
    assert res["up_blocks.0.resnets.0"] == "up_blocks.0.resnets.0"
    assert res["up_blocks.0.resnets.1"] == "up_blocks.0.resnets.2"
    sa = [e for e in lmap.of_kind("transformer_layer") if e.stage == "UP-1"]
    assert [e.teacher_layer for e in sa if e.index == 0] == [0, 1, 2, 3, 4]  # SA-bottom


def test_teacher_spec_reproduces_teacher_exactly(tiny_teacher):
    spec = teacher_spec(dict(tiny_teacher.config))
    student, _ = compress_unet(tiny_teacher, spec)
    inputs = _unet_inputs(tiny_teacher)
    with torch.no_grad():
        a = tiny_teacher(**inputs).sample
        b = student(**inputs).sample
    assert torch.equal(a, b)


def test_compressed_student_runs_and_differs(tiny_teacher):
    student, _ = compress_unet(tiny_teacher, "koala-700m")
    inputs = _unet_inputs(tiny_teacher)
    with torch.no_grad():
        out = student(**inputs).sample
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()


def test_custom_spec_and_interleave_selection(tiny_teacher):
    spec = UNetSpec([1, 2, 1], [0, 1, 3], [3, [2, 1, 2], 0], False)
    student, lmap = compress_unet(tiny_teacher, spec, layer_selection="interleave")
    assert [len(a.transformer_blocks) for a in student.up_blocks[1].attentions] == [2, 1, 2]
    assert [
        e.teacher_layer
        for e in lmap.of_kind("transformer_layer")
        if e.student.startswith("down_blocks.2.attentions.0")
    ] == [0, 4, 8]


def test_bad_specs_are_refused(tiny_teacher):
    with pytest.raises(KoalaError, match="deeper than the teacher"):
        compress_unet(tiny_teacher, UNetSpec([1, 1, 1], [0, 2, 12], [6, 2, 0], True))
    with pytest.raises(KoalaError, match="unknown preset"):
        compress_unet(tiny_teacher, "koala-300m")
    with pytest.raises(KoalaError, match="encoder_layers"):
        compress_unet(tiny_teacher, UNetSpec([3, 1, 1], [0, 2, 5], [5, 2, 0], False))


def test_sdxl_preset_for_sd15_teacher_is_refused(tmp_path):
    sd15 = UNet2DConditionModel(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        layers_per_block=1,
        attention_head_dim=2,
        sample_size=8,
    )
    sd15.save_pretrained(tmp_path / "sd15")
    out = tmp_path / "out"
    assert main(["compress", "--teacher", str(tmp_path / "sd15"), "--student", "koala-700m", "--out", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(KoalaError, match="belongs to the SDXL family.*SD-1.x/2.x teacher.*bk-sdm-small"):
        compress(str(tmp_path / "sd15"), "koala-700m", str(out))
    with pytest.raises(KoalaError, match="addition_embed_type.*looks like a SD-1.x/2.x model"):
        compress(str(tmp_path / "sd15"), "koala-700m", str(out), family="sdxl")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_existing_output_needs_overwrite(tmp_path, tiny_teacher):
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(KoalaError, match="overwrite"):
        compress(str(tmp_path / "teacher"), "koala-700m", str(out))
    assert (out / "keep.txt").exists()
    res = compress(str(tmp_path / "teacher"), "koala-700m", str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and res.kind == "model"


def test_unet_dir_round_trip(tmp_path, tiny_teacher):
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student"
    assert (
        main(
            [
                "compress",
                "--teacher",
                str(tmp_path / "teacher"),
                "--student",
                "koala-1b",
                "--out",
                str(out),
                "--dtype",
                "fp16",
            ]
        )
        == 0
    )
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / LAYER_MAP_FILE).exists()
    student = UNet2DConditionModel.from_pretrained(out)
    lmap = LayerMap.load(str(out))
    lmap.validate(tiny_teacher, student)
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    t_state = tiny_teacher.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, t_state[lmap.teacher_name(name)].half().float())
    # A map that does not fit is refused.
    other = tiny_unet(seed=0, channels=(16, 32, 48))
    with pytest.raises(KoalaError, match="does not fit"):
        lmap.validate(other, student)


def test_pipeline_compress_loads_and_generates(tmp_path, tiny_pipe_dir):
    out = tmp_path / "koala"
    assert main(["compress", "--teacher", tiny_pipe_dir, "--student", "koala-700m", "--out", str(out)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.unet.mid_block is None
    assert (out / "unet" / LAYER_MAP_FILE).exists()
    img = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 32, 32, 3) and (img >= 0).all() and (img <= 1).all()
    teacher = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    # Everything but the U-Net is the teacher's, byte for byte.
    for a, b in zip(teacher.text_encoder_2.parameters(), pipe.text_encoder_2.parameters()):
        assert torch.equal(a, b)


def test_tiny_config_has_sdxl_depth_pattern():
    cfg = tiny_unet_config()
    assert cfg["transformer_layers_per_block"] == [1, 2, 10] and cfg["addition_embed_type"] == "text_time"


def test_teacher_unet_as_single_safetensors_file(tmp_path, tiny_pipe_dir):
    """A Lightning-style teacher: the pipeline's config + a separate single-file U-Net checkpoint."""
    from safetensors.torch import save_file

    other = tiny_unet(seed=7)
    save_file(other.state_dict(), str(tmp_path / "lightning_unet.safetensors"))
    out = tmp_path / "k"
    assert (
        main(
            [
                "compress",
                "--teacher",
                tiny_pipe_dir,
                "--teacher-unet",
                str(tmp_path / "lightning_unet.safetensors"),
                "--student",
                "koala-700m",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    student = UNet2DConditionModel.from_pretrained(out / "unet")
    lmap = LayerMap.load(str(out))
    o_state = other.state_dict()
    assert all(torch.equal(t, o_state[lmap.teacher_name(n)]) for n, t in student.state_dict().items())
    bad = tiny_unet(seed=0, channels=(16, 32, 48))
    save_file(bad.state_dict(), str(tmp_path / "bad.safetensors"))
    assert (
        main(
            [
                "compress",
                "--teacher",
                tiny_pipe_dir,
                "--teacher-unet",
                str(tmp_path / "bad.safetensors"),
                "--student",
                "koala-700m",
                "--out",
                str(tmp_path / "k2"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "k2").exists()
