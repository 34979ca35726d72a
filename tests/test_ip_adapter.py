"""IP-Adapter transfer: a random IP-Adapter for the tiny SDXL teacher (diffusers' load_ip_adapter layout) mapped onto
a KOALA student through its layer map. Loaded with diffusers on both sides, every student cross-attention layer's
to_k_ip / to_v_ip equals the teacher's at the mapped layer; the student pipeline runs with an image prompt (and the
image prompt changes the image); koala generate uses it; bad files are refused with nothing written."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from koala.arch.layer_map import LayerMap
from koala.cli import main
from koala.compress import compress
from koala.errors import KoalaError
from koala.formats.ip_adapter import cross_attention_layers, transfer_ip_adapter
from koala.formats.t2i_adapter import transfer_t2i_adapter
from koala.testing.adapters import tiny_image_encoder, tiny_ip_adapter


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    """(teacher dir, teacher IP-Adapter file, student dir, image encoder dir, two reference images)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("ipa")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    save_file(tiny_ip_adapter(unet, seed=1), str(root / "ip-adapter_teacher.safetensors"))
    tiny_image_encoder(seed=2).save_pretrained(str(root / "image_encoder"))
    student = compress(tiny_pipe_dir, "koala-700m", str(root / "student")).out_dir
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(str(root / f"ref{i}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    return tiny_pipe_dir, str(root / "ip-adapter_teacher.safetensors"), student, str(root / "image_encoder"), images


def _ip_pipe(path, model_dir, encoder_dir):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(
        model_dir, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_dir)
    )
    folder, name = os.path.split(path)
    pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None)
    return pipe


def test_transferred_ip_adapter_has_the_teachers_layers_and_runs(setup, tmp_path, capsys):
    _, teacher_file, student, enc_dir, images = setup
    out = tmp_path / "koala_ipa.safetensors"
    args = ["adapter", "transfer", "--kind", "ip-adapter", teacher_file, "--student", student, "--out", str(out)]
    assert main(args) == 0
    report = capsys.readouterr().out
    s_pipe = _ip_pipe(str(out), student, enc_dir)
    lmap = LayerMap.load(student)
    t_unet = _ip_pipe(teacher_file, setup[0], enc_dir).unet
    t_procs, s_procs = t_unet.attn_processors, s_pipe.unet.attn_processors
    s_layers = cross_attention_layers(s_pipe.unet)
    assert s_layers and len(s_layers) < len(cross_attention_layers(t_unet))
    for name in s_layers:
        s, t = s_procs[name + ".processor"], t_procs[lmap.teacher_name(name) + ".processor"]
        assert torch.equal(s.to_k_ip[0].weight, t.to_k_ip[0].weight)
        assert torch.equal(s.to_v_ip[0].weight, t.to_v_ip[0].weight)
    t_proj, s_proj = t_unet.encoder_hid_proj.state_dict(), s_pipe.unet.encoder_hid_proj.state_dict()
    assert t_proj.keys() == s_proj.keys() and all(torch.equal(t_proj[k], s_proj[k]) for k in t_proj)
    n_teacher = len(cross_attention_layers(t_unet))
    assert f"{len(s_layers)} of the teacher's {n_teacher} cross-attention layers kept" in report
    # the student runs with an image prompt, and the image prompt acts: scale 0 is the plain student
    ref = Image.open(images[0])

    def sample(scale, image=ref):
        s_pipe.set_ip_adapter_scale(scale)
        g = torch.Generator().manual_seed(0)
        return s_pipe("a red circle", ip_adapter_image=image, num_inference_steps=2, generator=g, output_type="np")

    on, off = sample(1.0).images, sample(0.0).images
    from diffusers import StableDiffusionXLPipeline

    plain = StableDiffusionXLPipeline.from_pretrained(student)(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert np.abs(on - off).max() > 1e-3
    np.testing.assert_allclose(off, plain, atol=1e-5)


def test_generate_with_an_ip_adapter(setup, tmp_path, capsys):
    _, teacher_file, student, enc_dir, images = setup
    out = tmp_path / "ipa.safetensors"
    transfer_ip_adapter(teacher_file, student, str(out))
    args = ["generate", "a red circle", "--model", student, "--steps", "2", "--seed", "1", "--no-progress"]
    ip = ["--ip-adapter", str(out), "--image-encoder", enc_dir, "--ip-scale", "0.8"]
    assert main(args + ip + ["--ip-image", images[0], "--out", str(tmp_path / "a")]) == 0
    assert "IP-Adapter ipa.safetensors:0.8 (ref0.png)" in capsys.readouterr().out
    assert main(args + ip + ["--ip-image", images[1], "--out", str(tmp_path / "b")]) == 0

    def png(d):
        return Image.open(tmp_path / d / next(p for p in sorted(os.listdir(tmp_path / d)) if p.endswith(".png")))

    a, b = png("a"), png("b")
    assert a.size == b.size and a.tobytes() != b.tobytes()  # the reference image changes the image
    assert a.text["ip_adapter"] == "ipa.safetensors:0.8 (ref0.png)"  # the PNG says which adapter made it
    # the teacher's adapter (not transferred) does not fit the student: said, not a crash; nothing written
    bad = ["--ip-adapter", teacher_file, "--ip-image", images[0], "--image-encoder", enc_dir]
    assert main(args + bad + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "koala adapter transfer" in err and "ip-adapter_teacher.safetensors" in err
    assert main(args + ["--ip-adapter", str(out), "--out", str(tmp_path / "y")]) == 2  # no --ip-image
    assert "--ip-image" in capsys.readouterr().err
    assert main(args + ["--ip-scale", "0.5", "--out", str(tmp_path / "y")]) == 2  # no --ip-adapter
    assert "--ip-scale needs --ip-adapter" in capsys.readouterr().err
    assert main(args + ip + ["--ip-image", str(tmp_path / "none.png"), "--out", str(tmp_path / "z")]) == 2
    assert not any(os.path.exists(tmp_path / d) and os.listdir(tmp_path / d) for d in "xyz")
    # without --image-encoder: the image_encoder/ folder beside the adapter file (the h94/IP-Adapter layout)
    beside = os.path.join(os.path.dirname(enc_dir), "student_ipa.safetensors")
    transfer_ip_adapter(teacher_file, student, beside, overwrite=True)
    ip = ["--ip-adapter", beside, "--ip-image", images[0], "--ip-scale", "0.8"]
    assert main(args + ip + ["--out", str(tmp_path / "c")]) == 0
    assert png("c").tobytes() == a.tobytes()  # the same encoder, adapter weights, image and seed: the same image


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_bad_ip_adapters_are_refused_with_nothing_written(setup, tiny_sd_pipe_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    _, teacher_file, student, _, _ = setup
    out = tmp_path / "out.safetensors"
    good = _tensors(teacher_file)

    def refused(name, tensors, match):
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(KoalaError, match=match) as err:
            transfer_ip_adapter(str(tmp_path / name), student, str(out))
        assert name in str(err.value)

    # unknown layouts
    refused(
        "lora.safetensors", {"unet.x.lora_A.weight": torch.zeros(2, 2)}, "not an IP-Adapter file.*1 key.*unet.x.lora_A"
    )
    no_layers = {k: v for k, v in good.items() if k.startswith("image_proj.")}
    refused("proj_only.safetensors", no_layers, "no ip_adapter.N.to_k_ip")
    renumbered = {k.replace("ip_adapter.1.", "ip_adapter.0."): v for k, v in good.items()}
    refused("even.safetensors", renumbered, "layer number 0 is even")
    half = {k: v for k, v in good.items() if k != "ip_adapter.3.to_v_ip.weight"}
    refused("half.safetensors", half, "layer 3 has to_k_ip only")
    faceid = dict(good, **{"ip_adapter.1.to_k_lora.down.weight": torch.zeros(2, 2)})
    refused("faceid.safetensors", faceid, "LoRA layers")
    # does not fit the student's teacher: an SD-1.x adapter (other layer count), one weight of another width
    sd_unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipe_dir, subfolder="unet")
    refused("sd15.safetensors", tiny_ip_adapter(sd_unet), "cross-attention layers .* another base model")
    wide = dict(good, **{"ip_adapter.5.to_k_ip.weight": torch.zeros(good["ip_adapter.5.to_k_ip.weight"].shape[0], 7)})
    refused("wide.safetensors", wide, r"shape mismatch.*ip_adapter\.5\.to_k_ip")
    with pytest.raises(KoalaError, match="safetensors only"):
        transfer_ip_adapter(str(tmp_path / "ip-adapter.bin"), student, str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_sd15_student_takes_a_transferred_ip_adapter(tiny_sd_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipe_dir, subfolder="unet")
    save_file(tiny_ip_adapter(unet, seed=3), str(tmp_path / "sd_ipa.safetensors"))
    student = compress(tiny_sd_pipe_dir, "bk-sdm-small", str(tmp_path / "student")).out_dir
    r = transfer_ip_adapter(str(tmp_path / "sd_ipa.safetensors"), student, str(tmp_path / "out.safetensors"))
    assert r.kept > 0 and r.dropped > 0  # BK-SDM-Small: one of two blocks per stage, no mid block
    pipe = StableDiffusionPipeline.from_pretrained(student, image_encoder=tiny_image_encoder(seed=2))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="out.safetensors", image_encoder_folder=None)
    lmap = LayerMap.load(student)
    t_sd = _tensors(str(tmp_path / "sd_ipa.safetensors"))
    t_index = {n: 2 * k + 1 for k, n in enumerate(cross_attention_layers(unet))}
    procs = pipe.unet.attn_processors
    for name in cross_attention_layers(pipe.unet):
        n = t_index[lmap.teacher_name(name)]
        assert torch.equal(procs[name + ".processor"].to_k_ip[0].weight, t_sd[f"ip_adapter.{n}.to_k_ip.weight"])
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    g = torch.Generator().manual_seed(0)
    res = pipe("a red circle", ip_adapter_image=img, num_inference_steps=2, generator=g, output_type="np").images
    assert np.isfinite(res).all()


def _tiny_t2i_adapter(out_dir, teacher_dir, first=None):
    """A random XL T2I-Adapter for the tiny teacher: one feature per encoder stage plus the mid block's."""
    from diffusers import T2IAdapter

    from koala.families import model_config

    widths = model_config(teacher_dir)["block_out_channels"]
    channels = [first or widths[0], *widths[1:], widths[-1]]

    torch.manual_seed(4)
    adapter = T2IAdapter(
        in_channels=3, channels=list(channels), num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl"
    )
    adapter.save_pretrained(out_dir, safe_serialization=True)
    return adapter


def test_t2i_adapter_fits_the_student_unchanged_and_runs(setup, tmp_path, capsys):
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline, T2IAdapter

    teacher_dir, _, student, _, _ = setup
    teacher_adapter = _tiny_t2i_adapter(str(tmp_path / "t2i"), teacher_dir)
    out = tmp_path / "student_t2i"
    args = ["adapter", "transfer", "--kind", "t2i-adapter", str(tmp_path / "t2i"), "--student", student]
    assert main(args + ["--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "features used at DW-1, DW-2, DW-3; unused (stage not in the student): MID" in report  # KOALA: no mid
    adapter = T2IAdapter.from_pretrained(str(out))
    t_sd, s_sd = teacher_adapter.state_dict(), adapter.state_dict()
    assert t_sd.keys() == s_sd.keys() and all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    base = StableDiffusionXLPipeline.from_pretrained(student)
    pipe = StableDiffusionXLAdapterPipeline(**base.components, adapter=adapter)
    rng = np.random.default_rng(1)
    size = base.default_sample_size * base.vae_scale_factor

    def sample():  # a new random control image each call
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", image=img, num_inference_steps=2, generator=g, output_type="np").images

    a, b = sample(), sample()
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3  # the control image changes the image
    # an adapter of other widths (another base model) is refused, naming it; nothing written
    _tiny_t2i_adapter(str(tmp_path / "wide"), teacher_dir, first=48)
    with pytest.raises(KoalaError, match="wide.*shape mismatch.*DW-1: 48 vs"):
        transfer_t2i_adapter(str(tmp_path / "wide"), student, str(tmp_path / "x"))
    with pytest.raises(KoalaError, match="not a T2I-Adapter directory"):
        transfer_t2i_adapter(str(tmp_path), student, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_pixart_students_are_refused(tiny_pixart_dir, setup, tmp_path):
    _, teacher_file, _, _, _ = setup
    student = compress(tiny_pixart_dir, {"num_layers": 3}, str(tmp_path / "student")).out_dir
    with pytest.raises(KoalaError, match="IP-Adapter transfer covers U-Net students.*no IP-Adapter loader"):
        transfer_ip_adapter(teacher_file, student, str(tmp_path / "out.safetensors"))
    with pytest.raises(KoalaError, match="T2I-Adapters run on U-Net students"):
        transfer_t2i_adapter(str(tmp_path), student, str(tmp_path / "t2i"))
    assert sorted(os.listdir(tmp_path)) == ["student"]


def test_ip_adapter_transfer_on_a_full_disk_says_so_and_leaves_nothing(setup, small_disk, capsys):
    _, teacher_file, student, _, _ = setup
    disk = small_disk(8192)
    out = os.path.join(disk, "student_ipa.safetensors")
    assert main(["adapter", "transfer", "--kind", "ip-adapter", teacher_file, "--student", student, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"disk full: writing {out} under {disk} failed (No space left on device)" in err
    assert f"nothing half-written is left at {out}" in err and os.listdir(disk) == []
