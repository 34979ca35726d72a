"""LoRA transfer: a random peft LoRA on a tiny SDXL teacher, mapped onto a KOALA student through its layer map. Every
kept module's weight delta on the student equals the teacher's delta at the mapped location (diffusers and kohya
formats alike); removed modules are dropped and counted; generate runs with it; bad LoRAs are refused."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from koala.arch.layer_map import LayerMap
from koala.cli import main
from koala.compress import compress
from koala.errors import KoalaError
from koala.formats.lora import transfer_lora

peft = pytest.importorskip("peft")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1"]


def _lora_layers(model, adapter):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    """(teacher pipeline with adapter 'default', LoRA file in diffusers format, student dir)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)  # scale 2
    pipe.unet.add_adapter(ucfg)
    tcfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    StableDiffusionXLPipeline.save_lora_weights(
        str(root / "teacher_lora"),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    student = compress(tiny_pipe_dir, "koala-700m", str(root / "student")).out_dir
    return pipe, str(root / "teacher_lora" / "pytorch_lora_weights.safetensors"), student


def _check_deltas(teacher_pipe, student_dir, lora_file, adapter="x"):
    from diffusers import StableDiffusionXLPipeline

    spipe = StableDiffusionXLPipeline.from_pretrained(student_dir)
    spipe.load_lora_weights(lora_file, adapter_name=adapter)
    lmap = LayerMap.load(student_dir)
    t_layers = _lora_layers(teacher_pipe.unet, "default")
    s_layers = _lora_layers(spipe.unet, adapter)
    assert s_layers
    for name, layer in s_layers.items():
        t = t_layers[lmap.teacher_name(name)]
        torch.testing.assert_close(
            layer.get_delta_weight(adapter), t.get_delta_weight("default"), rtol=1e-6, atol=1e-7
        )
    # every student module whose teacher module has a LoRA got it
    expected = [n for n, _ in spipe.unet.named_modules() if n and lmap.entry(n) and lmap.teacher_name(n) in t_layers]
    assert sorted(expected) == sorted(s_layers)
    t_te, s_te = _lora_layers(teacher_pipe.text_encoder, "default"), _lora_layers(spipe.text_encoder, adapter)
    assert sorted(t_te) == sorted(s_te) and t_te
    for name, layer in s_te.items():
        torch.testing.assert_close(layer.get_delta_weight(adapter), t_te[name].get_delta_weight("default"))
    return spipe, len(s_layers)


def test_transfer_diffusers_lora_gives_the_teachers_deltas(setup, tmp_path, capsys):
    teacher_pipe, lora_file, student = setup
    out = tmp_path / "koala_lora.safetensors"
    assert main(["lora", "transfer", lora_file, "--student", student, "--out", str(out)]) == 0
    report = capsys.readouterr().out
    _, kept = _check_deltas(teacher_pipe, student, str(out))
    n_teacher = len(_lora_layers(teacher_pipe.unet, "default"))
    r = transfer_lora(lora_file, student, str(tmp_path / "again.safetensors"))
    assert r.kept == kept and r.dropped > 0 and r.kept + r.dropped == n_teacher  # no teacher module feeds two here
    assert r.dropped_by_stage.get("DW-3", 0) > 0 and r.dropped_by_stage.get("MID", 0) > 0  # 10 -> 5 layers, mid gone
    assert f"{r.kept} U-Net modules kept, {r.dropped} dropped" in report
    assert r.text_encoder == len(_lora_layers(teacher_pipe.text_encoder, "default"))


def _to_kohya(lora_file, unet, text_encoder):
    """The same LoRA in kohya's format: SGM module names with '_' for '.', lora_down/lora_up/alpha."""
    from koala.formats.lora import _ldm_module_names

    sgm = _ldm_module_names(unet)
    out = {}
    with safe_open(lora_file, "pt") as f:
        for k in f.keys():
            comp, rest = k.split(".", 1)
            module, ab = rest.rsplit(".lora_", 1)
            if comp == "unet":
                name = "lora_unet_" + sgm[module].replace(".", "_")
                alpha = 8.0
            else:
                canon = module if module.startswith("text_model.") else "text_model." + module
                name = "lora_te1_" + canon.replace(".", "_")
                alpha = 2.0
            out[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = f.get_tensor(k)
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_transfer_kohya_lora_equals_the_diffusers_one(setup, tmp_path):
    teacher_pipe, lora_file, student = setup
    kohya = tmp_path / "kohya.safetensors"
    base_pipe_unet = teacher_pipe.unet  # module names are the same with or without the adapter wrappers
    save_file(_to_kohya(lora_file, base_pipe_unet, teacher_pipe.text_encoder), str(kohya))
    r = transfer_lora(str(kohya), student, str(tmp_path / "from_kohya.safetensors"))
    assert r.source_format == "kohya"
    transfer_lora(lora_file, student, str(tmp_path / "from_diffusers.safetensors"))
    with (
        safe_open(str(tmp_path / "from_kohya.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "from_diffusers.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k))
    _check_deltas(teacher_pipe, student, str(tmp_path / "from_kohya.safetensors"))


def test_generate_with_a_transferred_lora(setup, tmp_path, capsys):
    from PIL import Image

    _, lora_file, student = setup
    out = tmp_path / "l.safetensors"
    transfer_lora(lora_file, student, str(out))
    args = ["generate", "a red circle", "--model", student, "--steps", "2", "--seed", "1", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--lora", f"{out}:0.5", "--out", str(tmp_path / "lora")]) == 0
    assert "LoRA l.safetensors:0.5" in capsys.readouterr().out
    a = Image.open(tmp_path / "plain" / os.listdir(tmp_path / "plain")[0])
    b = Image.open(tmp_path / "lora" / sorted(p for p in os.listdir(tmp_path / "lora") if p.endswith(".png"))[0])
    assert a.size == b.size and a.tobytes() != b.tobytes()
    assert b.text["lora"] == "l.safetensors:0.5" and "lora" not in a.text  # the PNG says which LoRA made it
    # an SDXL LoRA that was not transferred does not fit the student: said, not a crash
    assert main(args + ["--lora", lora_file, "--out", str(tmp_path / "x")]) == 2
    assert "koala lora transfer" in capsys.readouterr().err
    assert main(args + ["--lora", f"{out}:strong", "--out", str(tmp_path / "x")]) == 2


def test_bad_loras_are_refused_with_nothing_written(setup, tiny_sd_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, lora_file, student = setup
    out = tmp_path / "out.safetensors"
    # an SD-1.x LoRA on an SDXL student
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_pipe_dir)
    sd.unet.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["to_k"]))
    sd_file = tmp_path / "sd15.safetensors"
    save_file({f"unet.{k}": v for k, v in get_peft_model_state_dict(sd.unet).items()}, str(sd_file))
    with pytest.raises(KoalaError, match="sd15.safetensors.*another base"):
        transfer_lora(str(sd_file), student, str(out))
    # rank mismatch, unknown keys, LyCORIS, not safetensors
    with safe_open(lora_file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a_key = next(k for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight"))
    bad = dict(tensors, **{a_key: torch.zeros(3, tensors[a_key].shape[1])})
    save_file(bad, str(tmp_path / "rank.safetensors"))
    with pytest.raises(KoalaError, match="rank mismatch"):
        transfer_lora(str(tmp_path / "rank.safetensors"), student, str(out))
    save_file({"foo.bar": torch.zeros(1)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(KoalaError, match="no LoRA format"):
        transfer_lora(str(tmp_path / "unknown.safetensors"), student, str(out))
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(1)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(KoalaError, match="LoHa"):
        transfer_lora(str(tmp_path / "loha.safetensors"), student, str(out))
    with pytest.raises(KoalaError, match="safetensors only"):
        transfer_lora(str(tmp_path / "lora.pt"), student, str(out))
    assert not out.exists()


def test_alphas_from_diffusers_metadata_with_patterns():
    import json

    from koala.formats.lora import _peft_alpha

    alpha = _peft_alpha(
        {
            "lora_adapter_metadata": json.dumps(
                {"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"attn1.to_q": 2, "[not a regex": 3}}
            )
        }
    )
    assert alpha("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == 2.0
    assert alpha("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k") == 8.0
    assert alpha("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") is None  # nothing said: alpha = rank


def test_transfer_on_a_full_disk_says_so_and_leaves_nothing(setup, small_disk, capsys):
    _, lora_file, student = setup
    disk = small_disk(8192)
    out = os.path.join(disk, "student_lora.safetensors")
    assert main(["lora", "transfer", lora_file, "--student", student, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"disk full: writing {out} under {disk} failed (No space left on device)" in err
    assert f"nothing half-written is left at {out}" in err and os.listdir(disk) == []
