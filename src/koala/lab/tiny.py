"""Tiny SDXL-topology pipelines with random weights, for tests and quick experiments.

Same block types, ``text_time`` conditioning, two CLIP text encoders (penultimate hidden states
concatenated, pooled embedding from the second) and a transformer depth pattern like SDXL's [0, 2, 10],
so KOALA's 10 -> 6/5 layer removal and mid-block removal apply verbatim.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer

TEXT_DIM = 16  # each encoder's hidden size; the U-Net sees 2 * TEXT_DIM
POOLED_DIM = 16
TIME_EMBED_DIM = 8


def tiny_unet_config(depth=(1, 2, 10), channels=(16, 32, 32), layers_per_block=2, sample_size=16) -> dict:
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "transformer_layers_per_block": list(depth),
        "attention_head_dim": [1, 2, 2],
        "cross_attention_dim": 2 * TEXT_DIM,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_EMBED_DIM,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def tiny_unet(seed: int = 0, **kw) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(**kw))


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025, force_upcast=False,
    )


def tiny_text_encoders(vocab_size: int, seed: int = 0):
    common = dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=77, projection_dim=POOLED_DIM,
                  bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common))
    return te1, te2


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL-Base's scheduler config (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_pipeline(seed: int = 0, words=(), unet: UNet2DConditionModel | None = None, **unet_kw) -> StableDiffusionXLPipeline:
    """A complete tiny SDXL pipeline with random weights (CPU, fp32)."""
    with tempfile.TemporaryDirectory() as d:
        tok = build_clip_tokenizer(d, words)
    te1, te2 = tiny_text_encoders(len(tok), seed)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        unet=unet if unet is not None else tiny_unet(seed, **unet_kw), scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(out_dir: str, seed: int = 0, **kw) -> str:
    pipe = tiny_pipeline(seed, **kw)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
