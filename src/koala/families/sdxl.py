"""SDXL family: SDXL-Base, -Turbo, -Lightning and fine-tunes, and the KOALA / BK-SDXL students.

Conditioning exactly as ``StableDiffusionXLPipeline`` computes it: two CLIP text encoders, penultimate hidden
states concatenated along the feature axis; the pooled embedding comes from the encoder whose first output
is 2-D (the second, ``CLIPTextModelWithProjection``). ``add_time_ids`` = original_size (h, w) + crop top-left
(top, left) + target_size (h, w). The unconditional input is all zeros (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from typing import Any, Sequence  # noqa: F401

import torch

from ..arch.unet import UNetSpec
from .base import Parts, UNetFamily

# The exact SDXL-Base-1.0 U-Net config (public fact: stabilityai/stable-diffusion-xl-base-1.0/unet/config.json).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}


# SDXL-Base-1.0's VAE and scheduler (public fact: .../vae/config.json, .../scheduler/scheduler_config.json); with the
# U-Net config and real_text_towers they are the configs a single-file SDXL checkpoint is converted with offline.
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _spec(encoder_layers, down_depth, up_depth, mid, desc, paper=None) -> UNetSpec:
    return UNetSpec(list(encoder_layers), list(down_depth), list(up_depth), mid, None, desc, paper)


# Depth lists are written lowest stage first for the encoder (DW-1, DW-2, DW-3) and lowest resolution first
# for the decoder (UP-1, UP-2, UP-3), as in the paper's Fig. 2. Entries for stages without attention are 0.
PRESETS: dict[str, UNetSpec] = {
    "sdxl-base": _spec([2, 2, 2], [0, 2, 10], [10, 2, 0], True, "SDXL-Base-1.0 U-Net (teacher)", 2_567_000_000),
    "bk-sdxl": _spec([1, 1, 1], [0, 2, 10], [10, 2, 0], True, "BK-SDM block removal on SDXL (Table 2)", 1_717_000_000),
    "koala-1b": _spec([1, 1, 1], [0, 2, 6], [6, 2, 0], True, "KOALA-1B: block removal + depth 10->6", 1_161_000_000),
    "koala-700m": _spec([1, 1, 1], [0, 2, 5], [5, 2, 0], False, "KOALA-700M: depth 10->5, no mid block", 782_000_000),
    # Segmind's distilled SDXL variants, for comparison only. Reconstructed layer counts (asymmetric decoder
    # depths, no mid block); SSD-1B lands on its reported 1.3B, Vega on 734M against a reported 745M.
    "ssd-1b": _spec([2, 2, 2], [0, 2, 4], [[4, 4, 10], [2, 1, 1], [0, 0, 0]], False, "Segmind SSD-1B (comparison)"),
    "segmind-vega": _spec(
        [2, 2, 2], [0, 2, 2], [[2, 2, 2], [1, 1, 1], [0, 0, 0]], False, "Segmind Vega (comparison, approximate)"
    ),
}


def time_ids(original_size, crop_top_left, target_size, dtype=torch.float32) -> torch.Tensor:
    """``[B, 6]`` SDXL micro-conditioning from per-sample (h, w), (top, left), (h, w); tensors or tuples."""
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size, crop_top_left, target_size)]
    parts = [p.unsqueeze(0) if p.ndim == 1 else p for p in parts]
    return torch.cat(parts, dim=-1)


class SDXLFamily(UNetFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    )
    text_cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    micro_cond_keys = ("add_time_ids",)
    reference_config = SDXL_BASE_UNET_CONFIG
    presets = PRESETS
    # CLIP ViT-L/14 text tower (text_encoder) and OpenCLIP ViT-bigG/14 text tower (text_encoder_2)
    real_text_towers = (
        dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
    )
    vae_upcast = True
    single_file_layout = "sgm"
    lora_transfer = True
    ip_adapter_transfer = True
    t2i_adapter_pipeline = "StableDiffusionXLAdapterPipeline"
    controlnet_pipeline_class_name = "StableDiffusionXLControlNetPipeline"
    reference_name = "SDXL-Base-1.0"
    reference_hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
    reference_vae_config = SDXL_VAE_CONFIG
    reference_scheduler_config = SDXL_SCHEDULER_CONFIG

    def problems(self, config: dict) -> list[str]:
        problems = super().problems(config)
        if config.get("addition_embed_type") != "text_time":
            problems.append(
                f"addition_embed_type is {config.get('addition_embed_type')!r}, expected 'text_time' "
                "(SDXL's pooled-text + size/crop conditioning)"
            )
        downs = list(config.get("down_block_types", []))
        if downs and downs[0] != "DownBlock2D":
            problems.append(
                f"down_block_types[0] is {downs[0]!r}; SDXL has no attention at the highest resolution (DownBlock2D)"
            )
        return problems

    zero_uncond = True  # force_zeros_for_empty_prompt

    def encode_tokens(self, ids: Sequence[torch.Tensor], text_encoders) -> dict[str, torch.Tensor]:
        embeds, pooled = [], None
        for tok_ids, enc in zip(ids, text_encoders):
            out = enc(tok_ids.to(next(enc.parameters()).device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError(
                "no text encoder returned a pooled (2-D) embedding; SDXL's second encoder must be "
                "CLIPTextModelWithProjection"
            )
        return {"prompt_embeds": torch.cat(embeds, dim=-1), "pooled_prompt_embeds": pooled}

    def micro_conditions(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"add_time_ids": time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])}

    def model_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": cond["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]},
        }

    def dummy_cond(
        self, config: dict, batch: int = 1, text_len: int | None = None, device="meta", dtype=torch.float32
    ) -> dict[str, torch.Tensor]:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        with torch.device(device):
            return {
                "prompt_embeds": torch.randn(
                    batch, text_len or self.default_text_len, config["cross_attention_dim"], dtype=dtype
                ),
                "pooled_prompt_embeds": torch.randn(batch, pooled, dtype=dtype),
                "add_time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, dtype=dtype),
            }

    def make_pipeline(self, parts: Parts, model, scheduler=None):
        return self.pipeline_class(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=model,
            scheduler=scheduler or parts.scheduler,
            force_zeros_for_empty_prompt=True,
        )
