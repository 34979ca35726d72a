"""koala controlnet transfer: a teacher ControlNet moved onto a student through the layer map (issue 29, item 1)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from koala.arch.controlnet import residual_slots
from koala.arch.layer_map import LayerMap
from koala.compress import compress
from koala.errors import KoalaError
from koala.formats.controlnet import transfer_controlnet
from koala.inference.controlnet import controlnet_pipeline, load_controlnet
from koala.testing.controlnet import save_tiny_controlnet

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sdxl(tiny_pipe_dir, tmp_path_factory):
    """(teacher ControlNet dir, KOALA-700M student dir, transferred ControlNet dir, transfer result)."""
    root = tmp_path_factory.mktemp("cn")
    teacher_cn = save_tiny_controlnet(tiny_pipe_dir, str(root / "teacher_cn"))
    student = compress(tiny_pipe_dir, "koala-700m", str(root / "student")).out_dir
    result = transfer_controlnet(teacher_cn, student, str(root / "student_cn"))
    return teacher_cn, student, result.out, result


def _check_copied(teacher_dir, student_dir, cn_dir, result):
    """Every student ControlNet tensor equals the teacher ControlNet tensor it maps to (the layer map's name, the
    teacher residual slot of each zero convolution); a missing mid block's zero convolution is zero."""
    t, s = load_file(os.path.join(teacher_dir, WEIGHTS)), load_file(os.path.join(cn_dir, WEIGHTS))
    lmap = LayerMap.load(student_dir)
    for name, tensor in s.items():
        head, _, rest = name.partition(".")
        if head == "controlnet_down_blocks":
            k, _, tail = rest.partition(".")
            tname = f"controlnet_down_blocks.{result.slot_map[int(k)]}.{tail}"
        elif head in ("controlnet_cond_embedding", "controlnet_mid_block"):
            tname = name
        else:
            tname = lmap.teacher_name(name)
        if head == "controlnet_mid_block" and result.mid == "zero":
            assert not tensor.any(), name
        else:
            assert torch.equal(tensor, t[tname]), (name, tname)
    return lmap


def _outputs(pipe, images, **kw):
    return [
        pipe(
            "a red circle",
            image=im,
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images[0]
        for im in images
    ]


def test_koala_700m_controlnet_copies_the_mapped_teacher_tensors_and_runs(sdxl):
    from diffusers import (
        AutoModel,
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    teacher_cn, student, cn_dir, result = sdxl
    lmap = _check_copied(teacher_cn, student, cn_dir, result)
    # the slots are the layer map's: student resnet (stage i, j) <- teacher resnet (stage i, j), downsamplers alike
    s_unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    teacher = ControlNetModel.from_pretrained(teacher_cn)
    t_slots = residual_slots(teacher)
    assert [t_slots[k] for k in result.slot_map] == [lmap.teacher_name(n) for n in residual_slots(s_unet)]
    assert result.class_name == "KoalaControlNetModel" and result.mid == "zero"  # KOALA-700M has no mid block
    cn = load_controlnet(cn_dir)
    assert cn.mid_block is None
    # residual count = the student U-Net's down-block residuals (conv_in + resnets + downsamplers), not the teacher's
    assert len(cn.controlnet_down_blocks) == len(residual_slots(s_unet)) == result.student_residuals
    assert result.student_residuals < result.teacher_residuals == len(teacher.controlnet_down_blocks)
    # behaviour: the residuals before the first removed resnet (conv_in; DW-1's resnet 0, the same module fed the
    # same input) equal the teacher ControlNet's; the student's later ones are other tensors (other slots)
    g = torch.Generator().manual_seed(3)
    kw = dict(
        sample=torch.randn(1, 4, 16, 16, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        controlnet_cond=torch.rand(1, 3, 32, 32, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.rand(1, 6) * 32},
        return_dict=False,
    )
    with torch.no_grad():
        (s_res, s_mid), (t_res, _) = cn(**kw), teacher(**kw)
    assert len(s_res) == result.student_residuals and not s_mid.any()
    for k in (0, 1):
        torch.testing.assert_close(s_res[k], t_res[k])
    assert s_res[2].shape == t_res[3].shape and not torch.allclose(s_res[2], t_res[3])
    # other tools: diffusers' AutoModel with the shipped koala_controlnet.py, no koala import involved
    other = AutoModel.from_pretrained(cn_dir, trust_remote_code=True)
    assert type(other).__name__ == "KoalaControlNetModel" and type(other).__module__ != type(cn).__module__
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), cn.state_dict().values()))
    record = json.load(open(os.path.join(cn_dir, "koala_controlnet.json")))
    assert record["teacher_controlnet"] == os.path.abspath(teacher_cn) and record["slot_map"] == result.slot_map
    card = open(os.path.join(cn_dir, "README.md")).read()
    assert "trust_remote_code=True" in card and "StableDiffusionXLControlNetPipeline" in card
    # the student pipeline runs with it, and the control image changes the image
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(student, controlnet=cn)
    gen = torch.Generator().manual_seed(1)
    a, b = _outputs(pipe, [torch.rand(1, 3, 32, 32, generator=gen) for _ in range(2)])
    assert a.shape == (32, 32, 3) and abs(a - b).max() > 1e-4
    # koala's from_pipe route (a loaded StableDiffusionXLPipeline + the ControlNet) gives the same image
    plain = StableDiffusionXLPipeline.from_pretrained(student)
    (c,) = _outputs(
        controlnet_pipeline(plain, cn), [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    )
    assert np.array_equal(c, a)
    # ... and the teacher's ControlNet does not fit the student's residuals (the crash)
    with pytest.raises(RuntimeError, match="size of tensor"):
        _outputs(
            StableDiffusionXLControlNetPipeline.from_pretrained(student, controlnet=teacher),
            [torch.rand(1, 3, 32, 32)],
        )


@pytest.mark.parametrize("preset", ["bk-sdm-base", "bk-sdm-tiny"])
def test_sd_bk_sdm_controlnet(tiny_sd_pipe_dir, tmp_path, preset):
    """SD-1.x the same way: BK-SDM-Base keeps the mid block (diffusers' own ControlNetModel, mid block copied);
    BK-SDM-Tiny drops the innermost stage and the mid block."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

    teacher_cn = save_tiny_controlnet(tiny_sd_pipe_dir, str(tmp_path / "teacher_cn"))
    student = compress(tiny_sd_pipe_dir, preset, str(tmp_path / "student")).out_dir
    result = transfer_controlnet(teacher_cn, student, str(tmp_path / "cn"))
    _check_copied(teacher_cn, student, result.out, result)
    s_unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    if preset == "bk-sdm-base":
        assert result.class_name == "ControlNetModel" and result.mid == "copied"
        cn = ControlNetModel.from_pretrained(result.out)  # plain diffusers
    else:
        assert result.class_name == "KoalaControlNetModel" and result.mid == "zero"
        cn = load_controlnet(result.out)
    assert len(cn.controlnet_down_blocks) == len(residual_slots(s_unet)) == result.student_residuals
    pipe = StableDiffusionControlNetPipeline.from_pretrained(student, controlnet=cn, safety_checker=None)
    gen = torch.Generator().manual_seed(1)
    a, b = _outputs(pipe, [torch.rand(1, 3, 32, 32, generator=gen) for _ in range(2)])
    assert abs(a - b).max() > 1e-4


def _refused(teacher_cn, student, out, *needles):
    with pytest.raises(KoalaError) as err:
        transfer_controlnet(teacher_cn, student, out)
    for needle in needles:
        assert needle in str(err.value)
    assert not os.path.exists(out) and not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".")]


def test_refusals_name_the_file_and_write_nothing(sdxl, tiny_sd_pipe_dir, tiny_pixart_dir, tmp_path):
    from koala.testing.tiny import SHAPES, save_tiny_pipeline

    teacher_cn, student, _, _ = sdxl
    out = str(tmp_path / "out")
    # another family: an SD-1.x ControlNet on an SDXL student
    sd_cn = save_tiny_controlnet(tiny_sd_pipe_dir, str(tmp_path / "sd_cn"))
    _refused(
        sd_cn, student, out, os.path.join(sd_cn, "config.json"), "another model family or size", "addition_embed_type"
    )
    # another size: an SDXL ControlNet of a wider teacher
    wide = save_tiny_pipeline(str(tmp_path / "wide"), SHAPES, seed=0, words=["a"])
    wide_cn = save_tiny_controlnet(wide, str(tmp_path / "wide_cn"))
    _refused(wide_cn, student, out, "block_out_channels: [32, 64, 64] here, [16, 32, 32] in the teacher's U-Net")
    # the config fits but a tensor does not (a shape mismatch in the file)
    bad = tmp_path / "bad_cn"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(teacher_cn, "config.json")).read())
    state = load_file(os.path.join(teacher_cn, WEIGHTS))
    state["controlnet_down_blocks.1.weight"] = torch.zeros(16, 8, 1, 1)
    save_file(state, str(bad / WEIGHTS))
    _refused(str(bad), student, out, str(bad / WEIGHTS), "controlnet_down_blocks.1.weight: shape (16, 8, 1, 1)")
    # not a ControlNet at all, and a PixArt student (diffusers has no PixArt ControlNet)
    _refused(os.path.join(student, "unet"), student, out, "_class_name is 'UNet2DConditionModel', not a ControlNet")
    pix = compress(tiny_pixart_dir, {"num_layers": 3}, str(tmp_path / "pix")).out_dir
    _refused(teacher_cn, pix, out, "diffusers has no ControlNet for PixArt")


def test_cli_transfer_and_generate_with_the_controlnet(sdxl, tmp_path, capsys):
    """`koala controlnet transfer` writes the same folder as the library; `koala generate --controlnet` samples
    with it: equal to diffusers' StableDiffusionXLControlNetPipeline, and another control image changes it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from koala.cli import main
    from koala.inference import read_png_params

    teacher_cn, student, cn_dir, _ = sdxl
    out = tmp_path / "cn"
    assert main(["controlnet", "transfer", teacher_cn, "--student", student, "--out", str(out)]) == 0
    assert "residuals taken from the teacher's" in capsys.readouterr().out
    unet_dir = os.path.join(student, "unet")
    assert main(["controlnet", "transfer", unet_dir, "--student", student, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a ControlNet" in err and "--controlnet" not in err and not (tmp_path / "x").exists()
    a, b = load_file(str(out / WEIGHTS)), load_file(os.path.join(cn_dir, WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):  # 16x16 files: generate resizes them to the 32x32 output
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"c{i}.png")
        args = ["generate", "a red circle", "--model", student, "--controlnet", str(out), "--control-image"]
        args += [str(tmp_path / f"c{i}.png"), "--control-scale", "0.8", "--steps", "2", "--device", "cpu"]
        assert main([*args, "--out", str(tmp_path / f"img{i}"), "--no-progress"]) == 0
        png = tmp_path / f"img{i}" / "0000-s0.png"
        params = read_png_params(str(png))
        assert params["controlnet"] == "cn" and params["control_scale"] == 0.8
        assert params["control_image"].endswith(f"c{i}.png")
        images.append(np.asarray(Image.open(png), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() > 0
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(student, controlnet=load_controlnet(str(out)))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    control = Image.open(tmp_path / "c1.png").convert("RGB").resize((32, 32), Image.BICUBIC)
    ref = pipe(
        "a red circle",
        image=control,
        controlnet_conditioning_scale=0.8,
        num_inference_steps=2,
        guidance_scale=3.5,
        negative_prompt=None,
        generator=[torch.Generator().manual_seed(0)],
        width=32,
        height=32,
    ).images[0]
    assert np.abs(np.asarray(ref, dtype=np.int16) - images[1]).max() <= 1
    # refusals: a control image without a ControlNet; the teacher's ControlNet on the student
    capsys.readouterr()
    base = ["generate", "x", "--model", student, "--steps", "1", "--out", str(tmp_path / "no")]
    assert main([*base, "--control-image", str(tmp_path / "c0.png")]) == 2
    assert "--control-image needs --controlnet" in capsys.readouterr().err
    assert main([*base, "--controlnet", teacher_cn, "--control-image", str(tmp_path / "c0.png")]) == 2
    err = capsys.readouterr().err
    assert f"ControlNet {teacher_cn} does not fit the U-Net" in err and "koala controlnet transfer" in err
    assert not (tmp_path / "no").exists()
