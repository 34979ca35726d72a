"""Tiny SDXL-topology models for the shapes world, and the packaged trained teacher.

Same structure as SDXL-Base: two CLIP text encoders (CLIPTextModel + CLIPTextModelWithProjection,
penultimate hidden states concatenated, pooled embedding from the second), ``text_time`` conditioning,
down blocks [DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D] with 2 layers each, a cross-attention
mid block and transformer depths [., 2, 10], so KOALA's 10 -> 6/5 removal and mid-block removal apply
verbatim. The tokenizer knows every caption word as one token; prompts are padded to 32 tokens, not 77.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import KoalaError
from .shapes import VOCAB_WORDS
from .tiny import sdxl_scheduler
from .tokenizer import build_clip_tokenizer

TEXT_DIM = 32  # each encoder's hidden size; the U-Net's cross-attention sees 2 * TEXT_DIM
TIME_EMBED_DIM = 8
MAX_TOKENS = 32
IMAGE_SIZE = 32  # pixels; the VAE downsamples by 2, so latents are 16 x 16


def shapes_unet_config(channels=(32, 64, 64), depth=(1, 2, 10), layers_per_block=2, sample_size=IMAGE_SIZE // 2,
                       heads=(1, 2, 2)) -> dict:
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(channels), "layers_per_block": layers_per_block,
        "transformer_layers_per_block": list(depth), "attention_head_dim": list(heads),
        "cross_attention_dim": 2 * TEXT_DIM, "norm_num_groups": 8, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TEXT_DIM + 6 * TIME_EMBED_DIM,
        "flip_sin_to_cos": True, "freq_shift": 0,
    }


def shapes_vae(seed: int = 0, channels=(32, 64)) -> AutoencoderKL:
    """A 2-block AutoencoderKL (downsampling factor 2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=list(channels), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
        scaling_factor=1.0, force_upcast=False,
    )


def shapes_text_encoders(vocab_size: int, seed: int = 0):
    common = dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
                  bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**common))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common))
    return te1, te2


def shapes_tokenizer(out_dir: str):
    return build_clip_tokenizer(out_dir, VOCAB_WORDS, model_max_length=MAX_TOKENS)


def build_shapes_pipeline(seed: int = 0, unet_channels=(32, 64, 64), vae_channels=(32, 64)) -> StableDiffusionXLPipeline:
    """An untrained shapes pipeline (random weights, fp32); ``save_pretrained`` gives a normal SDXL directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = shapes_tokenizer(d)
    te1, te2 = shapes_text_encoders(len(tok), seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**shapes_unet_config(channels=unet_channels))
    return StableDiffusionXLPipeline(
        vae=shapes_vae(seed, vae_channels), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
    )


def shapes_teacher_dir() -> str:
    """Path of the packaged trained teacher pipeline (``koala/assets/shapes-teacher``)."""
    d = Path(__file__).resolve().parent.parent / "assets" / "shapes-teacher"
    if not (d / "model_index.json").is_file():
        raise KoalaError(f"{d}: the packaged shapes teacher is missing; regenerate it with `koala lab train-teacher "
                         f"--out {d}` (see the README there)")
    return str(d)


def load_shapes_teacher(dtype=torch.float32, device: str | None = None) -> StableDiffusionXLPipeline:
    """The packaged teacher as a ``StableDiffusionXLPipeline`` (sample with 20 Euler steps, guidance 5)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(shapes_teacher_dir(), dtype=dtype)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_sampling() -> dict:
    """Sampler settings the teacher's scores were measured with."""
    return {"num_inference_steps": 20, "guidance_scale": 5.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}


__all__ = ["build_shapes_pipeline", "shapes_unet_config", "shapes_vae", "shapes_text_encoders", "shapes_tokenizer",
           "shapes_teacher_dir", "load_shapes_teacher", "default_sampling"]
