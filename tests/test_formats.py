"""Single-file checkpoints: export -> diffusers' own from_single_file gives the same tensors; our import is the exact
inverse; ComfyUI's structure detection (re-implemented from its rules) sees KOALA-700M / -1B at real size; single-file
teachers compress exactly like their diffusers directories; bad input is refused with nothing written."""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

from koala.cli import main
from koala.compress import compress
from koala.errors import KoalaError
from koala.formats.ldm import UNET_PREFIX, to_ldm, unet_rules
from koala.formats.single_file import detect_layout, export_single_file, infer_unet_config, single_file_to_diffusers
from koala.testing.tiny import RANDOM, save_tiny_pipeline

# the two SDXL text towers differ in width (as in SDXL: 768 / 1280), so nothing can be loaded into the wrong one
SPEC = dataclasses.replace(RANDOM, text_dim_2=24, projection_dim=12)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("sf") / "teacher"
    save_tiny_pipeline(str(d), SPEC, seed=3, words=["a", "red", "circle"])
    return str(d)


@pytest.fixture(scope="module")
def students(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("sf_students")
    return {p: compress(teacher, p, str(root / p)).out_dir for p in ("koala-700m", "koala-1b")}


def _same(a, b, components=COMPONENTS):
    for c in components:
        sa, sb = getattr(a, c).state_dict(), getattr(b, c).state_dict()
        assert set(sa) == set(sb), c
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{c}.{k}"


@pytest.mark.parametrize("preset", ["koala-700m", "koala-1b"])
def test_export_loads_back_with_diffusers_from_single_file(students, preset, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    student = students[preset]
    out = tmp_path / "student.safetensors"
    res = export_single_file(student, str(out))
    assert res.components["unet"] > 0 and set(res.components) == set(COMPONENTS)
    layout = detect_layout(str(out))
    assert layout.family == "sdxl" and set(layout.components) == set(COMPONENTS)
    assert all(
        k.startswith(
            (
                "model.diffusion_model.",
                "first_stage_model.",
                "conditioner.embedders.0.transformer.",
                "conditioner.embedders.1.model.",
            )
        )
        for k in layout.shapes
    )
    if preset == "koala-700m":  # no mid block
        assert not any(".middle_block." in k for k in layout.shapes)
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=student, local_files_only=True)
    _same(loaded, StableDiffusionXLPipeline.from_pretrained(student))
    # the U-Net alone
    unet_file = tmp_path / "unet.safetensors"
    export_single_file(student, str(unet_file), unet_only=True)
    unet = UNet2DConditionModel.from_single_file(
        str(unet_file), config=student, subfolder="unet", local_files_only=True
    )
    ref = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in unet.state_dict().items())


def test_import_is_the_exact_inverse_and_reads_structure_from_the_file(students, teacher, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    student = students["koala-700m"]
    f = tmp_path / "s.safetensors"
    export_single_file(student, str(f), dtype="fp16")
    # the config directory is the *teacher* (depth 10, mid block): the structure must come from the file
    res = single_file_to_diffusers(str(f), str(tmp_path / "back"), config=teacher)
    assert res.kind == "pipeline" and res.ignored == []
    back = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "back"), dtype=torch.float16)
    ref = StableDiffusionXLPipeline.from_pretrained(student)
    for c in COMPONENTS:
        sa, sb = getattr(back, c).state_dict(), getattr(ref, c).state_dict()
        assert set(sa) == set(sb)
        assert all(sa[k].dtype == torch.float16 and torch.equal(sa[k], sb[k].half()) for k in sa), c
    for k in (
        "layers_per_block",
        "transformer_layers_per_block",
        "reverse_transformer_layers_per_block",
        "mid_block_type",
        "block_out_channels",
        "attention_head_dim",
        "cross_attention_dim",
    ):
        assert back.unet.config[k] == ref.unet.config[k], k
    # the student's layer map travels in the file's metadata: the converted directory is a koala student again
    from koala.arch.layer_map import LayerMap
    from koala.card import read_card

    assert LayerMap.load(str(tmp_path / "back")).to_dict() == LayerMap.load(student).to_dict()
    front, _ = read_card(str(tmp_path / "back" / "README.md"))
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"


def test_sd_family_round_trip(tiny_sd_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    student = compress(tiny_sd_pipe_dir, "bk-sdm-tiny", str(tmp_path / "student")).out_dir  # 3 of 4 stages kept
    f = tmp_path / "sd.safetensors"
    export_single_file(student, str(f))
    assert detect_layout(str(f)).family == "sd"
    loaded = StableDiffusionPipeline.from_single_file(
        str(f), config=student, local_files_only=True, safety_checker=None
    )
    ref = StableDiffusionPipeline.from_pretrained(student)
    _same(loaded, ref, ("unet", "vae", "text_encoder"))
    single_file_to_diffusers(str(f), str(tmp_path / "back"), config=student)
    _same(StableDiffusionPipeline.from_pretrained(str(tmp_path / "back")), ref, ("unet", "vae", "text_encoder"))


# ---------------------------------------------------------------------------------- real size, on meta
def comfy_detect(shapes: dict, p: str = UNET_PREFIX) -> dict:
    """ComfyUI's U-Net structure detection rules (comfy/model_detection.py, detect_unet_config), written from its
    description: a per-input-resnet transformer depth list, the middle block's depth (-2: none, -1: resnets only),
    context and adm widths, linear projections."""

    def count(fmt):
        n = 0
        while any(k.startswith(fmt.format(n)) for k in shapes):
            n += 1
        return n

    def depth(prefix):
        return count(prefix + "1.transformer_blocks.{}.") if any(k.startswith(prefix + "1.") for k in shapes) else 0

    cfg = {
        "model_channels": shapes[f"{p}input_blocks.0.0.weight"][0],
        "adm_in_channels": shapes.get(f"{p}label_emb.0.0.weight", (None, None))[1],
    }
    n_in = count(p + "input_blocks.{}.")
    td, num_res, res = [], [], 0
    for n in range(1, n_in):
        blk = f"{p}input_blocks.{n}."
        if f"{blk}0.op.weight" in shapes:
            num_res.append(res)
            res = 0
        elif f"{blk}0.in_layers.0.weight" in shapes:
            res += 1
            td.append(depth(blk))
            if td[-1] and "context_dim" not in cfg:
                cfg["context_dim"] = shapes[f"{blk}1.transformer_blocks.0.attn2.to_k.weight"][1]
                cfg["use_linear_in_transformer"] = len(shapes[f"{blk}1.proj_in.weight"]) == 2
    num_res.append(res)
    if f"{p}middle_block.1.proj_in.weight" in shapes:
        mid = count(p + "middle_block.1.transformer_blocks.{}.")
    elif f"{p}middle_block.0.in_layers.0.weight" in shapes:
        mid = -1
    else:
        mid = -2
    cfg.update(transformer_depth=td, num_res_blocks=num_res, transformer_depth_middle=mid)
    return cfg


COMFY = {  # ComfyUI's supported_models unet_config values for these checkpoints
    "koala-700m": {"transformer_depth": [0, 2, 5], "transformer_depth_middle": -2},
    "koala-1b": {"transformer_depth": [0, 2, 6], "transformer_depth_middle": 6},
    "sdxl-base": {"transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10},
}


@pytest.mark.parametrize("preset", list(COMFY))
def test_comfyui_detection_and_config_inference_at_real_size(preset):
    from koala.families import get_family

    fam = get_family("sdxl")
    cfg = fam.student_config(fam.reference_config, preset)
    unet = fam.build_model(cfg, "meta")
    shapes = {k: tuple(v.shape) for k, v in to_ldm(unet.state_dict(), unet_rules(unet), UNET_PREFIX).items()}
    assert len(shapes) == len(unet.state_dict())
    got = comfy_detect(shapes)
    assert {k: got[k] for k in COMFY[preset]} == COMFY[preset]
    assert (got["model_channels"], got["context_dim"], got["adm_in_channels"], got["use_linear_in_transformer"]) == (
        320,
        2048,
        2816,
        True,
    )
    # the offline importer rebuilds the student's structure from the keys with only SDXL-Base's config to go on
    inferred = infer_unet_config(shapes, fam.reference_config)
    for k in (
        "layers_per_block",
        "transformer_layers_per_block",
        "reverse_transformer_layers_per_block",
        "mid_block_type",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
    ):
        assert inferred[k] == cfg[k], k
    rebuilt = fam.build_model(inferred, "meta")
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }


# ---------------------------------------------------------------------------------- single-file teachers
def test_single_file_teacher_compresses_like_its_directory(teacher, students, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from koala.arch.layer_map import LayerMap

    f = tmp_path / "teacher.safetensors"
    assert main(["export", teacher, "--out", str(f)]) == 0
    rc = main(
        [
            "compress",
            "--teacher",
            str(f),
            "--teacher-config",
            teacher,
            "--student",
            "koala-700m",
            "--out",
            str(tmp_path / "from_file"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    a = UNet2DConditionModel.from_pretrained(str(tmp_path / "from_file"), subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(students["koala-700m"], subfolder="unet").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert LayerMap.load(str(tmp_path / "from_file")).meta["teacher_path"] == str(f)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the converted teacher was cleaned up
    # a U-Net-only single file as --teacher-unet (SGM keys), next to the diffusers-layout one that already worked
    uf = tmp_path / "teacher_unet.safetensors"
    export_single_file(teacher, str(uf), unet_only=True)
    res = compress(teacher, "koala-700m", str(tmp_path / "via_unet"), teacher_unet=str(uf))
    c = UNet2DConditionModel.from_pretrained(res.out_dir, subfolder="unet").state_dict()
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_distill_teacher_pipeline_may_be_a_single_file(teacher, tmp_path):
    from koala.distill.config import DistillConfig, TeacherConfig, TrainConfig
    from koala.distill.models import teacher_pipeline

    f = tmp_path / "teacher.safetensors"
    export_single_file(teacher, str(f))
    cfg = DistillConfig(
        TeacherConfig(pipeline=str(f), config=teacher), train=TrainConfig(output_dir=str(tmp_path / "run"))
    )
    d = teacher_pipeline(cfg)
    assert d == str(tmp_path / "run" / "teacher") and os.path.isfile(os.path.join(d, "model_index.json"))
    stamp = os.path.getmtime(os.path.join(d, "unet", "config.json"))
    assert teacher_pipeline(cfg) == d and os.path.getmtime(os.path.join(d, "unet", "config.json")) == stamp  # reused


# ---------------------------------------------------------------------------------- bad input
def test_bad_single_files_are_refused_with_nothing_written(teacher, tiny_pixart_dir, tmp_path, capsys):
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux))
    with pytest.raises(KoalaError, match="flux.safetensors.*FLUX"):
        detect_layout(str(flux))
    assert main(["compress", "--teacher", str(flux), "--student", "koala-700m", "--out", str(tmp_path / "o")]) == 2
    assert "flux.safetensors" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle")
    assert main(["export", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
    assert "unpickled" in capsys.readouterr().err
    # a tiny SDXL file with no config: SDXL-Base's configs do not fit, and the error says what to give
    f = tmp_path / "tiny.safetensors"
    export_single_file(teacher, str(f))
    with pytest.raises(KoalaError, match="config"):
        single_file_to_diffusers(str(f), str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")
    # a DiT has no single-file layout here; an existing output is not overwritten
    with pytest.raises(KoalaError, match="single-file export covers"):
        export_single_file(tiny_pixart_dir, str(tmp_path / "dit.safetensors"))
    with pytest.raises(KoalaError, match="already exists"):
        export_single_file(teacher, str(f))
    assert main(["export", teacher, "--out", str(tmp_path / "x.bin")]) == 2
    assert not os.path.exists(tmp_path / "x.bin")
    # a truncated file is named
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(KoalaError, match="cut.safetensors.*truncated"):
        detect_layout(str(cut))


def test_a_structure_the_layout_cannot_hold_is_refused(tmp_path):
    """A U-Net with a text projection (encoder_hid_proj) has tensors the single-file layout has no place for."""
    from diffusers import UNet2DConditionModel

    from koala.testing.tiny import unet_config

    cfg = dict(unet_config(SPEC), encoder_hid_dim=8, encoder_hid_dim_type="text_proj")
    UNet2DConditionModel(**cfg).save_pretrained(str(tmp_path / "unet"))
    out = tmp_path / "u.safetensors"
    with pytest.raises(KoalaError, match="no place for these U-Net tensors: encoder_hid_proj"):
        export_single_file(str(tmp_path / "unet"), str(out), unet_only=True)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_export_diffusers_rewrites_a_student_directory_in_another_dtype(students, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from koala.arch.layer_map import LayerMap

    student = students["koala-1b"]
    assert main(["export", student, "--format", "diffusers", "--dtype", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    a = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    b = StableDiffusionXLPipeline.from_pretrained(student)
    for c in COMPONENTS:
        sa, sb = getattr(a, c).state_dict(), getattr(b, c).state_dict()
        assert all(torch.equal(sa[k], sb[k].to(torch.bfloat16)) for k in sb), c
    assert LayerMap.load(str(tmp_path / "bf16")).to_dict() == LayerMap.load(student).to_dict()
    assert os.path.isfile(tmp_path / "bf16" / "README.md")


def test_real_size_sdxl_layout_is_what_diffusers_and_checkpoints_know():
    """The whole real-size pipeline (KOALA-700M U-Net, SDXL VAE, CLIP-L, OpenCLIP-bigG) exported on meta: diffusers'
    own single-file detection calls it SDXL-Base, and tensors have the shapes SDXL checkpoints have."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from koala.families import get_family
    from koala.formats.ldm import (
        SDXL_CLIP_PREFIX,
        SDXL_OPENCLIP_PREFIX,
        VAE_PREFIX,
        clip_rules,
        openclip_rules,
        vae_rules,
    )
    from koala.formats.single_file import _shipped_configs

    fam = get_family("sdxl")
    cfgs = _shipped_configs("sdxl")  # what an SDXL single file is converted with when no config is given
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(fam.student_config(cfgs["unet"], "koala-700m"))
        vae = diffusers.AutoencoderKL.from_config(cfgs["vae"])
        te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(cfgs["text_encoder"]))
        te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(cfgs["text_encoder_2"]))
    sd = {
        **to_ldm(unet.state_dict(), unet_rules(unet), UNET_PREFIX),
        **to_ldm(vae.state_dict(), vae_rules(vae), VAE_PREFIX),
        **to_ldm(te1.state_dict(), clip_rules(te1), SDXL_CLIP_PREFIX),
        **to_ldm(te2.state_dict(), openclip_rules(te2), SDXL_OPENCLIP_PREFIX),
    }
    assert infer_diffusers_model_type(sd) == "xl_base"
    known = {
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.output_blocks.1.2.conv.weight": (1280, 1280, 3, 3),
    }  # 2 resnets per decoder stage
    assert {k: tuple(sd[k].shape) for k in known} == known


def test_export_keeps_the_stored_dtype_unless_told(teacher, tmp_path):
    from koala.formats.single_file import read_header

    half = tmp_path / "half"
    assert main(["export", teacher, "--format", "diffusers", "--dtype", "fp16", "--out", str(half)]) == 0
    export_single_file(str(half), str(tmp_path / "h.safetensors"))
    export_single_file(str(half), str(tmp_path / "f.safetensors"), dtype="fp32")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), "pt") as a, safe_open(str(tmp_path / "f.safetensors"), "pt") as b:
        k = "model.diffusion_model.input_blocks.0.0.weight"
        assert a.get_tensor(k).dtype == torch.float16 and b.get_tensor(k).dtype == torch.float32
        assert torch.equal(a.get_tensor(k).float(), b.get_tensor(k))
    assert os.path.getsize(tmp_path / "h.safetensors") < 0.6 * os.path.getsize(tmp_path / "f.safetensors")
    assert read_header(str(tmp_path / "h.safetensors"))[1]["koala.family"] == "sdxl"
    # a directory rewritten without --dtype keeps every component's stored dtype
    assert main(["export", str(half), "--format", "diffusers", "--out", str(tmp_path / "again")]) == 0
    from koala.formats.single_file import stored_dtype

    for c in COMPONENTS:
        assert stored_dtype(str(tmp_path / "again" / c)) == torch.float16, c
