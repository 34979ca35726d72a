"""koala.testing: the tiny-model builder (RANDOM, SHAPES; SDXL and SD families) and `koala lab make-tiny`."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from koala.errors import KoalaError
from koala.testing.tiny import (
    RANDOM,
    SHAPES,
    sdxl_scheduler,
    text_encoder_config,
    tiny_pipeline,
    tiny_text_encoders,
    tiny_unet,
    tiny_vae,
    unet_config,
)

_META = {
    "_name_or_path",
    "_diffusers_version",
    "_class_name",
    "_use_default_values",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
}


def _clean(cfg: dict, drop=()) -> dict:
    return {k: v for k, v in cfg.items() if k not in _META and k not in drop}


def _asset(*parts):
    from koala.lab.models import shapes_teacher_dir

    return os.path.join(shapes_teacher_dir(), *parts)


def test_random_spec_keeps_sdxl_depth_pattern():
    cfg = unet_config()
    assert cfg["transformer_layers_per_block"] == [1, 2, 10] and cfg["addition_embed_type"] == "text_time"
    assert cfg["block_out_channels"] == [16, 32, 32] and cfg["cross_attention_dim"] == 2 * RANDOM.text_dim
    assert list(tiny_unet(seed=0, channels=(16, 32, 48)).config.block_out_channels) == [16, 32, 48]
    with pytest.raises(KoalaError, match="sd3") as err:
        unet_config(RANDOM, "sd3")
    assert err.value.option == "family"


def test_shapes_builder_matches_the_packaged_teacher():
    """The SHAPES spec builds exactly the packaged teacher's architecture: configs equal, weights load strictly."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    unet = tiny_unet(SHAPES)
    assert _clean(dict(unet.config)) == _clean(json.load(open(_asset("unet", "config.json"))))
    unet.load_state_dict(
        {k: v.float() for k, v in load_file(_asset("unet", "diffusion_pytorch_model.safetensors")).items()}
    )

    vae = tiny_vae(SHAPES)
    drop = ("scaling_factor",)  # trained: 1 / std of the latents
    assert _clean(dict(vae.config), drop) == _clean(json.load(open(_asset("vae", "config.json"))), drop)
    vae.load_state_dict(load_file(_asset("vae", "diffusion_pytorch_model.safetensors")))

    vocab = len(CLIPTokenizer.from_pretrained(_asset("tokenizer")))
    built = text_encoder_config(SHAPES, vocab).to_dict()
    encoders = tiny_text_encoders(SHAPES, vocab)
    for name, enc in zip(("text_encoder", "text_encoder_2"), encoders):
        saved = CLIPTextConfig.from_pretrained(_asset(name)).to_dict()
        assert {k: saved[k] for k in _clean(built)} == _clean(built), name
        enc.load_state_dict(load_file(_asset(name, "model.safetensors")))

    sched = json.load(open(_asset("scheduler", "scheduler_config.json")))
    assert _clean(dict(sdxl_scheduler().config)) == _clean(sched)


def test_shapes_pipeline_builds_with_the_shapes_vocabulary():
    from koala.lab.models import build_shapes_pipeline

    pipe = build_shapes_pipeline(0)
    assert pipe.tokenizer.model_max_length == SHAPES.max_tokens == pipe.text_encoder.config.max_position_embeddings
    assert len(pipe.tokenizer("a red triangle", add_special_tokens=False).input_ids) == 3


def test_tiny_sd_pipeline_loads_and_generates(tiny_sd_pipe_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipe_dir)
    cfg = pipe.unet.config
    assert cfg.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg.addition_embed_type is None and cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 2
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()


def test_tiny_sd_and_sdxl_share_sizes_but_not_topology():
    sd, sdxl = tiny_pipeline(family="sd"), tiny_pipeline()
    assert not hasattr(sd, "text_encoder_2") and sdxl.text_encoder_2 is not None
    assert len(sd.unet.down_blocks) == 4 and len(sdxl.unet.down_blocks) == 3


@pytest.mark.parametrize("family,cls", [("sdxl", "StableDiffusionXLPipeline"), ("sd", "StableDiffusionPipeline")])
def test_cli_make_tiny(tmp_path, capsys, family, cls):
    from diffusers import DiffusionPipeline

    from koala.cli import main

    out = tmp_path / "tiny"
    assert main(["lab", "make-tiny", str(out), "--family", family, "--seed", "1"]) == 0
    assert json.load(open(out / "model_index.json"))["_class_name"] == cls
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == cls
    # an existing OUT is refused (and left alone) unless --overwrite
    (out / "keep.txt").write_text("x")
    assert main(["lab", "make-tiny", str(out), "--family", family]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["lab", "make-tiny", str(out), "--family", family, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "unet" / "config.json").is_file()
